"""Which layers a checkpoint records as N:M: detected from the weights, or the model's registry,
each checked to be exactly N:M before anything is written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..layers import grouped_weight, is_conv1d, stored_weight
from ..masks import NMPattern, count_nm_violations


def detect_nm_layers(model: nn.Module, pattern: NMPattern | str) -> dict[str, dict]:
    """Every Linear / Conv1D whose weight is exactly ``pattern`` sparse (holds no group with > N nonzeros)."""
    pattern = NMPattern.parse(pattern)
    found: dict[str, dict] = {}
    for name, module in model.named_modules():
        transposed = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or transposed):
            continue
        grouped = grouped_weight(module.weight, transposed)
        if grouped.shape[-1] % pattern.m == 0 and count_nm_violations(grouped, pattern) == 0:
            found[name] = {"pattern": str(pattern), "transposed": transposed}
    return found


def jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def resolve_layers(model: nn.Module, layers: Mapping[str, Mapping] | Iterable[str] | None = None,
                   pattern: NMPattern | str | None = None) -> dict[str, dict]:
    """The pruned layers to record: ``layers`` if given, else ``model._sparseforge_layers``, else (only
    when ``pattern`` is given) those detected by :func:`detect_nm_layers`.

    Every entry is checked: the module exists, has a 2-D weight, and the weight is exactly N:M.
    """
    source = layers if layers is not None else getattr(model, "_sparseforge_layers", None)
    if source is None:
        if pattern is None:
            raise CheckpointError(
                "the model records no N:M layers (no model._sparseforge_layers): harden it with the sparsify "
                "pipeline, or pass layers={name: {'pattern': '2:4'}} or pattern='2:4' to detect them")
        source = detect_nm_layers(model, pattern)
    if not isinstance(source, Mapping):
        default = str(NMPattern.parse(pattern or "2:4"))
        source = {name: {"pattern": default} for name in source}
    if not source:
        raise CheckpointError("no N:M layers to save: the model has no pruned Linear layers")
    resolved: dict[str, dict] = {}
    for name, entry in source.items():
        entry = dict(entry or {})
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"layer {name!r} listed as N:M is not a submodule of the model") from exc
        weight = stored_weight(module)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CheckpointError(f"layer {name!r} ({type(module).__name__}) has no 2-D weight to store as N:M")
        layer_pattern = NMPattern.parse(entry.get("pattern") or pattern or "2:4")
        transposed = bool(entry.get("transposed", is_conv1d(module)
                                    or getattr(module, "transposed_source", False)))
        grouped = grouped_weight(weight, transposed)
        layer_pattern.check_divides(grouped.shape[-1], name)
        violations = count_nm_violations(grouped, layer_pattern)
        if violations:
            raise CheckpointError(
                f"layer {name!r} {tuple(weight.shape)}: {violations} groups hold more than {layer_pattern.n} "
                f"nonzeros of {layer_pattern.m}, so it is not {layer_pattern} sparse; harden it first or leave "
                f"it out of the N:M layers")
        kept = int((grouped != 0).sum())
        resolved[name] = {**{k: jsonable(v) for k, v in entry.items()}, "pattern": str(layer_pattern),
                          "transposed": transposed, "shape": list(weight.shape),
                          "density": kept / weight.numel()}
    return resolved
