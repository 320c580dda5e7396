"""The sigmoid mask's scores trained by the training loss (no curvature probes).

The mask is the method's own ``sigmoid((score - group threshold) / T)`` (``masks.MaskState``); here
its scores are parameters that Adam moves along the loss gradient in the soft phase, starting at
``+-prior_strength`` around the warm-start mask. The threshold is held constant in the gradient (the
straight-through cut of ``soft_nm_mask``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import MaskState
from .config import AnnealConfig
from .learned import LearnedEvidence


class LossGradEvidence(LearnedEvidence):
    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState], warm: dict[str, torch.Tensor],
                 weight_views: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(cfg, masks, warm, weight_views)
        strength = cfg.evidence.prior_strength
        for name, ms in masks.items():
            ms.set_scores(strength * (2 * self.start[name].float() - 1))
            ms.score.requires_grad_(True)
        self.opt = torch.optim.Adam([ms.score for ms in masks.values()], lr=cfg.evidence.mask_lr)

    def after_backward(self, step: int) -> None:
        if self.learning:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        super().finish()
        for ms in self.masks.values():
            ms.score.requires_grad_(False)
        self.opt.state.clear()

    def extra_state(self) -> dict:
        return {"opt": self.opt.state_dict()}  # the scores themselves are saved with the masks

    def load_extra_state(self, state: dict) -> None:
        for ms in self.masks.values():
            ms.score.requires_grad_(self.learning)
        self.opt.load_state_dict(state["opt"])
