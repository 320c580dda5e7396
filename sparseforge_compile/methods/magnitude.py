"""Magnitude pruning: drop the smallest |W|, no calibration."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import weight_out_in
from ..masks import NMPattern
from .result import LayerPruneStats, layer_stats
from .select import check_ratio, nm_prune_smallest, prune_count, prune_smallest


def magnitude_keep_mask(weight: torch.Tensor, pattern: NMPattern | None,
                        sparsity: float | None = None) -> torch.Tensor:
    """Keep-mask by |W| of an ``(out, in)`` weight: N:M per group, else the smallest ``sparsity`` of the layer."""
    scores = weight.detach().abs()
    if pattern is not None:
        return ~nm_prune_smallest(scores, pattern)
    return ~prune_smallest(scores, prune_count(check_ratio(sparsity), scores.numel()))


@torch.no_grad()
def prune_magnitude(targets: dict[str, nn.Module], pattern: NMPattern | None, sparsity: float | None,
                    device: torch.device, progress: bool) -> tuple[dict[str, LayerPruneStats],
                                                                   dict[str, torch.Tensor]]:
    """Prune every layer of ``targets`` in place, its mask chosen on ``device``; (statistics, keep-masks)."""
    stats: dict[str, LayerPruneStats] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, module in tqdm(targets.items(), desc="magnitude", disable=not progress, unit="layer"):
        t0 = time.perf_counter()
        weight = weight_out_in(module)
        keep = magnitude_keep_mask(weight.to(device), pattern, sparsity).to(weight.device)
        weight.mul_(keep)
        masks[name] = keep
        stats[name] = layer_stats(name, keep, time.perf_counter() - t0)
    return stats, masks
