"""Wanda (Sun et al. 2023): prune the smallest ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from ..layers import weight_out_in
from ..masks import NMPattern
from .config import OneShotConfig
from .input_stats import LayerInputStats
from .result import PrunedLayer, calibrated_layers
from .select import check_ratio, nm_prune_smallest, prune_count, prune_smallest


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and the input-feature norms ``(in,)``."""
    return weight.detach().abs().float() * feature_norms.to(weight.device, torch.float32).reshape(1, -1)


def wanda_keep_mask(weight: torch.Tensor, feature_norms: torch.Tensor, pattern: NMPattern | None,
                    sparsity: float | None = None) -> torch.Tensor:
    """Wanda's keep-mask: N:M per group, else the smallest ``sparsity`` of each output row."""
    scores = wanda_scores(weight, feature_norms)
    if pattern is not None:
        return ~nm_prune_smallest(scores, pattern)
    return ~prune_smallest(scores, prune_count(check_ratio(sparsity), scores.shape[1]), per_row=True)


class WandaPruner:
    """Wanda for the sequential driver: input norms per layer (and X X^T when the error is measured)."""

    name = "wanda"

    def __init__(self, targets: dict[str, nn.Module], pattern: NMPattern | None, sparsity: float | None,
                 config: OneShotConfig) -> None:
        self.targets, self.pattern, self.sparsity, self.config = targets, pattern, sparsity, config

    def new_stats(self, name: str, in_features: int) -> LayerInputStats:
        return LayerInputStats(in_features, gram=self.config.measure_error, norms=True, layer=name)

    @torch.no_grad()
    def prune_layers(self, names: list[str], collected: dict[str, LayerInputStats]) -> Iterator[PrunedLayer]:
        """Prune each layer in place from its own input norms, handing over its statistics as it goes."""
        for name in names:
            stats = {name: collected.pop(name)}
            t0 = time.perf_counter()
            weight = weight_out_in(self.targets[name])
            dense = [weight.float().clone()] if self.config.measure_error else None
            keep = wanda_keep_mask(weight, stats[name].feature_norms(), self.pattern, self.sparsity)
            weight.mul_(keep)
            gram = stats[name].hessian if self.config.measure_error else None
            yield from calibrated_layers([name], [weight], [keep], stats, seconds=time.perf_counter() - t0,
                                         dense=dense, gram=gram)
