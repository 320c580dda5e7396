"""Which evidence moves the mask: ``mask_evidence`` and ``importance`` pick the class."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import MaskState
from .config import AnnealConfig
from .evidence import Evidence, FisherEvidence, HutchinsonEvidence
from .gumbel import GumbelEvidence
from .loss_grad import LossGradEvidence
from .srste import SRSTEEvidence

LEARNED = {"gumbel": GumbelEvidence, "srste": SRSTEEvidence, "loss_grad": LossGradEvidence}


def make_evidence(cfg: AnnealConfig, masks: dict[str, MaskState], warm: dict[str, torch.Tensor] | None = None,
                  weight_views: dict[str, Callable[[], torch.Tensor]] | None = None) -> Evidence:
    """The evidence ``cfg`` names; the learned masks start from ``warm`` (the one-shot masks) and SR-STE
    trains the weights behind ``weight_views``."""
    kind = cfg.evidence.mask_evidence
    if kind == "obd":
        return (HutchinsonEvidence if cfg.evidence.importance == "hutchinson" else FisherEvidence)(cfg, masks)
    return LEARNED[kind](cfg, masks, warm or {}, weight_views or {})
