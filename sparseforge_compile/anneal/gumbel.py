"""Learned categorical masks (MaskLLM, NeurIPS 2024): each N:M group picks one of its C(M, N) supports.

Per group, logits over the supports; the soft phase trains them through the Gumbel-softmax relaxation
``softmax((logits + g) / T) @ supports`` (``g`` Gumbel noise, ``T`` the schedule's temperature), from
logits that favour the warm-start mask by ``prior_strength`` per kept weight it shares. The hard mask is
the support of the largest logit, an exact N:M mask by construction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ..masks import MaskState, NMPattern
from .config import AnnealConfig
from .learned import LearnedEvidence

MAX_SUPPORTS = 70  # C(8, 4): beyond it the logits outgrow the weights


def supports(pattern: NMPattern, device: torch.device | None = None) -> torch.Tensor:
    """Every N:M support of one group as a (C(M, N), M) 0/1 matrix, in lexicographic order."""
    rows = list(itertools.combinations(range(pattern.m), pattern.n))
    if len(rows) > MAX_SUPPORTS:
        raise ValueError(f"gumbel masks: pattern {pattern} has {len(rows)} supports per group (at most {MAX_SUPPORTS})")
    out = torch.zeros(len(rows), pattern.m, device=device)
    for i, kept in enumerate(rows):
        out[i, list(kept)] = 1.0
    return out


def gumbel_noise(shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=device).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def relaxed_mask(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float,
                 support: torch.Tensor) -> torch.Tensor:
    """(groups, M) soft mask: the supports weighed by ``softmax((logits + noise) / T)``."""
    z = logits if noise is None else logits + noise
    return torch.softmax(z / temperature, dim=-1) @ support


def hard_choice(logits: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """(groups, M) 0/1 mask: the support of each group's largest logit."""
    return support[logits.argmax(dim=-1)]


class GumbelEvidence(LearnedEvidence):
    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState], warm: dict[str, torch.Tensor],
                 weight_views: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(cfg, masks, warm, weight_views)
        self.support: dict[torch.device, torch.Tensor] = {}
        self.logits: dict[str, torch.nn.Parameter] = {}
        strength = cfg.evidence.prior_strength
        for name, ms in masks.items():
            s = self._support(ms)
            start = self.start[name].reshape(-1, ms.pattern.m).float()
            # Kept weights each support shares with the warm start, per kept weight of a group.
            shared = start @ s.t() / ms.pattern.n
            self.logits[name] = torch.nn.Parameter(strength * shared)
        self.opt = torch.optim.Adam(list(self.logits.values()), lr=cfg.evidence.mask_lr)

    def _support(self, ms: MaskState) -> torch.Tensor:
        device = ms.score.device
        if device not in self.support:
            self.support[device] = supports(ms.pattern, device)
        return self.support[device]

    def make_masks(self, states: list[MaskState], leaf: bool) -> list[torch.Tensor]:
        out = []
        gen = None
        for ms in states:
            name, s = self.names[id(ms)], self._support(ms)
            logits = self.logits[name]
            if self.learning and torch.is_grad_enabled():
                if gen is None:
                    gen = self.noise_generator(self.step, ms.score.device)
                mask = relaxed_mask(logits, gumbel_noise(logits.shape, gen, ms.score.device), ms._t, s)
            else:
                with torch.no_grad():
                    mask = relaxed_mask(logits, None, ms._t, s)
                    if ms._blend > 0.0:
                        mask = mask + ms._blend * (hard_choice(logits, s) - mask)
            out.append(ms.as_leaf(mask.reshape(ms.score.shape), leaf))
        return out

    def after_backward(self, step: int) -> None:
        if self.learning:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        super().finish()
        for p in self.logits.values():
            p.requires_grad_(False)
        self.opt.state.clear()  # its moments are dead weight for the rest of the run

    @torch.no_grad()
    def refresh(self, warm: dict[str, torch.Tensor], margin: float, step: int) -> None:
        for name, ms in self.masks.items():
            logits, s = self.logits[name], self._support(ms)
            # The chosen support first, then the soft marginals (bounded by 1) to rank within it.
            score = hard_choice(logits, s) + 0.5 * relaxed_mask(logits, None, 1.0, s)
            ms.set_scores(score.reshape(ms.score.shape))

    def extra_state(self) -> dict:
        return {"logits": {n: p.detach() for n, p in self.logits.items()}, "opt": self.opt.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.logits.items():
                p.copy_(state["logits"][n])
                p.requires_grad_(self.learning)
        self.opt.load_state_dict(state["opt"])
