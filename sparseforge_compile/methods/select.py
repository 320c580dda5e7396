"""Choosing which weights to prune: the M-N smallest scores of every N:M group, or exactly a count of
the smallest scores of a layer or of each row, ties always going to the lower index."""

from __future__ import annotations

import math

import torch

from ..masks import NMPattern


def prune_smallest(scores: torch.Tensor, count: int, per_row: bool = False) -> torch.Tensor:
    """Bool mask (True = prune) of exactly ``count`` smallest scores, of the whole tensor or of each row.

    A stable sort makes ties go to the lower index; NaN scores are pruned first.
    """
    scores = torch.nan_to_num(scores.float(), nan=-torch.inf)
    prune = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count <= 0:
        return prune
    if per_row:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        return prune.scatter_(1, order, True)
    order = torch.sort(scores.flatten(), stable=True).indices[:count]
    return prune.view(-1).index_fill_(0, order, True).view(scores.shape)


def nm_prune_smallest(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Bool mask (True = prune) of the M-N smallest scores of every M consecutive inputs.

    Among equal scores the lower index is pruned first: the set that the references'
    ``torch.topk(scores, M - N, largest=False)`` selects on CUDA (radix select, ties taken in index
    order). Ties are common in quantized checkpoints, where the rule moves perplexity
    (benchmarks/results/magnitude_ties.json).
    """
    pattern.check_divides(int(scores.shape[-1]), "scores")
    groups = torch.nan_to_num(scores.detach().float(), nan=-torch.inf).reshape(-1, pattern.m)
    order = torch.sort(groups, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
    prune = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    return prune.scatter_(1, order, True).reshape(scores.shape)


def prune_count(sparsity: float, total: int) -> int:
    """How many of ``total`` weights a ``sparsity`` ratio prunes, rounded half up."""
    return int(math.floor(sparsity * total + 0.5))


def check_ratio(sparsity: float | None) -> float:
    """``sparsity`` as a float, refused unless it is a ratio in [0, 1)."""
    if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"unstructured sparsity {sparsity!r} must be a ratio in [0, 1), e.g. 0.5")
    return float(sparsity)
