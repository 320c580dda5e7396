"""SparseGPT (Frantar & Alistarh 2023): Optimal Brain Surgeon column by column with lazy batch updates,
from the layer's Hessian ``2 X X^T``; the kept weights absorb each pruned weight's error."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruneError
from ..layers import weight_out_in
from ..masks import NMPattern
from .config import OneShotConfig
from .input_stats import LayerInputStats
from .result import PrunedLayer, calibrated_layers
from .select import check_ratio, nm_prune_smallest, prune_count, prune_smallest

log = logging.getLogger(__name__)

# With percdamp 0 a failing Cholesky has nothing to multiply by 10; retries start here instead.
MIN_RETRY_PERCDAMP = 1e-4


@dataclass
class SparseGPTLayerResult:
    weight: torch.Tensor  # (out, in) fp32, pruned entries zero, kept entries updated
    keep: torch.Tensor  # bool (out, in)
    damping: float
    percdamp: float
    damping_retries: int
    dead_inputs: int
    loss: float  # the algorithm's own OBS error estimate, sum over rows of sum (w - q)^2 / d^2 / 2


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float, max_retries: int, growth: float,
                               layer: str, shape: tuple[int, int]) -> tuple[torch.Tensor, float, float, int]:
    """Upper Cholesky factor of (H + damp I)^-1, damping more after each failed factorization.

    Adds the damping to ``hessian``'s diagonal in place. Returns (factor, damp, percdamp, retries).
    """
    mean_diag = float(hessian.diagonal().mean())
    relative, applied, retries = percdamp, 0.0, 0
    while True:
        damp = relative * mean_diag
        hessian.diagonal().add_(damp - applied)
        applied = damp
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper.diagonal()).all()):
                return upper, damp, relative, retries
        if retries >= max_retries:
            raise PruneError(
                f"{layer}: the {shape[1]}x{shape[1]} Hessian of this {shape[0]}x{shape[1]} layer is not positive "
                f"definite even with percdamp {relative:g} after {retries} retries; use more calibration data, "
                f"raise percdamp, or exclude the layer"
            )
        retries += 1
        next_relative = max(relative * growth, MIN_RETRY_PERCDAMP)
        log.warning("%s: Cholesky of the %dx%d Hessian failed with percdamp %g (damping %.4g); retrying with "
                    "percdamp %g", layer, shape[1], shape[1], relative, damp, next_relative)
        relative = next_relative


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, *, pattern: NMPattern | None,
                           sparsity: float | None = None, blocksize: int = 128, percdamp: float = 0.01,
                           max_damp_retries: int = 6, damp_growth: float = 10.0,
                           layer: str = "layer") -> SparseGPTLayerResult:
    """SparseGPT's ``fasterprune`` on one ``(out, in)`` weight with its Hessian ``2 X X^T`` ``(in, in)``.

    ``hessian`` is consumed: it is modified in place (dead columns, damping). The weight is not
    touched; the pruned and updated weight comes back in fp32 on the Hessian's device.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise PruneError(f"{layer}: Hessian of shape {tuple(hessian.shape)} does not match the {rows}x{cols} weight")
    if not bool(torch.isfinite(hessian).all()):
        raise PruneError(
            f"{layer}: the Hessian of this {rows}x{cols} layer holds NaN/inf, so its calibration inputs overflowed; "
            f"run the calibration in fp32 or exclude the layer"
        )
    if pattern is not None:
        pattern.check_divides(cols, layer)
        if blocksize % pattern.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for pattern {pattern}")
    else:
        sparsity = check_ratio(sparsity)
    W = weight.detach().to(device=hessian.device, dtype=torch.float32, copy=True)
    H = hessian if hessian.dtype == torch.float32 else hessian.float()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    hinv, damp, relative, retries = _upper_cholesky_of_inverse(
        H, percdamp, max_damp_retries, damp_growth, layer, (rows, cols))
    del H

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d1 = Hinv1.diagonal()
        if pattern is None:
            # Unstructured: the block's share of the layer's exact prune count, by w^2 / d^2.
            count = prune_count(sparsity, rows * i2) - prune_count(sparsity, rows * i1)
            prune1 = prune_smallest(W1.square() / d1.square(), count)
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                # Select on the weights as updated by the errors of the columns before them.
                scores = W1[:, i : i + pattern.m].square() / d1[i : i + pattern.m].square()
                prune1[:, i : i + pattern.m] = nm_prune_smallest(scores, pattern)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        loss += Err1.square().sum() / 2  # sum of (w - q)^2 / d^2 / 2
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1.0)  # the lazy batch update
        keep[:, i1:i2] = ~prune1
    return SparseGPTLayerResult(weight=W, keep=keep, damping=damp, percdamp=relative, damping_retries=retries,
                                dead_inputs=int(dead.sum()), loss=float(loss))


