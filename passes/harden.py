"""Hardening: fold each mask, made exact N:M, into its weight in place and drop the mask from the graph.

For every ``sparseforge::apply_mask`` node the pass takes the MaskState's exact projection
(``masks.nm_mask`` of its scores: top-N of every M consecutive inputs, ties to the lower index),
zeroes the pruned entries of the weight *in place* (the graph's weight is the original model's
Parameter, so the model now holds the N:M weight), rewires the matmul to the weight, and deletes
the mask nodes and the MaskState submodule. It then checks the invariant on every hardened weight
and raises :class:`NMInvariantError` if any M-group holds more than N nonzeros.

Registry. The pass records what it hardened on the ORIGINAL model (or on the graph module when
the model is gone), so lowering and checkpointing can find the sparse layers without the graph::

    model._sparseforge_layers = {
        "model.layers.0.mlp.up_proj": {
            "pattern": "2:4",                 # N:M pattern of the hardened weight
            "weight_fqn": "model.layers.0.mlp.up_proj.weight",
            "transposed": False,              # True: weight stored (in, out) (GPT-2 Conv1D)
            "out_features": 1536, "in_features": 576,
        },
        ...
    }

Read it with :func:`sparse_layers`. Groups always run along the input dim (the last dim of the
``(out, in)`` layout; the first dim of a transposed weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from sparseforge_compile.graph_origin import original_model, original_name
from sparseforge_compile.layers import is_conv1d
from sparseforge_compile.masks import MaskState, NMPattern, count_nm_violations

from .base import GraphPass, PassConditionError, PassResult
from .eligibility import LayerInfo
from .insert_masks import MASK_CONTAINER, apply_mask_nodes

REGISTRY_ATTR = "_sparseforge_layers"


class NMInvariantError(RuntimeError):
    """Hardened weights that break the N:M pattern; the pipeline must not go on."""

    def __init__(self, violations: list[tuple[str, tuple[int, ...], int, int]], pattern: NMPattern) -> None:
        self.violations = violations
        lines = [f"{name or '<root>'} {shape}: {bad} of {groups} groups hold more than {pattern.n} nonzeros"
                 for name, shape, bad, groups in violations]
        super().__init__(f"N:M invariant ({pattern}) broken in {len(violations)} layer(s): " + "; ".join(lines))


def sparse_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The registry of hardened layers of a model (empty if none)."""
    return dict(getattr(model, REGISTRY_ATTR, {}) or {})


def _registry_owner(gm: fx.GraphModule) -> nn.Module:
    model = original_model(gm)
    return model if model is not None else gm


