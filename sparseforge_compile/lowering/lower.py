"""Eager lowering: swap each hardened ``nn.Linear`` (and GPT-2 ``Conv1D``) in place for a
:class:`SparseLinear`, so the model runs 2:4 kernels in eager mode, under ``torch.compile`` and in
Hugging Face ``generate()``.

Which layers: an explicit ``layers=`` list, else the hardening registry
``model._sparseforge_layers`` (``{name: {"pattern": "2:4", "transposed": bool, ...}}``), else every
Linear/Conv1D whose weight is exactly N:M. Every selected weight is checked before any module is
touched, so a bad weight raises (naming the layer and the number of violating groups) and leaves
the model as it was.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from ..masks import NMPattern
from .dispatch import DispatchConfig
from .fp8_linear import Fp8Linear
from .sparse_linear import SparseLinear, check_nm, dense_wins_everywhere, is_exact_nm

TWO_FOUR = NMPattern(2, 4)
REGISTRY_ATTR = "_sparseforge_layers"
DENSE_FASTER = "dense-faster"
DENSE_FASTER_REASON = "cuBLAS measured faster than the sparse kernel at every token count"
LOWERED_ATTR = "_sparseforge_lowered"


@dataclass
class LayerLowering:
    name: str
    out_features: int
    in_features: int
    dtype: str
    device: str
    # "cusparselt", "decode", "cusparselt+decode", "fp8-<backend>", "dense-fallback" (unsupported) or
    # "dense-faster" (left a dense Linear)
    kernel: str
    reason: str | None  # why it fell back to dense, if it did
    dense_copy: bool  # kept the dense weight next to the compressed one (some bucket runs dense)
    dense_buckets: tuple[int, ...]
    bytes_compressed: int
    bytes_dense_copy: int
    bytes_dense_fallback: int
    bytes_dense: int  # what the dense weight takes


@dataclass
class LoweringReport:
    pattern: str
    layers: list[LayerLowering] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparse_layers(self) -> int:
        """Layers that run a sparse (or FP8) kernel: every kernel but the dense ones."""
        return sum(layer.kernel not in ("dense-fallback", DENSE_FASTER) for layer in self.layers)

    @property
    def dense_faster_layers(self) -> int:
        return sum(layer.kernel == DENSE_FASTER for layer in self.layers)

    @property
    def fallback_layers(self) -> int:
        return sum(layer.kernel == "dense-fallback" for layer in self.layers)

    @property
    def held_bytes(self) -> int:
        return sum(x.bytes_compressed + x.bytes_dense_copy + x.bytes_dense_fallback for x in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.bytes_dense for layer in self.layers)

    @property
    def memory_ratio(self) -> float:
        """Weight bytes the lowered layers hold over what their dense weights take."""
        return self.held_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "sparse_layers": self.sparse_layers,
                "fallback_layers": self.fallback_layers, "dense_faster_layers": self.dense_faster_layers,
                "held_bytes": self.held_bytes,
                "dense_bytes": self.dense_bytes, "memory_ratio": self.memory_ratio, "seconds": self.seconds,
                "warnings": list(self.warnings), "layers": [asdict(layer) for layer in self.layers]}

    def summary(self) -> str:
        kernels = sorted({layer.kernel for layer in self.layers} - {"dense-fallback", DENSE_FASTER})
        lines = [f"lowered {len(self.layers)} layers to {self.pattern}: {self.sparse_layers} on "
                 f"{'/'.join(kernels) or 'sparse kernels'}, "
                 f"{self.fallback_layers} dense fallback, {self.dense_faster_layers} left dense (cuBLAS faster); weights {self.held_bytes / 2**20:.1f} MiB held vs "
                 f"{self.dense_bytes / 2**20:.1f} MiB dense ({self.memory_ratio:.3f}x) in {self.seconds:.1f}s"]
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_lowerable(module: nn.Module) -> tuple[bool, bool]:
    """(is a Linear-like layer, its weight is stored (in, out))."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return True, True
    return isinstance(module, nn.Linear), False


def _linear_weight(module: nn.Module, transposed: bool):
    return module.weight.detach().t() if transposed else module.weight.detach()


