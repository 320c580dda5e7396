"""What the learned masks share: masks moved by the training loss itself rather than by curvature probes.

A learned mask starts from the warm-start (one-shot) mask, learns in the soft phase, and is frozen when
the soft phase ends (:meth:`LearnedEvidence.finish`): its scores then hold its final choice, so the
hardening blend, the plain phase and the flip count read it as they read the OBD scores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ..masks import MaskState
from .config import AnnealConfig
from .evidence import Evidence
from .schedule import SchedulePoint


class LearnedEvidence(Evidence):
    """Base of the learned masks: no probes; ``learning`` until the soft phase ends."""

    probing = False

    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState], warm: dict[str, torch.Tensor],
                 weight_views: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(cfg, masks)
        self.weight_views = weight_views
        self.learning = True
        self.step = 0
        self.point: SchedulePoint | None = None
        self.names = {id(ms): name for name, ms in masks.items()}
        # Without a warm start: the mask the layer starts with (magnitude's choice).
        self.start = {n: (warm[n] if n in warm else ms.hard_mask()).to(ms.score.device).bool()
                      for n, ms in masks.items()}

    def begin_step(self, step: int, point: SchedulePoint) -> None:
        self.step, self.point = step, point
        if self.learning and not point.soft_phase:
            self.finish()

    def finish(self) -> None:
        """Freeze the mask: the soft phase is over."""
        self.learning = False
        self.refresh({}, 0.0, 0)

    def refresh(self, warm: dict[str, torch.Tensor], margin: float, step: int) -> None:
        """Write each layer's scores so that their N:M projection is the mask's choice now."""

    def noise_generator(self, step: int, device: torch.device) -> torch.Generator:
        # Seeded per step: the same seed gives the same noise, resumed or not, whatever ran before.
        return torch.Generator(device=device).manual_seed(self.cfg.runtime.seed * 1_000_003 + step * 7919 + 29)

    def curvature(self, name: str, ms: MaskState) -> torch.Tensor:
        return torch.zeros_like(ms.importance)

    def probes(self, ms: MaskState) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"learned_mask": {"learning": self.learning, **copy.deepcopy(self.extra_state())}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["learned_mask"]
        self.learning = bool(saved["learning"])
        self.load_extra_state(saved)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
