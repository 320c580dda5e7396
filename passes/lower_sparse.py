"""Graph pass: replace Linear calls on hardened N:M weights by ``sparseforge::sparse_linear``.

Works on the graphs that reach a ``torch.compile`` backend (Dynamo, torch 2.11-2.13: parameters
arrive as placeholders matched by position to the example inputs, or as ``get_attr``) and on
exported/ATen graphs. Matched calls: ``torch._C._nn.linear`` / ``F.linear`` / ``aten.linear``
(weight ``(out, in)``), ``torch.addmm`` / ``aten.addmm`` with a 1-D bias and the weight stored
``(in, out)`` (GPT-2 ``Conv1D``), and ``call_module`` on an ``nn.Linear``.

A weight is hardened if it carries ``_sparseforge_pattern`` (then it must be N:M: otherwise an
error names the layer and the number of violating groups) or if it is exactly N:M. The compressed
weight (cuSPARSELt and/or the decode layout, ``DispatchConfig.layout``) becomes buffers of the graph module; the dense weight stays an operand only where dispatch
needs it (some token bucket measured faster dense) or where the sparse kernel does not apply
(CPU, fp32, odd shapes: the op then is a dense matmul, identical to the hardened model).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from sparseforge_compile.errors import UsageError
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.sparse_linear import (
    KernelState,
    build_kernel_state,
    check_nm,
    dense_wins_everywhere,
    is_exact_nm,
)
from sparseforge_compile.masks import NMPattern

from .base import GraphPass, PassConditionError, PassResult

PATTERN_TAG = "_sparseforge_pattern"  # set on a Parameter to declare it hardened
SPARSE_LINEAR = torch.ops.sparseforge.sparse_linear.default
LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
PACKED_PREFIX = "_sparseforge_packed_"

# Kernel state per weight tensor, so that recompiles (new shapes, dynamic dims) reuse the
# compressed weight instead of holding a second copy. Keyed by identity; the version counter
# notices in-place updates.
_STATE_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Fused sibling weights, keyed by the group's first weight: (ids and versions, weight, bias, state).
_FUSED_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class _Match:
    node: fx.Node
    x: Any
    weight_node: fx.Node | None
    bias: Any
    transposed: bool  # weight stored (in, out)
    weight: torch.Tensor | None = None
    name: str = ""


def _layer_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is not None:
        source_name = source.name() if callable(source.name) else source.name  # a method before 2.12
        parts = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", str(source_name))
        if parts:
            name = ".".join(parts)
            return name.removesuffix(".weight")
    if node.op == "get_attr":
        return str(node.target).removesuffix(".weight")
    return node.name


def _resolve_tensor(gm: fx.GraphModule, node: Any, inputs: dict[fx.Node, Any]) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        value = inputs.get(node)
    elif node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
    else:
        return None
    return value if isinstance(value, torch.Tensor) and not isinstance(value, torch.SymInt) else None


def _matches(gm: fx.GraphModule) -> list[_Match]:
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            found.append(_Match(node, node.args[0], weight, bias, transposed=False))
        elif node.op == "call_function" and node.target in ADDMM_TARGETS:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
                continue
            found.append(_Match(node, node.args[1], node.args[2], node.args[0], transposed=True))
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            found.append(_Match(node, node.args[0], None, None, transposed=False))
    return found


def _sibling_groups(eligible: list[tuple[_Match, torch.Tensor | None]]) -> list[list[tuple[_Match, torch.Tensor | None]]]:
    """Eligible Linear calls grouped by what they share: the same input node, input width, dtype,
    device and whether they have a bias (``call_module`` and Conv1D calls stay alone)."""
    groups: dict[tuple, list] = {}
    for match, bias in eligible:
        if match.node.op == "call_module" or match.transposed or not isinstance(match.x, fx.Node):
            key: tuple = (id(match),)
        else:
            w = match.weight
            key = (match.x, int(w.shape[1]), w.dtype, w.device, bias is None)
        groups.setdefault(key, []).append((match, bias))
    return list(groups.values())


def _declare_to_aot(gm: fx.GraphModule, attr: str) -> None:
    """AOTAutograd expects every parameter/buffer of a Dynamo graph to have a Dynamo source (it uses
    them to dedupe inputs and to mark CUDA-graph static inputs); a buffer added here has none, so
    give it a constant source of its own."""
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from torch._dynamo.source import ConstantSource

        sources[attr] = ConstantSource(f"sparseforge_packed_weight:{attr}:{id(gm)}")


def _buffer_node(gm: fx.GraphModule, attr: str, tensor: torch.Tensor | None) -> fx.Node | None:
    """``tensor`` as a new buffer ``attr`` of ``gm`` read by a ``get_attr`` node (None for None)."""
    if tensor is None:
        return None
    gm.register_buffer(attr, tensor, persistent=False)
    _declare_to_aot(gm, attr)
    return gm.graph.get_attr(attr)


@dataclass
class LowerSparseLinears(GraphPass):
    """Lower Linear calls on hardened N:M weights to the sparse op (``run(gm, example_inputs)``).

    ``fuse_siblings``: hardened Linears that read the same input (q/k/v, gate/up) become one sparse
    op on their row-concatenated weight (still N:M: groups run along the input dim) whose output is
    split again: one wider sparse GEMM gains a little more and launches once (benchmarks/results/
    kernels.json, 4096 tokens: q+k+v 12288x4096 1.48x against 1.44x for one 4096x4096; gate+up
    22016x4096 1.52x against 1.51x), and end to end it now pays slightly (e2e.json: prefill 4 x 2048
    1.35x fused vs 1.32x unfused, 1 x 2048 1.35x vs 1.31x; the run before had 1.27x vs 1.31x). Only
    where the sparse kernel applies: the fused weight is a new (compressed) tensor.
    """

    pattern: str = "2:4"
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    fuse_siblings: bool = True

    def __post_init__(self) -> None:
        self._pattern = NMPattern.parse(self.pattern)
        if self.dispatch.layout == "fp8":
            raise UsageError("LowerSparseLinears: layout 'fp8' lowers by module swap; use "
                             "sparseforge_compile.compile(model, dispatch=DispatchConfig(layout='fp8')) (via='lower')")

    def _hardened(self, weight: torch.Tensor, transposed: bool, name: str) -> bool:
        linear = weight.detach().t() if transposed else weight.detach()
        tag = getattr(weight, PATTERN_TAG, None)
        if tag is not None:
            check_nm(linear, NMPattern.parse(tag), name)
            return True
        return is_exact_nm(linear, self._pattern)

    def _state(self, weight: torch.Tensor, transposed: bool, bias: torch.Tensor | None) -> KernelState:
        cached = _STATE_CACHE.get(weight)
        if cached is not None and cached[0] == (weight._version, transposed, self.dispatch.layout):
            return cached[1]
        linear = weight.detach().t() if transposed else weight.detach()
        state = build_kernel_state(linear, bias, self.dispatch)
        _STATE_CACHE[weight] = ((weight._version, transposed, self.dispatch.layout), state)
        return state

    def run(self, gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> PassResult:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = dict(zip(placeholders, example_inputs))
        lowered, fallback, skipped, kept_dense, fused = [], [], [], [], []
        packed_count = sum(1 for name, _ in gm.named_buffers() if name.startswith(PACKED_PREFIX))
        eligible: list[tuple[_Match, torch.Tensor | None]] = []
        for match in _matches(gm):
            if match.node.op == "call_module":
                module = gm.get_submodule(match.node.target)
                match.weight, match.name = module.weight, str(match.node.target)
                bias_t = module.bias
            else:
                match.weight = _resolve_tensor(gm, match.weight_node, inputs)
                match.name = _layer_name(match.weight_node) if isinstance(match.weight_node, fx.Node) else ""
                bias_t = _resolve_tensor(gm, match.bias, inputs) if match.bias is not None else None
            if match.weight is None or match.weight.dim() != 2:
                skipped.append((match.name or match.node.name, "weight is not a parameter of the graph"))
                continue
            if match.transposed and (bias_t is None or bias_t.dim() != 1):
                continue  # a general addmm, not a Conv1D layer
            if not self._hardened(match.weight, match.transposed, match.name):
                continue
            eligible.append((match, bias_t))
        singles = eligible
        if self.fuse_siblings:
            singles = []
            for group in _sibling_groups(eligible):
                if len(group) > 1 and self._fuse(gm, group, packed_count):
                    packed_count += 1
                    names = [m.name for m, _ in group]
                    lowered.extend(names)
                    fused.append(names)
                else:
                    singles.extend(group)
        for match, bias_t in singles:
            state = self._state(match.weight, match.transposed, None if bias_t is None else bias_t.detach())
            if dense_wins_everywhere(state, self.dispatch):
                kept_dense.append(match.name)
                continue
            self._rewrite(gm, match, state, packed_count)
            sparse = state.packed is not None or state.decode is not None
            packed_count += sparse
            (lowered if sparse else fallback).append(match.name)
        if lowered or fallback:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm=gm, modified=bool(lowered or fallback),
                          stats={"sparse": lowered, "dense_fallback": fallback, "skipped": skipped,
                                 "dense_faster": kept_dense, "fused": fused})

    def _fuse(self, gm: fx.GraphModule, group: list[tuple[_Match, torch.Tensor | None]], index: int) -> bool:
        """One sparse op on the concatenated weight of ``group`` (same input), outputs split again.
        False (nothing changed) where the sparse kernel does not apply or dense wins every bucket."""
        weights = [m.weight for m, _ in group]
        biases = [b for _, b in group]
        key = weights[0]
        fingerprint = (tuple(id(w) for w in weights), tuple(w._version for w in weights), self.dispatch.layout)
        cached = _FUSED_CACHE.get(key)
        if cached is not None and cached[0] == fingerprint:
            weight, bias, state = cached[1:]
        else:
            weight = torch.cat([w.detach() for w in weights])
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            state = build_kernel_state(weight, bias, self.dispatch)
            sparse = state.packed is not None or state.decode is not None
            weight = weight if state.keep_dense and sparse else None  # else unused: not kept
            _FUSED_CACHE[key] = (fingerprint, weight, bias, state)
        if (state.packed is None and state.decode is None) or dense_wins_everywhere(state, self.dispatch):
            return False
        graph = gm.graph
        members = {m.node for m, _ in group}
        first = next(n for n in graph.nodes if n in members)
        sizes = [int(w.shape[0]) for w in weights]  # the group's own weights: the fused one may be dropped
        with graph.inserting_before(first):
            attr = f"{PACKED_PREFIX}{index}"
            values, meta = (None, None) if state.decode is None else (state.decode.values, state.decode.meta)
            packed, dense, bias_node, values, meta = (
                _buffer_node(gm, f"{attr}{suffix}", tensor)  # weight is None unless dispatch keeps it
                for suffix, tensor in (("", state.packed), ("_dense", weight), ("_bias", bias), ("_values", values),
                                       ("_meta", meta)))
            new = graph.call_function(SPARSE_LINEAR, (group[0][0].x, packed, dense, bias_node, sum(sizes),
                                                      values, meta))
            parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (new, sizes, -1))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
        new.meta.update({k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for (match, _), out in zip(group, outs):
            out.meta.update(match.node.meta)
            match.node.replace_all_uses_with(out)
            graph.erase_node(match.node)
        return True

    @staticmethod
    def _rewrite(gm: fx.GraphModule, match: _Match, state: KernelState, index: int) -> None:
        graph = gm.graph
        out_features = match.weight.shape[1] if match.transposed else match.weight.shape[0]
        with graph.inserting_before(match.node):
            if match.node.op == "call_module":
                target = str(match.node.target)
                match.weight_node = graph.get_attr(f"{target}.weight") if state.keep_dense else None
                has_bias = gm.get_submodule(target).bias is not None
                match.bias = graph.get_attr(f"{target}.bias") if has_bias else None
            attr = f"{PACKED_PREFIX}{index}"
            packed_node = _buffer_node(gm, attr, state.packed)
            values, meta = (None, None) if state.decode is None else (state.decode.values, state.decode.meta)
            values_node, meta_node = _buffer_node(gm, f"{attr}_values", values), _buffer_node(gm, f"{attr}_meta", meta)
            dense_node = None
            if state.keep_dense:
                dense_node = graph.call_function(torch.t, (match.weight_node,)) if match.transposed \
                    else match.weight_node
            new = graph.call_function(SPARSE_LINEAR, (match.x, packed_node, dense_node, match.bias, out_features,
                                                      values_node, meta_node))
        new.meta.update(match.node.meta)
        match.node.replace_all_uses_with(new)
        graph.erase_node(match.node)

    def ensures(self, result: PassResult) -> None:
        done = len(result.stats["sparse"]) + len(result.stats["dense_fallback"])
        ops = sum(1 for n in result.gm.graph.nodes if n.op == "call_function" and n.target is SPARSE_LINEAR)
        ops += sum(len(group) - 1 for group in result.stats["fused"])  # one op serves a fused group
        if ops < done:
            raise PassConditionError(f"{self.name}: lowered {done} layers but the graph holds {ops} sparse ops")
