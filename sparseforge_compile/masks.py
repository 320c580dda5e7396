"""N:M mask math: the pattern, the exact projection, the soft mask and its state module.

Groups are M consecutive elements along a weight's *input* dimension (the last dim of an
``nn.Linear`` weight), which is the layout sparse tensor cores read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input weights (2:4 is the tensor-core pattern)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or not 0 < self.n <= self.m:
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}: need integers with 0 < N <= M, e.g. 2:4")

    @classmethod
    def parse(cls, spec: str | NMPattern) -> NMPattern:
        if isinstance(spec, NMPattern):
            return spec
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
        if not match:
            raise ValueError(f"cannot parse sparsity pattern {spec!r}: write it as N:M, e.g. '2:4'")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_divides(self, in_features: int, layer: str = "layer") -> None:
        if in_features % self.m:
            raise ValueError(
                f"{layer}: input dim {in_features} is not divisible by M={self.m} of pattern {self}; "
                f"pick an M that divides it or exclude the layer"
            )


def _groups(t: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    if t.shape[-1] % pattern.m:
        raise ValueError(
            f"last dim {t.shape[-1]} of a {tuple(t.shape)} tensor is not divisible by M={pattern.m} ({pattern})"
        )
    return t.reshape(-1, pattern.m)


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Exact N:M boolean mask: the top-N scores of every M consecutive inputs.

    Ties go to the lower index (a stable descending sort), so the result is deterministic.
    NaN scores rank lowest.
    """
    groups = _groups(scores.detach(), pattern)
    groups = torch.nan_to_num(groups.float(), nan=-torch.inf)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, : pattern.n], True)
    return keep.reshape(scores.shape)


def count_nm_violations(weight: torch.Tensor, pattern: NMPattern) -> int:
    """Number of M-groups holding more than N nonzeros (0 for a valid N:M weight)."""
    nonzeros = (_groups(weight.detach(), pattern) != 0).sum(dim=-1)
    return int((nonzeros > pattern.n).sum())


def group_thresholds(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Per-group cut between the N-th and (N+1)-th largest score, broadcast to the weight's shape.

    With N == M every weight is kept, so the cut sits below the group's minimum.
    """
    groups = _groups(scores.detach(), pattern)
    top = torch.sort(groups, dim=-1, descending=True).values
    if pattern.n == pattern.m:
        cut = top[:, -1:] - 1.0
    else:
        cut = 0.5 * (top[:, pattern.n - 1 : pattern.n] + top[:, pattern.n : pattern.n + 1])
    return cut.expand_as(groups).reshape(scores.shape)


def soft_nm_mask(scores: torch.Tensor, pattern: NMPattern, temperature: float | torch.Tensor) -> torch.Tensor:
    """sigmoid((score - group threshold) / T): tends to the exact N:M mask as T -> 0.

    Differentiable in ``scores`` (the threshold is held constant, as a straight-through cut).
    """
    return torch.sigmoid((scores - group_thresholds(scores, pattern)) / temperature)


class MaskState(nn.Module):
    """The mask of one Linear while it anneals; the graph calls it to get the mask to apply.

    State: ``score`` (importance, a parameter so that the masked graph is differentiable in it),
    ``temperature`` of the soft mask, and ``blend`` in [0, 1] moving from the soft mask (0) to the
    exact N:M projection of the scores (1). With ``straight_through`` the forward value is the
    blended mask while gradients reach the scores through the soft mask.
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], pattern: NMPattern, layer: str = "") -> None:
        super().__init__()
        pattern.check_divides(int(weight_shape[-1]), layer or "layer")
        self.pattern = pattern
        self.layer = layer
        self.score = nn.Parameter(torch.ones(weight_shape), requires_grad=False)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("blend", torch.tensor(0.0))
        self.straight_through = False

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, pattern={self.pattern}, shape={tuple(self.score.shape)}"

    @torch.no_grad()
    def set_scores(self, scores: torch.Tensor) -> None:
        self.score.copy_(scores.to(self.score.dtype))

    @torch.no_grad()
    def set_hard(self, mask: torch.Tensor) -> None:
        """Pin the mask to a given binary mask (one-shot methods): score 1 where kept, 0 where pruned."""
        self.score.copy_(mask.to(self.score.dtype))
        self.blend.fill_(1.0)

    def hard_mask(self) -> torch.Tensor:
        return nm_mask(self.score, self.pattern)

    def soft_mask(self) -> torch.Tensor:
        return soft_nm_mask(self.score, self.pattern, self.temperature)

    def undecided_fraction(self, tol: float = 0.1) -> float:
        """Fraction of groups where some soft value sits between tol and 1 - tol."""
        with torch.no_grad():
            soft = _groups(self.soft_mask(), self.pattern)
            undecided = ((soft > tol) & (soft < 1 - tol)).any(dim=-1)
            return float(undecided.float().mean())

    def entropy(self) -> float:
        """Mean binary entropy (bits) of the soft mask: 0 when fully hardened."""
        with torch.no_grad():
            p = self.soft_mask().clamp(1e-7, 1 - 1e-7)
            h = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            return float(h.mean())

    def forward(self) -> torch.Tensor:
        hard = self.hard_mask().to(self.score.dtype)
        if float(self.blend) >= 1.0 and not self.straight_through:
            return hard
        soft = self.soft_mask()
        mixed = soft + self.blend * (hard - soft)
        if self.straight_through:
            return mixed.detach() + (soft - soft.detach())
        return mixed
