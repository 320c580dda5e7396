"""The SparseForge calibration-training loop: Hessian-guided soft masks annealed to exact N:M.

Per masked layer the mask is ``sigmoid((score - group threshold) / T)`` (``masks.MaskState``), its
score the OBD saliency of each weight plus a decaying prior toward the warm-start mask (``evidence``).
The schedule over the run's progress (``schedule``): a soft phase whose temperature anneals while
the scores are refreshed, a hardening phase that blends the mask into the exact N:M projection, then
training with the final hard mask, run on the plain model (masked weights re-zeroed after each step).
Weights train through the mask throughout; the loss is tau^2 KL to the dense teacher's logits, plus
``ce_weight`` x CE on the labels and the layer-wise block-output loss (``loss``).

Rooms: ``config`` (settings), ``schedule``, ``batches`` (the data), ``evidence`` (Fisher or Hutchinson
curvature, the OBD scores), ``loss``, ``compile`` (what runs compiled, and the fallbacks), ``guard``
(clipping, non-finite steps) and ``loop`` (:class:`Annealer`: steps, run, checkpoints, metrics).
"""

from .batches import TrainingBatches
from .config import IMPORTANCE_ESTIMATORS, WARM_STARTS, AnnealConfig
from .evidence import Evidence, FisherEvidence, HutchinsonEvidence
from .loop import Annealer, AnnealResult
from .loss import LayerTaps
from .schedule import SchedulePoint, schedule

__all__ = ["IMPORTANCE_ESTIMATORS", "WARM_STARTS", "AnnealConfig", "AnnealResult", "Annealer", "Evidence",
           "FisherEvidence", "HutchinsonEvidence", "LayerTaps", "SchedulePoint", "TrainingBatches", "schedule"]
