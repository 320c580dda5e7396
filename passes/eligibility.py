"""Eligibility analysis: which weight matmuls of a captured graph can become N:M sparse, and why not.

Every matmul whose weight is a parameter (``aten.linear``; ``aten.addmm``/``mm``/``matmul`` with a
parameter operand, e.g. GPT-2 ``Conv1D`` whose weight is stored ``(in, out)``) is classified with
the first rule that rejects it, in this order:

1. ``excluded``: the module's qualified name matches a user pattern (fnmatch, or ``re:REGEX``);
2. ``tied``: the weight is also read by an embedding lookup (tied input/output embeddings);
3. ``lm_head``: the output projection to the vocabulary, kept dense as pruning it costs most;
4. ``shared``: the weight feeds several matmuls (or other ops), so one mask cannot serve it;
5. ``indivisible``: the input dim is not a multiple of M;
6. ``kernel_shape``: the sparse kernel cannot take the shape (:data:`KERNEL_SHAPE_RULES`).

The analysis runs over a networkx ``DiGraph`` of the FX graph (nodes: fx node names, edges: data
flow): weight fan-out, tied-embedding detection and liveness are graph queries on it. Masked graphs
(``sparseforge::apply_mask`` between weight and matmul) are understood, so the same analysis
describes a graph before, during and after annealing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from sparseforge_compile.graph_origin import original_model, original_name
from sparseforge_compile.masks import NMPattern
from sparseforge_compile.ops import APPLY_MASK

from .base import as_graph_module

aten = torch.ops.aten

# op -> index of the weight operand when it is the right-hand (in, out) operand; linear takes (out, in).
_LINEAR_OPS = {aten.linear.default: 1}
_RHS_MATMUL_OPS = {aten.addmm.default: 2, aten.mm.default: 1, aten.matmul.default: 1}
_LHS_MATMUL_OPS = {aten.mm.default: 0, aten.matmul.default: 0}  # W @ x: W is (out, in)
_TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_EMBEDDING_OPS = {aten.embedding.default}
DEFAULT_PATTERN = NMPattern(2, 4)


# ----------------------------------------------------------------------------- kernel shape rules

@dataclass(frozen=True)
class KernelShapeRule:
    """Shape constraints of a 2:4 sparse kernel on the sparse operand (the weight, (out, in) layout)."""

    backend: str
    dtype: str
    row_multiple: int  # out_features must be a positive multiple of this
    col_multiple: int  # in_features must be a positive multiple of this
    max_elements: int
    pattern: str  # the one N:M pattern the kernel runs
    source: str

    def violation(self, out_features: int, in_features: int) -> str | None:
        problems = []
        if out_features < self.row_multiple or out_features % self.row_multiple:
            problems.append(f"out_features {out_features} is not a positive multiple of {self.row_multiple}")
        if in_features < self.col_multiple or in_features % self.col_multiple:
            problems.append(f"in_features {in_features} is not a positive multiple of {self.col_multiple}")
        if out_features * in_features > self.max_elements:
            problems.append(f"{out_features * in_features} elements exceed {self.max_elements}")
        if not problems:
            return None
        return f"shape ({out_features}, {in_features}) not supported by the {self.describe()}: " + "; ".join(problems)

    def describe(self) -> str:
        return (f"{self.backend} {self.dtype} {self.pattern} kernel (rows x cols multiples of "
                f"{self.row_multiple} x {self.col_multiple})")


# The shape rules as data. Sources:
# * cuSPARSELt: NVIDIA cuSPARSELt docs, cusparseLtStructuredDescriptorInit "Constrains": rows, cols
#   and ld must be multiples of 16 for CUDA_R_16F/CUDA_R_16BF (32 for 8-bit types), and the matrix
#   holds at most 2^31-1 elements for 16-bit types (https://docs.nvidia.com/cuda/cusparselt/
#   functions.html). PyTorch enforces the same multiples for 2:4 in
#   torch/sparse/semi_structured.py, SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS
#   (sparse_min_rows = sparse_min_cols = 16 for fp16/bf16; 32 for int8).
# * CUTLASS: torch/sparse/semi_structured.py, SparseSemiStructuredTensorCUTLASS.
#   _DTYPE_SHAPE_CONSTRAINTS: fp16/bf16 rows multiple of 32, cols multiple of 64; int8 16 x 128.
# 32-bit floats run 1:2 (not 2:4) in cuSPARSELt, so there is no 2:4 fp32 entry for it.
_CUSPARSELT_DOC = "cuSPARSELt docs, cusparseLtStructuredDescriptorInit; torch SparseSemiStructuredTensorCUSPARSELT"
_CUTLASS_DOC = "torch.sparse.semi_structured SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS"
KERNEL_SHAPE_RULES: dict[tuple[str, torch.dtype], KernelShapeRule] = {
    ("cusparselt", torch.bfloat16): KernelShapeRule("cuSPARSELt", "bf16", 16, 16, 2**31 - 1, "2:4", _CUSPARSELT_DOC),
    ("cusparselt", torch.float16): KernelShapeRule("cuSPARSELt", "fp16", 16, 16, 2**31 - 1, "2:4", _CUSPARSELT_DOC),
    ("cusparselt", torch.int8): KernelShapeRule("cuSPARSELt", "int8", 32, 32, 2**32 - 1, "2:4", _CUSPARSELT_DOC),
    ("cutlass", torch.bfloat16): KernelShapeRule("CUTLASS", "bf16", 32, 64, 2**31 - 1, "2:4", _CUTLASS_DOC),
    ("cutlass", torch.float16): KernelShapeRule("CUTLASS", "fp16", 32, 64, 2**31 - 1, "2:4", _CUTLASS_DOC),
    ("cutlass", torch.int8): KernelShapeRule("CUTLASS", "int8", 16, 128, 2**31 - 1, "2:4", _CUTLASS_DOC),
    ("cutlass", torch.float32): KernelShapeRule("CUTLASS", "fp32", 32, 32, 2**31 - 1, "2:4", _CUTLASS_DOC),
}


def kernel_shape_rule(kernel_constraints: str | KernelShapeRule | None, dtype: torch.dtype) -> KernelShapeRule | None:
    """The rule for a backend name ("cusparselt", "cutlass") and dtype; None disables the check."""
    if kernel_constraints is None or isinstance(kernel_constraints, KernelShapeRule):
        return kernel_constraints
    key = (str(kernel_constraints).lower(), dtype)
    if key not in KERNEL_SHAPE_RULES:
        known = sorted({f"{b}/{str(d).removeprefix('torch.')}" for b, d in KERNEL_SHAPE_RULES})
        raise ValueError(
            f"no 2:4 sparse-kernel shape rule for backend {kernel_constraints!r} and dtype {dtype}: known are "
            f"{', '.join(known)}; pick one, or pass kernel_constraints=None to check only the N:M mask math"
        )
    return KERNEL_SHAPE_RULES[key]


# ------------------------------------------------------------------------------------- results

@dataclass
class LayerInfo:
    """One weight matmul of the graph and its verdict."""

    name: str  # module qualified name in the original model, e.g. "model.layers.0.mlp.up_proj"
    weight_fqn: str  # "model.layers.0.mlp.up_proj.weight"
    node: str  # the matmul's fx node name
    out_features: int
    in_features: int
    transposed: bool  # weight stored (in, out), as GPT-2 Conv1D
    eligible: bool
    reason: str | None = None
    reason_code: str | None = None  # excluded | tied | lm_head | shared | indivisible | kernel_shape
    target: str = ""  # the weight's get_attr target in the graph module
    op: str = ""  # aten op of the matmul
    block: str | None = None  # repeated block holding the layer, e.g. "model.layers.0"
    mask: str | None = None  # call_module target of its MaskState if the graph is masked

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features): the Linear layout the N:M groups are defined on."""
        return self.out_features, self.in_features

    @property
    def masked(self) -> bool:
        return self.mask is not None