class SparseGPT:
    """SparseGPT on one weight, as in the reference: ``add_batch`` the layer's inputs, then ``prune``.

    The weight may be several layers that read the same input, stacked row-wise (rows are independent
    given H^-1). ``stats``: inputs already accumulated elsewhere (the Gram matrix is used).
    """

    def __init__(self, in_features: int, *, layer: str = "layer", stats: LayerInputStats | None = None) -> None:
        self.layer = layer
        self.stats = stats if stats is not None else LayerInputStats(in_features, gram=True, norms=False,
                                                                     layer=layer)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate ``(batch, seq, in)`` or ``(tokens, in)`` inputs into ``H = 2 X X^T``."""
        self.stats.add_batch(inputs)

    def prune(self, weight: torch.Tensor, *, pattern: NMPattern | None, sparsity: float | None = None,
              blocksize: int = 128, percdamp: float = 0.01, max_damp_retries: int = 6,
              damp_growth: float = 10.0) -> SparseGPTLayerResult:
        """Prune an ``(out, in)`` weight (left untouched: the result holds the new one); uses up the Hessian."""
        return sparsegpt_prune_weight(weight, self.stats.take_hessian(), pattern=pattern, sparsity=sparsity,
                                      blocksize=blocksize, percdamp=percdamp, max_damp_retries=max_damp_retries,
                                      damp_growth=damp_growth, layer=self.layer)


def shared_input_groups(names: list[str], collected: dict[str, LayerInputStats]) -> list[list[str]]:
    """``names`` grouped by identical Hessians, in order of first appearance: layers that read the same
    input (q/k/v, gate/up) get bitwise-equal ones, since the same tokens were accumulated the same way,
    and SparseGPT then prunes them as one stacked weight: one Cholesky and one column loop instead of three."""
    groups: list[list[str]] = []
    for name in names:
        stats = collected[name]
        for group in groups:
            first = collected[group[0]]
            if (first.in_features == stats.in_features and first.ntokens == stats.ntokens
                    and first.nsamples == stats.nsamples and torch.equal(first.hessian, stats.hessian)):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


class SparseGPTPruner:
    """SparseGPT for the sequential driver: X X^T per layer, layers with one input pruned as one weight."""

    name = "sparsegpt"

    def __init__(self, targets: dict[str, nn.Module], pattern: NMPattern | None, sparsity: float | None,
                 config: OneShotConfig) -> None:
        self.targets, self.pattern, self.sparsity, self.config = targets, pattern, sparsity, config

    def new_stats(self, name: str, in_features: int) -> LayerInputStats:
        return LayerInputStats(in_features, gram=True, norms=False, layer=name)

    def prune_layers(self, names: list[str], collected: dict[str, LayerInputStats]) -> Iterator[PrunedLayer]:
        """Prune in place, group by group, handing over each group's statistics as it goes."""
        for group in shared_input_groups(names, collected):
            yield from self._prune_group(group, {n: collected.pop(n) for n in group})

    @torch.no_grad()
    def _prune_group(self, names: list[str], collected: dict[str, LayerInputStats]) -> list[PrunedLayer]:
        """Layers with one shared Hessian, their weights stacked row-wise: each row's result is what pruning
        its own layer alone gives (up to the summation order of the lazy batch updates)."""
        t0 = time.perf_counter()
        config = self.config
        weights = [weight_out_in(self.targets[n]) for n in names]
        label = " + ".join(names)
        dense = [w.float().clone() for w in weights] if config.measure_error else None
        if len({(w.dtype, w.device) for w in weights}) > 1:
            raise PruneError(f"{label}: these layers share their input but not dtype/device "
                             f"({', '.join(f'{w.dtype} on {w.device}' for w in weights)}); put the block on one dtype")
        pruner = SparseGPT(int(weights[0].shape[1]), layer=label, stats=collected[names[0]])
        gram = pruner.stats.hessian.clone() if config.measure_error else None
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        result = pruner.prune(stacked, pattern=self.pattern, sparsity=self.sparsity, blocksize=config.blocksize,
                              percdamp=config.percdamp, max_damp_retries=config.max_damp_retries,
                              damp_growth=config.damp_growth)
        keeps, row = [], 0
        for weight in weights:
            rows = slice(row, row + weight.shape[0])
            row += weight.shape[0]
            weight.copy_(result.weight[rows])
            keeps.append(result.keep[rows].clone())  # its own storage: a saved view would save the group's
        return calibrated_layers(names, weights, keeps, collected, seconds=time.perf_counter() - t0, dense=dense,
                                 gram=gram, damping=result.damping, percdamp=result.percdamp,
                                 damping_retries=result.damping_retries, dead_inputs=result.dead_inputs)