def _linear_layout(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


def _resolve(module: nn.Module, layer: str | LayerInfo | Mapping[str, Any]
             ) -> tuple[str, torch.Tensor, bool, str | None]:
    """(name, weight, transposed, registry pattern) of a layer given by name, LayerInfo or registry entry."""
    registry = sparse_layers(module)
    if isinstance(layer, LayerInfo):
        name, fqn, transposed = layer.name, layer.weight_fqn, layer.transposed
    elif isinstance(layer, Mapping):
        name, fqn, transposed = layer["name"], layer["weight_fqn"], bool(layer["transposed"])
    else:
        name, entry = layer, registry.get(layer)
        if entry is not None:
            fqn, transposed = entry["weight_fqn"], bool(entry["transposed"])
        else:
            fqn = f"{layer}.weight"
            transposed = is_conv1d(module.get_submodule(layer))
    spec = layer.get("pattern") if isinstance(layer, Mapping) else registry.get(name, {}).get("pattern")
    prefix = module.meta.get("sparseforge", {}).get("prefix", "") if isinstance(module, fx.GraphModule) else ""
    try:
        return name, module.get_parameter(prefix + fqn), transposed, spec
    except AttributeError:
        pass
    owner = module.get_submodule(prefix + name) if name or prefix else module
    if hasattr(owner, "materialize_weight"):  # lowered to a sparse module: weight held in buffers, (out, in)
        return name, owner.materialize_weight(), False, spec
    raise ValueError(f"{type(module).__name__} has no weight {fqn!r} for layer {name or '<root>'!r}")


def check_nm_invariant(model_or_gm: nn.Module, layers: Iterable[str | LayerInfo | Mapping[str, Any]] | None = None,
                       pattern: NMPattern | str | None = None) -> int:
    """Count M-groups breaking N:M in each layer's weight; raise :class:`NMInvariantError` if any.

    ``layers``: names, LayerInfos or registry entries; None means every layer of the registry.
    ``pattern``: the pattern to check; None means each layer's pattern in the registry (layers
    recorded without one, i.e. unstructured, are skipped). Returns the number of layers checked.
    """
    fixed = NMPattern.parse(pattern) if pattern is not None else None
    owner = original_model(model_or_gm) if isinstance(model_or_gm, fx.GraphModule) else None
    module = owner if owner is not None else model_or_gm
    if layers is None:
        layers = list(sparse_layers(module))
    violations: dict[NMPattern, list] = {}
    checked = 0
    for layer in layers:
        name, weight, transposed, spec = _resolve(module, layer)
        layer_pattern = fixed or (NMPattern.parse(spec) if spec else None)
        if layer_pattern is None:
            continue
        grouped = _linear_layout(weight.detach(), transposed)
        bad = count_nm_violations(grouped, layer_pattern)
        checked += 1
        if bad:
            violations.setdefault(layer_pattern, []).append(
                (name, tuple(grouped.shape), bad, grouped.numel() // layer_pattern.m))
    for layer_pattern, bad_layers in violations.items():
        raise NMInvariantError(bad_layers, layer_pattern)
    return checked


@dataclass
class HardenResult(PassResult):
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # the registry entries written


@dataclass
class Harden(GraphPass):
    """Make every mask exact N:M, fold it into its weight in place, and remove it from the graph."""

    def requires(self, gm: fx.GraphModule) -> None:
        for node in apply_mask_nodes(gm):
            mask_node = node.args[1]
            if not (isinstance(mask_node, fx.Node) and mask_node.op == "call_module"
                    and isinstance(gm.get_submodule(mask_node.target), MaskState)):
                raise PassConditionError(f"Harden: {node.name} does not take its mask from a MaskState module")

    @torch.no_grad()
    def run(self, gm: fx.GraphModule) -> HardenResult:
        entries: dict[str, dict[str, Any]] = {}
        densities = []
        for node in apply_mask_nodes(gm):
            weight_node, mask_node = node.args[0], node.args[1]
            transposed = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("transposed", False))
            state: MaskState = gm.get_submodule(mask_node.target)
            weight = gm.get_parameter(weight_node.target)
            keep = state.hard_mask().to(weight.device)
            grouped = _linear_layout(weight, transposed)
            grouped.masked_fill_(~keep, 0)  # in place: the original model's Parameter
            densities.append(float((grouped != 0).float().mean()))
            node.replace_all_uses_with(weight_node)
            gm.graph.erase_node(node)
            if not mask_node.users:
                gm.graph.erase_node(mask_node)
                gm.delete_submodule(mask_node.target)
            out_f, in_f = state.score.shape
            entries[state.layer] = {"pattern": str(state.pattern), "weight_fqn": original_name(gm, weight_node.target),
                                    "transposed": transposed, "out_features": int(out_f), "in_features": int(in_f)}
        container = getattr(gm, MASK_CONTAINER, None)
        if container is not None and not list(container.children()):
            gm.delete_submodule(MASK_CONTAINER)
        gm.graph.lint()
        gm.recompile()
        owner = _registry_owner(gm)
        if entries:
            setattr(owner, REGISTRY_ATTR, {**sparse_layers(owner), **entries})
        return HardenResult(gm=gm, modified=bool(entries), layers=entries,
                            stats={"hardened": len(entries), "registry_on": type(owner).__name__,
                                   "mean_density": sum(densities) / len(densities) if densities else None,
                                   "patterns": sorted({e["pattern"] for e in entries.values()})})

    def ensures(self, result: PassResult) -> None:
        assert isinstance(result, HardenResult)
        left = apply_mask_nodes(result.gm)
        if left:
            raise PassConditionError(f"Harden: {len(left)} apply_mask nodes left in the graph")
        check_nm_invariant(result.gm, [{"name": name, **entry} for name, entry in result.layers.items()])