@dataclass
class EligibilityReport:
    layers: list[LayerInfo]
    pattern: NMPattern
    kernel_rule: str  # which kernel-shape rule applied, in words
    exclude: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def ineligible(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if not layer.eligible]

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(f"no weight matmul named {name!r}; known: {', '.join(i.name for i in self.layers)}")

    def counts(self) -> dict[str, int]:
        counts = {"matmuls": len(self.layers), "eligible": len(self.eligible)}
        for info in self.ineligible:
            counts[info.reason_code or "other"] = counts.get(info.reason_code or "other", 0) + 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"pattern": str(self.pattern), "kernel_rule": self.kernel_rule, "exclude": list(self.exclude),
                "notes": list(self.notes), "counts": self.counts(), "layers": [asdict(i) for i in self.layers]}


# ----------------------------------------------------------------------------------- the graph

def graph_to_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph: one node per fx node (keyed by name), edges along data flow."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op, target=_target_name(node.target), fx=node)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_transparent(node: fx.Node) -> bool:
    """Nodes between a weight and its matmul that keep it the same weight: mask, transpose."""
    return node.op == "call_function" and (node.target is APPLY_MASK or node.target in _TRANSPOSE_OPS)


def _flips(node: fx.Node) -> bool:
    if node.target is aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2])
    return node.target in _TRANSPOSE_OPS


