"""SR-STE: the mask is the top-N magnitude of latent weights trained straight through it.

The masked graph applies ``w * m``; its weight gradient is ``g * m``, nothing for pruned weights. The
mask fed here is ``m + delta (1 - m)``: pruned weights get ``delta g`` (their forward share is ``delta w``,
far below rounding), rescaled to ``g`` after the backward, plus the decay ``srste_decay (1 - m) w`` that
keeps pruned weights from drifting (the sparse-refined term). Pruned weights start at zero, the warm
start's own solution, so the first mask is the warm one; every ``importance_every`` soft-phase steps the
mask becomes the top-N magnitudes of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import MaskState, nm_mask
from .config import AnnealConfig
from .learned import LearnedEvidence
from .schedule import SchedulePoint

DELTA = 2.0**-20  # a power of two: the rescale by 1 / DELTA is exact


class SRSTEEvidence(LearnedEvidence):
    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState], warm: dict[str, torch.Tensor],
                 weight_views: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(cfg, masks, warm, weight_views)
        self.mask = {n: m.clone() for n, m in self.start.items()}
        with torch.no_grad():
            for name in masks:
                self.weight_views[name]().mul_(self.mask[name])

    def begin_step(self, step: int, point: SchedulePoint) -> None:
        if self.learning and point.soft_phase and step and step % self.cfg.evidence.importance_every == 0:
            self.recompute()
        super().begin_step(step, point)

    @torch.no_grad()
    def recompute(self) -> None:
        for name in self.masks:
            self.mask[name] = nm_mask(self.weight_views[name]().abs(), self.masks[name].pattern)
        self.refresh({}, 0.0, 0)

    def make_masks(self, states: list[MaskState], leaf: bool) -> list[torch.Tensor]:
        out = []
        for ms in states:
            m = self.mask[self.names[id(ms)]].to(ms.score.dtype)
            out.append(ms.as_leaf(m + DELTA * (1 - m) if self.learning else m, leaf))
        return out

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if not self.learning:
            return
        decay = self.cfg.evidence.srste_decay
        for name in self.masks:
            grad = _grad_view(self.weight_views[name]())
            if grad is None:
                continue
            pruned = (~self.mask[name]).to(grad.dtype)
            grad.addcmul_(grad, pruned, value=1 / DELTA - 1)  # delta g -> g on the pruned weights
            if decay:
                grad.addcmul_(self.weight_views[name]().detach(), pruned, value=decay)

    @torch.no_grad()
    def refresh(self, warm: dict[str, torch.Tensor], margin: float, step: int) -> None:
        for name, ms in self.masks.items():
            ms.set_scores(self.mask[name].float())

    def extra_state(self) -> dict:
        return {"mask": dict(self.mask)}

    def load_extra_state(self, state: dict) -> None:
        self.mask = {n: m.to(self.mask[n].device).bool() for n, m in state["mask"].items()}


def _grad_view(view: torch.Tensor) -> torch.Tensor | None:
    """The gradient of a layer's (out, in) weight view: its parameter's, transposed back for Conv1D."""
    if view._base is None:
        return view.grad
    grad = view._base.grad
    return None if grad is None else grad.t()
