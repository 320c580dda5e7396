"""One-shot peer pruning methods: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar &
Alistarh 2023), each as its paper and reference implementation define it.

``prune_oneshot`` prunes a model's weights in place and returns the keep-masks in
``(out_features, in_features)`` layout (also for GPT-2's ``Conv1D``, whose weight is stored
``(in, out)``). N:M groups are M consecutive *input* features, as in :mod:`sparseforge_compile.masks`.
Wanda and SparseGPT calibrate sequentially, block by block (:mod:`.calibration`).
"""

from __future__ import annotations

import resource
import time

import torch
from torch import nn

from ..layers import prunable_modules
from ..masks import NMPattern
from .calibration import (
    BlockInputs,
    BlockPruner,
    calibration_mode,
    capture_block_inputs,
    prune_sequential,
    validate_calib,
)
from .config import OneShotConfig
from .input_stats import LayerInputStats
from .magnitude import magnitude_keep_mask, prune_magnitude
from .result import LayerPruneStats, OneShotResult, reconstruction_error
from .select import check_ratio, nm_prune_smallest
from .sparsegpt import SparseGPT, SparseGPTLayerResult, SparseGPTPruner, sparsegpt_prune_weight
from .wanda import WandaPruner, wanda_keep_mask, wanda_scores

__all__ = [
    "CALIBRATED_METHODS", "DEFAULT_PATTERN", "METHODS", "BlockInputs", "BlockPruner", "LayerInputStats",
    "LayerPruneStats", "OneShotConfig", "OneShotResult", "SparseGPT", "SparseGPTLayerResult", "SparseGPTPruner",
    "WandaPruner",
    "calibration_mode", "capture_block_inputs", "magnitude_keep_mask", "nm_prune_smallest", "prune_oneshot",
    "reconstruction_error", "sparsegpt_prune_weight", "wanda_keep_mask", "wanda_scores",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")
DEFAULT_PATTERN = NMPattern(2, 4)
_PRUNERS: dict[str, type[WandaPruner] | type[SparseGPTPruner]] = {"wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def prune_oneshot(model: nn.Module, method: str, *, pattern: NMPattern | str | None = DEFAULT_PATTERN,
                  sparsity: float | None = None, calib: torch.Tensor | None = None, layers: list[str] | None = None,
                  config: OneShotConfig | None = None, progress: bool = True) -> OneShotResult:
    """Prune ``model`` in place with ``method`` ("magnitude" | "wanda" | "sparsegpt").

    ``pattern``: N:M groups of consecutive input features; pass ``pattern=None`` and a ``sparsity``
    ratio for unstructured pruning (per layer for magnitude and SparseGPT, per output row for Wanda).
    ``calib``: ``(nsamples, seqlen)`` token ids, needed by Wanda and SparseGPT.
    ``layers``: qualified module names; default every Linear / Conv1D inside the decoder blocks.
    """
    config = config or OneShotConfig()
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    pattern = NMPattern.parse(pattern) if pattern is not None else None
    if pattern is not None and sparsity is not None:
        raise ValueError(f"give either pattern ({pattern}) or sparsity ({sparsity}): pass pattern=None for "
                         f"unstructured pruning at a ratio")
    if pattern is None:
        sparsity = check_ratio(sparsity)
    if method == "sparsegpt" and pattern is not None and config.blocksize % pattern.m:
        raise ValueError(f"blocksize {config.blocksize} must be a multiple of M={pattern.m} for pattern {pattern}")
    device = torch.device(config.device) if config.device is not None else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here: use device='cpu'")
    targets = prunable_modules(model, layers, pattern)
    calib = validate_calib(model, calib, method) if method in CALIBRATED_METHODS else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with calibration_mode(model):
        if method == "magnitude":
            stats, masks = prune_magnitude(targets, pattern, sparsity, device, progress)
        else:
            pruner = _PRUNERS[method](targets, pattern, sparsity, config)
            stats, masks = prune_sequential(model, pruner, targets, calib, config.batch_size, device, progress,
                                            desc=f"{method} {pattern or sparsity}")
    seconds = time.perf_counter() - start
    peak, kind = _peak_memory(device)
    return OneShotResult(method=method, pattern=str(pattern) if pattern is not None else None,
                         target_sparsity=1.0 - pattern.density if pattern is not None else float(sparsity),
                         masks=masks, layers=stats, seconds=seconds, device=str(device), peak_memory_bytes=peak,
                         peak_memory_kind=kind,
                         calibration_shape=tuple(calib.shape) if calib is not None else None)