@dataclass
class WeightUse:
    """How a matmul reads its parameter: the get_attr, the node reading it, transposes, mask."""

    get_attr: fx.Node
    reader: fx.Node  # the node that takes the get_attr as input (the matmul, a transpose or a mask)
    flipped: bool  # an odd number of transposes between the parameter and the matmul
    mask_node: fx.Node | None


def _trace_weight(arg: Any, matmul: fx.Node) -> WeightUse | None:
    """Walk back from a matmul operand through masks and transposes to a get_attr parameter."""
    flipped, mask_node, reader, node = False, None, matmul, arg
    while isinstance(node, fx.Node) and _is_transparent(node):
        if node.target is APPLY_MASK:
            mask_node = node.args[1] if isinstance(node.args[1], fx.Node) else None
        else:
            flipped ^= _flips(node)
        reader, node = node, node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return WeightUse(node, reader, flipped, mask_node)
    return None


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _consumers(graph: nx.DiGraph, start: str) -> set[str]:
    """Nodes reading a weight, looking through masks and transposes applied to it."""
    found, stack = set(), [start]
    while stack:
        current = stack.pop()
        for succ in graph.successors(current):
            fx_node = graph.nodes[succ]["fx"]
            passes_weight = _is_transparent(fx_node) and getattr(fx_node.args[0], "name", None) == current
            (stack.append if passes_weight else found.add)(succ)
    return found


def module_path(node: fx.Node, prefix: str = "") -> str | None:
    """Qualified name (in the original model) of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _owner_name(model: nn.Module | None, node: fx.Node, tensor: torch.Tensor, prefix: str,
                fallback_fqn: str) -> tuple[str, str]:
    """(module name, parameter fqn) of the module that owns ``tensor`` and ran ``node``."""
    path = module_path(node, prefix)
    if model is not None and path is not None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            for pname, param in module.named_parameters(recurse=False):
                if param is tensor:
                    return path, f"{path}.{pname}" if path else pname
    module_name, _, _ = fallback_fqn.rpartition(".")
    return module_name, fallback_fqn


def _block_of(name: str) -> str | None:
    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]  # a container index with a layer below
    return ".".join(parts[: numeric[-1] + 1]) if numeric else None


def _output_embedding_names(model: nn.Module | None) -> set[str]:
    if model is None or not hasattr(model, "get_output_embeddings"):
        return set()
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    return {name for name, module in model.named_modules() if module is head} if head is not None else set()


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return pattern
        elif fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def validate_exclude(exclude: Iterable[str] | str) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return patterns


# ------------------------------------------------------------------------------------ analysis

def analyze_eligibility(gm_or_captured: Any, pattern: NMPattern | str = DEFAULT_PATTERN,
                        exclude: Iterable[str] | str = (), dtype: torch.dtype = torch.bfloat16,
                        kernel_constraints: str | KernelShapeRule | None = "cusparselt") -> EligibilityReport:
    """Classify every weight matmul of a captured graph (see the module docstring for the rules).

    ``dtype`` is the dtype the sparse kernel will run in (it picks the kernel-shape rule), not the
    dtype the model has now. ``kernel_constraints``: "cusparselt" (default), "cutlass", a
    :class:`KernelShapeRule`, or None to check only the mask math (N:M divisibility).
    """
    gm = as_graph_module(gm_or_captured)
    pattern = NMPattern.parse(pattern)
    patterns = validate_exclude(exclude)
    rule = kernel_shape_rule(kernel_constraints, dtype)
    model = original_model(gm)
    prefix = gm.meta.get("sparseforge", {}).get("prefix", "")
    head_names = _output_embedding_names(model)
    graph = graph_to_digraph(gm)
    output = next(iter(gm.graph.find_nodes(op="output")))
    live = nx.ancestors(graph, output.name)

    # Every get_attr node of one parameter (export may emit several targets for a tied tensor).
    attr_nodes: dict[int, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        attr_nodes.setdefault(id(_fetch(gm, node.target)), []).append(node)

    layers = []
    for node in gm.graph.nodes:
        use = matmul_weight(node)
        if use is None or node.name not in live:
            continue
        weight_use, rhs = use
        tensor = _fetch(gm, weight_use.get_attr.target)
        if not isinstance(tensor, nn.Parameter) or tensor.dim() != 2:
            continue
        transposed = rhs ^ weight_use.flipped  # stored (in, out)
        out_f, in_f = (tensor.shape[1], tensor.shape[0]) if transposed else tuple(tensor.shape)
        fqn = original_name(gm, weight_use.get_attr.target)
        name, weight_fqn = _owner_name(model, node, tensor, prefix, fqn)
        consumers = set().union(*(_consumers(graph, n.name) for n in attr_nodes[id(tensor)]))
        info = LayerInfo(name=name, weight_fqn=weight_fqn, node=node.name, out_features=int(out_f),
                         in_features=int(in_f), transposed=bool(transposed), eligible=True,
                         target=weight_use.get_attr.target, op=_target_name(node.target), block=_block_of(name),
                         mask=weight_use.mask_node.target if weight_use.mask_node is not None else None)
        verdict = _verdict(info, consumers - {node.name}, graph, gm, patterns, head_names, pattern, rule, prefix)
        if verdict is not None:
            info.eligible, (info.reason_code, info.reason) = False, verdict
        layers.append(info)

    notes = _notes(layers, pattern, rule)
    kernel_text = (f"{rule.describe()} [{rule.source}]" if rule is not None
                   else "kernel-shape rule disabled (kernel_constraints=None): only N:M divisibility is checked")
    return EligibilityReport(layers=layers, pattern=pattern, kernel_rule=kernel_text, exclude=patterns, notes=notes)


def matmul_weight(node: fx.Node) -> tuple[WeightUse, bool] | None:
    """(the parameter operand, whether it is the (in, out) right-hand side) of a weight matmul."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_OPS:
        use = _trace_weight(node.args[_LINEAR_OPS[node.target]], node)
        return (use, False) if use else None
    if node.target in _RHS_MATMUL_OPS:
        index = _RHS_MATMUL_OPS[node.target]
        use = _trace_weight(node.args[index], node) if len(node.args) > index else None
        if use is not None:
            return use, True
        if node.target in _LHS_MATMUL_OPS:
            use = _trace_weight(node.args[_LHS_MATMUL_OPS[node.target]], node)
            return (use, False) if use else None
    return None