def _select(model: nn.Module, layers: Iterable[str] | Mapping[str, object] | None,
            pattern: NMPattern) -> tuple[list[tuple[str, nn.Module, bool, NMPattern]], bool]:
    """The layers to lower as (name, module, transposed, pattern), and whether the choice was explicit."""
    registry = getattr(model, REGISTRY_ATTR, None)
    if layers is None and isinstance(registry, Mapping) and registry:
        layers = registry
    if layers is None:
        found = []
        for name, module in model.named_modules():
            lowerable, transposed = _is_lowerable(module)
            if lowerable and is_exact_nm(_linear_weight(module, transposed), pattern):
                found.append((name, module, transposed, pattern))
        return found, False
    selected = []
    for name in layers:
        info = layers[name] if isinstance(layers, Mapping) else None
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{name}: no such layer in {type(model).__name__} (listed for lowering)") from exc
        if isinstance(module, (SparseLinear, Fp8Linear)):
            continue  # already lowered
        lowerable, transposed = _is_lowerable(module)
        if not lowerable:
            raise ValueError(f"{name}: a {type(module).__name__} cannot be lowered; only nn.Linear and GPT-2 "
                             f"Conv1D layers can")
        layer_pattern = pattern
        if isinstance(info, Mapping) and info.get("pattern"):
            layer_pattern = NMPattern.parse(info["pattern"])
        selected.append((name, module, transposed, layer_pattern))
    return selected, True


def lower_model(model: nn.Module, layers: Iterable[str] | Mapping[str, object] | None = None,
                pattern: NMPattern | str = TWO_FOUR, config: DispatchConfig | None = None) -> LoweringReport:
    """Replace hardened layers of ``model`` in place by :class:`SparseLinear` modules.

    Raises :class:`~sparseforge_compile.errors.NMViolationError` (naming the layer and the
    number of violating groups) if a selected weight is not N:M; the model is then unchanged.
    Layers whose device or dtype the sparse kernel does not take run a dense matmul with the masked
    weight: noted in the report, with one warning. ``config.layout`` picks what the layers store
    (:class:`DispatchConfig`); ``"fp8"`` swaps in :class:`~.fp8_linear.Fp8Linear` modules.
    """
    start = time.perf_counter()
    pattern = NMPattern.parse(pattern)
    config = config or DispatchConfig()
    targets, explicit = _select(model, layers, pattern)
    for name, module, transposed, layer_pattern in targets:  # validate all before changing anything
        check_nm(_linear_weight(module, transposed), layer_pattern, name)
    report = LoweringReport(pattern=str(pattern))
    if not targets:
        report.warnings.append("no hardened layers found: nothing was lowered" if not explicit
                               else "no layers left to lower")
    fallbacks: dict[str, list[str]] = {}
    for name, module, transposed, layer_pattern in targets:
        bias = module.bias.detach() if module.bias is not None else None
        layer_type = Fp8Linear if config.layout == "fp8" else SparseLinear
        lowered = layer_type.from_dense(module.weight, bias, layer_pattern, layer=name, transposed=transposed,
                                        config=config)
        held = lowered.weight_bytes()
        state = lowered.state
        if dense_wins_everywhere(state, config):
            # cuBLAS won every bucket: the op would only add its call overhead (lowered_smollm2-135m.json)
            report.layers.append(LayerLowering(
                name=name, out_features=lowered.out_features, in_features=lowered.in_features,
                dtype=str(module.weight.dtype).replace("torch.", ""), device=str(module.weight.device),
                kernel=DENSE_FASTER, reason=DENSE_FASTER_REASON, dense_copy=False, dense_buckets=state.dense_buckets,
                bytes_compressed=0, bytes_dense_copy=0, bytes_dense_fallback=held["dense_reference"],
                bytes_dense=held["dense_reference"]))
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lowered)
        report.layers.append(LayerLowering(
            name=name, out_features=lowered.out_features, in_features=lowered.in_features,
            dtype=str(module.weight.dtype).replace("torch.", ""), device=str(module.weight.device),
            kernel=state.kernel, reason=state.fallback_reason,
            dense_copy=held["dense_copy"] > 0, dense_buckets=state.dense_buckets,
            bytes_compressed=held["compressed"], bytes_dense_copy=held["dense_copy"],
            bytes_dense_fallback=held["dense_fallback"], bytes_dense=held["dense_reference"]))
        if state.fallback_reason:
            fallbacks.setdefault((state.kernel, state.fallback_reason), []).append(name)
    kept = [layer.name for layer in report.layers if layer.kernel == DENSE_FASTER]
    if kept:
        report.warnings.append(f"{len(kept)} layer(s) left as dense Linears, {DENSE_FASTER_REASON}: "
                               f"{', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}")
    for (kernel, reason), names in fallbacks.items():
        what = "a dense matmul with the masked weight" if kernel == "dense-fallback" else kernel
        report.warnings.append(f"{len(names)} layer(s) run {what} ({reason}): "
                               f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    if fallbacks:
        warnings.warn("sparseforge lowering: " + "; ".join(report.warnings), stacklevel=2)
    lowered_map = dict(getattr(model, LOWERED_ATTR, {}) or {})
    lowered_map.update({layer.name: layer.kernel for layer in report.layers if layer.kernel != DENSE_FASTER})
    setattr(model, LOWERED_ATTR, lowered_map)
    report.seconds = time.perf_counter() - start
    return report
