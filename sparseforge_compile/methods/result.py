"""What a one-shot prune reports: per-layer statistics and the run's result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .input_stats import LayerInputStats


@dataclass
class LayerPruneStats:
    name: str
    out_features: int
    in_features: int
    sparsity: float  # achieved: fraction of mask entries pruned
    seconds: float
    reconstruction_error: float | None = None  # ||W X - W' X||_F^2 / ||W X||_F^2 over the calibration tokens
    damping: float | None = None  # SparseGPT: absolute value added to diag(H)
    percdamp: float | None = None  # SparseGPT: damping relative to mean(diag(H)) actually used
    damping_retries: int = 0  # SparseGPT: Cholesky failures before damping was enough
    dead_inputs: int = 0  # SparseGPT: input features that were zero on every calibration token
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    pruned_with: str = ""  # SparseGPT: the layers (comma-separated) with its input, pruned as one stacked weight


# One pruned layer as the methods hand it to the driver: its name, bool keep-mask and statistics.
PrunedLayer = tuple[str, torch.Tensor, LayerPruneStats]


@dataclass
class OneShotResult:
    method: str
    pattern: str | None  # "2:4", or None for unstructured
    target_sparsity: float
    masks: dict[str, torch.Tensor]  # layer name -> bool keep-mask, (out_features, in_features)
    layers: dict[str, LayerPruneStats]
    seconds: float
    device: str
    peak_memory_bytes: int | None  # CUDA: max allocated during the call; CPU: process peak RSS
    peak_memory_kind: str  # "cuda_max_allocated" or "process_peak_rss"
    calibration_shape: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights over all pruned layers."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_rows(self) -> list[dict]:
        """Flat per-layer rows for a results file."""
        return [{"method": self.method, "pattern": self.pattern, **asdict(s)} for s in self.layers.values()]

    def summary(self) -> dict:
        errors = [s.reconstruction_error for s in self.layers.values() if s.reconstruction_error is not None]
        return {"method": self.method, "pattern": self.pattern, "target_sparsity": self.target_sparsity,
                "sparsity": self.sparsity, "layers": len(self.layers), "seconds": self.seconds,
                "device": self.device, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_kind": self.peak_memory_kind,
                "mean_reconstruction_error": sum(errors) / len(errors) if errors else None,
                "damping_retries": sum(s.damping_retries for s in self.layers.values())}


def layer_stats(name: str, keep: torch.Tensor, seconds: float, **extra: object) -> LayerPruneStats:
    """A layer's statistics from its keep-mask ``(out, in)``."""
    return LayerPruneStats(name=name, out_features=int(keep.shape[0]), in_features=int(keep.shape[1]),
                           sparsity=1.0 - float(keep.float().mean()), seconds=seconds, **extra)


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||W X - W' X||_F^2 / ||W X||_F^2`` from the Gram matrix ``G ~ X X^T`` (any positive scale)."""
    dense = dense.detach().to(gram.device, torch.float32)
    delta = dense - pruned.detach().to(gram.device, torch.float32)
    num = float(((delta @ gram) * delta).sum())
    den = float(((dense @ gram) * dense).sum())
    return num / den if den > 0 else float("nan")


def calibrated_layers(names: list[str], weights: list[torch.Tensor], keeps: list[torch.Tensor],
                      collected: dict[str, LayerInputStats], *, seconds: float, dense: list[torch.Tensor] | None,
                      gram: torch.Tensor | None, **extra: object) -> list[PrunedLayer]:
    """Statistics of layers pruned together from one calibration (one layer, or several sharing an input),
    each layer's input statistics freed; with ``gram``, each layer's reconstruction error against ``dense``."""
    total_rows = sum(w.shape[0] for w in weights)
    out = []
    for i, (name, weight, keep) in enumerate(zip(names, weights, keeps)):
        layer_extra = {**extra, "calibration_tokens": collected[name].ntokens,
                       "pruned_with": ",".join(n for n in names if n != name)}
        if gram is not None:
            layer_extra["reconstruction_error"] = reconstruction_error(dense[i], weight, gram)
        collected[name].free()
        # A group's time, shared out by rows.
        out.append((name, keep, layer_stats(name, keep, seconds * weight.shape[0] / total_rows, **layer_extra)))
    return out