def _verdict(info: LayerInfo, others: set[str], graph: nx.DiGraph, gm: fx.GraphModule, patterns: tuple[str, ...],
             head_names: set[str], pattern: NMPattern, rule: KernelShapeRule | None,
             prefix: str) -> tuple[str, str] | None:
    """(reason code, reason) of the first rule that rejects the layer, or None if it is eligible."""
    matched = _matches(info.name, patterns)
    if matched is not None:
        return "excluded", f"excluded by pattern {matched!r}"
    embeddings = sorted(n for n in others if graph.nodes[n]["fx"].target in _EMBEDDING_OPS)
    if embeddings:
        lookup = graph.nodes[embeddings[0]]["fx"]
        where = module_path(lookup, prefix) or lookup.name
        return "tied", f"tied to the input embedding: its weight is also read by the embedding lookup {where!r}"
    if info.name in head_names or info.name.rsplit(".", 1)[-1] == "lm_head":
        return "lm_head", "lm_head: the output projection to the vocabulary stays dense"
    if others:
        readers = ", ".join(sorted(others)[:4])
        return "shared", f"weight shared by {len(others) + 1} ops (also read by {readers}): one mask cannot serve all"
    if info.in_features % pattern.m:
        return "indivisible", f"input dim {info.in_features} is not divisible by M={pattern.m} (pattern {pattern})"
    if rule is not None:
        problem = rule.violation(info.out_features, info.in_features)
        if problem is not None:
            return "kernel_shape", problem
    return None


def _notes(layers: list[LayerInfo], pattern: NMPattern, rule: KernelShapeRule | None) -> list[str]:
    notes = []
    if not layers:
        notes.append("no eligible layer: the graph has no matmul with a parameter weight")
    elif not any(layer.eligible for layer in layers):
        codes = sorted({layer.reason_code or "other" for layer in layers})
        notes.append(f"no eligible layer: none of the {len(layers)} weight matmuls can be made {pattern} sparse "
                     f"(reasons: {', '.join(codes)})")
    if rule is not None and str(pattern) != rule.pattern:
        notes.append(f"pattern {pattern} has no {rule.backend} kernel (it runs {rule.pattern}): eligible layers can "
                     f"be masked and hardened, but will run as dense matmuls")
    blocks = {layer.block for layer in layers if layer.block}
    if blocks:
        per_block = {b: sum(1 for layer in layers if layer.block == b and layer.eligible) for b in blocks}
        notes.append(f"{len(blocks)} repeated blocks; eligible per block: "
                     f"{sorted(set(per_block.values()))}")
    return notes
