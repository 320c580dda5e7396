"""Graph inspection report: per weight matmul, eligibility, mask state, density and estimated savings.

``inspect(model_or_graph)`` works on a plain model (it captures it), on a CapturedGraph or graph
module holding masks (annealing state: undecided groups, mask entropy), and on a hardened model
(its registry ``model._sparseforge_layers`` marks the N:M layers; layers already lowered to
sparse modules are listed from that registry). Savings are estimates for the
sparse kernel: FLOPs per token ``2 * out * in * (1 - N/M)``; weight bytes of a compressed N:M
matrix = values ``N/M`` + metadata ``N * ceil(log2 M) / M`` bits per dense element (2:4 in bf16:
0.5 + 1/16 = 0.5625 of the dense bytes).

The graph picture is the FX graph condensed to its inputs, embeddings, weight matmuls, masks and
output (other nodes contracted, implied edges removed), as DOT text, and as SVG/PNG through
Graphviz ``dot`` when installed, else drawn with networkx + matplotlib.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from tabulate import tabulate
from torch import fx, nn

from .capture import CapturedGraph, capture
from .graph_origin import original_model
from .masks import NMPattern, count_nm_violations
from .passes.base import as_graph_module
from .passes.eligibility import (
    EligibilityReport,
    LayerInfo,
    analyze_eligibility,
    graph_to_digraph,
    module_path,
)
from .passes.harden import sparse_layers
from .passes.insert_masks import apply_mask_nodes, graph_masks

_DTYPE_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.int8: 8}
_COLORS = {"hardened": "#7fc97f", "masked": "#fdb462", "eligible": "#80b1d3", "ineligible": "#d9d9d9",
           "mask": "#fb8072", "io": "#ffffff", "embedding": "#bebada"}


def compressed_fraction(pattern: NMPattern, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes of a compressed N:M weight over its dense bytes (values + per-kept-element index bits)."""
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"no byte size for dtype {dtype}; use one of {', '.join(map(str, _DTYPE_BITS))}")
    index_bits = math.ceil(math.log2(pattern.m)) if pattern.m > 1 else 0
    return pattern.n / pattern.m + pattern.n * index_bits / (pattern.m * bits)


@dataclass
class Report:
    """Rows (one per weight matmul), totals and notes; ``str(report)`` is the table."""

    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    notes: list[str]
    eligibility: EligibilityReport
    gm: fx.GraphModule | None = field(default=None, repr=False)

    def table(self) -> str:
        headers = ["layer", "shape", "status", "pattern", "density", "undecided", "entropy", "MFLOP/tok saved",
                   "KiB saved"]
        body = [[r["name"], "x".join(map(str, r["shape"])), r["status_text"], r["pattern"] or "-",
                 f"{r['density']:.3f}", _opt(r["undecided"]), _opt(r["entropy"]),
                 f"{r['flops_saved_per_token'] / 1e6:.3f}", f"{r['weight_bytes_saved'] / 1024:.1f}"]
                for r in self.rows]
        return tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)

    def totals_text(self) -> str:
        t = self.totals
        lines = [
            f"weight matmuls: {t['matmuls']}, eligible: {t['eligible']}, masked: {t['masked']}, "
            f"hardened: {t['hardened']}" + (f", lowered: {t['lowered']}" if t["lowered"] else ""),
            f"FLOPs/token in weight matmuls: {t['flops_dense_per_token'] / 1e6:.2f} M dense, "
            f"{t['flops_saved_per_token'] / 1e6:.2f} M saved ({t['flops_saved_fraction']:.1%})",
            f"weight bytes ({t['bytes_dtype']}): {t['weight_bytes_dense'] / 2**20:.2f} MiB dense, "
            f"{t['weight_bytes_saved'] / 2**20:.2f} MiB saved ({t['weight_bytes_saved_fraction']:.1%})",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.table() if self.rows else "(no weight matmul in the graph)", "", self.totals_text()]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "notes": self.notes, "kernel_rule": self.eligibility.kernel_rule,
                "pattern": str(self.eligibility.pattern), "exclude": list(self.eligibility.exclude),
                "layers": [{k: v for k, v in r.items() if k != "status_text"} for r in self.rows]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def condensed_graph(self) -> nx.DiGraph:
        if self.gm is None:
            raise ValueError("this report holds no graph")
        return condensed_graph(self.gm, self.rows)

    def write_graph(self, path: str | Path) -> list[Path]:
        """Write the condensed graph: ``.dot`` text always; ``.svg``/``.png`` rendered too. Returns the files."""
        path = Path(path)
        if path.suffix not in (".dot", ".svg", ".png"):
            raise ValueError(f"graph file {path}: use a .dot, .svg or .png name")
        path.parent.mkdir(parents=True, exist_ok=True)
        graph = self.condensed_graph()
        dot_path = path if path.suffix == ".dot" else path.with_suffix(".dot")
        dot_path.write_text(to_dot(graph))
        written = [dot_path]
        if path.suffix != ".dot":
            dot = shutil.which("dot")
            if dot:
                subprocess.run([dot, f"-T{path.suffix[1:]}", str(dot_path), "-o", str(path)], check=True,
                               capture_output=True)
            else:
                draw_with_matplotlib(graph, path)
            written.append(path)
        return written


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------- inspection

def inspect(model_or_graph: nn.Module | CapturedGraph, pattern: NMPattern | str = "2:4", exclude: Any = (), *,
            dtype: torch.dtype = torch.bfloat16, kernel_constraints: str | None = "cusparselt",
            example_inputs: Any = None) -> Report:
    """Inspect a model, a captured graph (possibly masked) or a hardened model; see the module doc.

    ``dtype`` is the dtype the sparse kernel would run in: it picks the kernel-shape rule and the
    byte sizes of the savings.
    """
    from .inputs import require_module

    pattern = NMPattern.parse(pattern)
    notes: list[str] = []
    if not isinstance(model_or_graph, CapturedGraph):
        require_module(model_or_graph, "inspect")
    if isinstance(model_or_graph, CapturedGraph | fx.GraphModule):
        gm = as_graph_module(model_or_graph)
        model = original_model(gm)
    else:
        captured = capture(model_or_graph, example_inputs)
        gm, model = captured.gm, model_or_graph
        notes += captured.notes
    eligibility = analyze_eligibility(gm, pattern, exclude, dtype=dtype, kernel_constraints=kernel_constraints)
    registry = sparse_layers(model if model is not None else gm)
    masks = graph_masks(gm)
    rows = [_row(gm, info, registry.get(info.name), masks.get(info.name), pattern, dtype) for info in eligibility.layers]
    covered = {r["name"] for r in rows}
    owner = model if model is not None else gm
    lowered = [_lowered_row(owner, name, entry, dtype) for name, entry in registry.items() if name not in covered]
    rows += [r for r in lowered if r is not None]
    notes = eligibility.notes + notes
    if any(r["status"] == "lowered" for r in rows):
        notes = [n for n in notes if not n.startswith("no eligible layer")]
        notes.append("lowered layers (sparse kernels, weights held as buffers) are listed from the model's "
                     "registry: they are no longer parameter matmuls of the graph")
    notes.append(f"kernel-shape rule: {eligibility.kernel_rule}")
    return Report(rows=rows, totals=_totals(rows, dtype), notes=notes, eligibility=eligibility, gm=gm)


def _row(gm: fx.GraphModule, info: LayerInfo, registered: dict | None, mask: Any, pattern: NMPattern,
         dtype: torch.dtype) -> dict[str, Any]:
    weight = gm.get_parameter(info.target).detach()
    grouped = weight.t() if info.transposed else weight
    density = float((grouped != 0).float().mean())
    dense_flops = 2 * info.out_features * info.in_features
    dense_bytes = info.out_features * info.in_features * _DTYPE_BITS.get(dtype, 16) // 8
    layer_pattern: NMPattern | None = pattern if info.eligible else None
    violations = None
    if registered is not None:
        status = "hardened"
        spec = registered.get("pattern")
        layer_pattern = NMPattern.parse(spec) if spec else None
        if layer_pattern is not None and grouped.shape[-1] % layer_pattern.m == 0:
            violations = count_nm_violations(grouped, layer_pattern)
    elif mask is not None:
        status = "masked"
        layer_pattern = mask.pattern
    else:
        status = "eligible" if info.eligible else "ineligible"
    saving = (1 - layer_pattern.density) if layer_pattern is not None else 0.0
    bytes_saved = dense_bytes * (1 - compressed_fraction(layer_pattern, dtype)) if layer_pattern is not None else 0.0
    if status == "hardened" and layer_pattern is None:
        status_text = f"hardened (unstructured, density {density:.2f})"
    elif status == "hardened":
        status_text = f"hardened {layer_pattern}" + (f" ({violations} bad groups!)" if violations else "")
    elif status == "masked":
        status_text = f"masked {layer_pattern}"
    else:
        status_text = "eligible" if info.eligible else _short_reason(info)
    return {
        "name": info.name, "weight_fqn": info.weight_fqn, "node": info.node, "op": info.op,
        "shape": [info.out_features, info.in_features], "transposed": info.transposed, "block": info.block,
        "eligible": info.eligible, "reason": info.reason, "reason_code": info.reason_code, "status": status,
        "status_text": status_text, "pattern": str(layer_pattern) if layer_pattern is not None else None,
        "density": density, "nm_violations": violations,
        "undecided": mask.undecided_fraction() if mask is not None else None,
        "entropy": mask.entropy() if mask is not None else None,
        "flops_dense_per_token": dense_flops, "flops_saved_per_token": dense_flops * saving,
        "weight_bytes_dense": dense_bytes, "weight_bytes_saved": bytes_saved,
    }


def _lowered_row(owner: nn.Module, name: str, entry: dict[str, Any], dtype: torch.dtype) -> dict[str, Any] | None:
    """A row for a registry layer lowered to a sparse module (its weight from ``materialize_weight``)."""
    try:
        module = owner.get_submodule(name)
    except AttributeError:
        return None
    materialize = getattr(module, "materialize_weight", None)
    if materialize is None:
        return None
    out_f, in_f = int(entry.get("out_features", module.out_features)), int(entry.get("in_features", module.in_features))
    weight = materialize().detach()  # (out, in)
    spec = entry.get("pattern")
    layer_pattern = NMPattern.parse(spec) if spec else None
    dense_flops = 2 * out_f * in_f
    dense_bytes = out_f * in_f * _DTYPE_BITS.get(dtype, 16) // 8
    return {
        "name": name, "weight_fqn": entry.get("weight_fqn", f"{name}.weight"), "node": None,
        "op": type(module).__name__, "shape": [out_f, in_f], "transposed": bool(entry.get("transposed", False)),
        "block": None, "eligible": True, "reason": None, "reason_code": None, "status": "lowered",
        "status_text": f"lowered {layer_pattern}" if layer_pattern else "lowered",
        "pattern": str(layer_pattern) if layer_pattern else None, "density": float((weight != 0).float().mean()),
        "nm_violations": count_nm_violations(weight, layer_pattern) if layer_pattern else None,
        "undecided": None, "entropy": None, "flops_dense_per_token": dense_flops,
        "flops_saved_per_token": dense_flops * (1 - layer_pattern.density) if layer_pattern else 0.0,
        "weight_bytes_dense": dense_bytes,
        "weight_bytes_saved": dense_bytes * (1 - compressed_fraction(layer_pattern, dtype)) if layer_pattern else 0.0,
    }


def _short_reason(info: LayerInfo) -> str:
    short = {"excluded": info.reason, "tied": "no: tied to the embedding", "lm_head": "no: lm_head",
             "shared": "no: shared weight", "indivisible": f"no: in {info.in_features} not divisible by M",
             "kernel_shape": "no: below sparse-kernel shape"}
    text = short.get(info.reason_code or "", info.reason or "no")
    return text if text.startswith("no") else f"no: {text}"


def _totals(rows: list[dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    flops = sum(r["flops_dense_per_token"] for r in rows)
    saved = sum(r["flops_saved_per_token"] for r in rows)
    nbytes = sum(r["weight_bytes_dense"] for r in rows)
    bytes_saved = sum(r["weight_bytes_saved"] for r in rows)
    return {
        "matmuls": len(rows), "eligible": sum(r["eligible"] for r in rows),
        "masked": sum(r["status"] == "masked" for r in rows), "hardened": sum(r["status"] == "hardened" for r in rows),
        "lowered": sum(r["status"] == "lowered" for r in rows),
        "flops_dense_per_token": flops, "flops_saved_per_token": saved,
        "flops_saved_fraction": saved / flops if flops else 0.0,
        "bytes_dtype": str(dtype).removeprefix("torch."), "weight_bytes_dense": nbytes,
        "weight_bytes_saved": bytes_saved, "weight_bytes_saved_fraction": bytes_saved / nbytes if nbytes else 0.0,
    }


# ------------------------------------------------------------------------------------- picture

def condensed_graph(gm: fx.GraphModule, rows: list[dict[str, Any]]) -> nx.DiGraph:
    """The FX graph reduced to inputs, embeddings, weight matmuls, masks and the output.

    Other nodes are contracted (an edge wherever data flows between kept nodes through them) and
    edges implied by longer paths are dropped, so the picture shows the model's layer structure.
    """
    full = graph_to_digraph(gm)
    by_node = {r["node"]: r for r in rows}
    mask_nodes = {n.name for n in apply_mask_nodes(gm)}
    keep: dict[str, dict[str, str]] = {}
    for name, data in full.nodes(data=True):
        node: fx.Node = data["fx"]
        if name in by_node:
            row = by_node[name]
            label = f"{row['name']}\\n{row['shape'][0]}x{row['shape'][1]} {row['status_text']}"
            keep[name] = {"label": label, "kind": row["status"]}
        elif name in mask_nodes:
            keep[name] = {"label": f"apply_mask\\n{node.meta.get('sparseforge_layer', '')}", "kind": "mask"}
        elif node.op in ("placeholder", "output"):
            keep[name] = {"label": name, "kind": "io"}
        elif node.op == "call_function" and "embedding" in data["target"]:
            where = module_path(node, gm.meta.get("sparseforge", {}).get("prefix", "")) or name
            keep[name] = {"label": f"embedding\\n{where}", "kind": "embedding"}
    small = nx.DiGraph()
    for name, attrs in keep.items():
        small.add_node(name, **attrs)
    for source in keep:
        seen, stack = set(), list(full.successors(source))
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in keep:
                small.add_edge(source, current)
            else:
                stack.extend(full.successors(current))
    reduced = nx.transitive_reduction(small)
    reduced.add_nodes_from(small.nodes(data=True))
    return reduced


def _dot_quote(text: str) -> str:
    return '"' + text.replace('"', r"\"") + '"'


def to_dot(graph: nx.DiGraph) -> str:
    lines = ["digraph sparseforge {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    for name, data in graph.nodes(data=True):
        color = _COLORS.get(data.get("kind", ""), "#ffffff")
        lines.append(f"  {_dot_quote(name)} [label={_dot_quote(data.get('label', name))}, fillcolor=\"{color}\"];")
    lines += [f"  {_dot_quote(a)} -> {_dot_quote(b)};" for a, b in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_with_matplotlib(graph: nx.DiGraph, path: Path) -> None:
    """Layered drawing (one row per topological generation) when Graphviz is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows by topological generation of the non-mask nodes; each mask sits left of its matmul.
    masks = [n for n in graph.nodes if graph.nodes[n].get("kind") == "mask"]
    generations = list(nx.topological_generations(graph.subgraph(set(graph.nodes) - set(masks))))
    pos = {}
    for depth, names in enumerate(generations):
        for i, name in enumerate(sorted(names)):
            pos[name] = ((i - (len(names) - 1) / 2) * 4.0, -depth)
    for name in masks:
        target = next(iter(graph.successors(name)), None)
        x, y = pos.get(target, (0.0, 0.0))
        pos[name] = (x - 1.6, y + 0.35)
    width = max((len(g) for g in generations), default=1)
    fig, ax = plt.subplots(figsize=(max(8, 4.5 * width), max(6, 0.9 * len(generations))))
    colors = [_COLORS.get(graph.nodes[n].get("kind", ""), "#ffffff") for n in graph.nodes]
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=8, width=0.6, edge_color="#777777")
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, node_shape="s", node_size=180, edgecolors="#333333")
    labels = {n: graph.nodes[n].get("label", n).replace("\\n", "\n") for n in graph.nodes}
    nx.draw_networkx_labels(graph, pos, labels=labels, ax=ax, font_size=7, verticalalignment="top")
    handles = [plt.Line2D([], [], marker="s", linestyle="", color=c, label=k) for k, c in _COLORS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], layer_density: dict[str, float], path: str | Path) -> None:
    """PNG of an annealing run (``AnnealResult.history``): loss, temperature and blend, undecided fraction, final density per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in history]
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in history], label="loss")
    ax.plot(steps, [r["kl"] for r in history], label="KL (x tau^2)", alpha=0.7)
    ax.plot(steps, [r["ce"] for r in history], label="CE", alpha=0.7)
    if history and "ce_real" in history[-1]:  # below the teacher's own CE: the real text is memorized
        ax.plot(steps, [r.get("ce_real", float("nan")) for r in history], label="CE, real rows", alpha=0.7)
        ax.plot(steps, [r.get("teacher_ce_real", float("nan")) for r in history], label="teacher CE, real rows",
                linestyle="--", alpha=0.7)
    ax.set_title("loss")
    ax.legend()
    ax = axes[0][1]
    ax.plot(steps, [r["temperature"] for r in history], label="temperature")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["blend"] for r in history], color="C1", label="blend to hard")
    ax.set_title("temperature (log) and blend")
    ax = axes[1][0]
    ax.plot(steps, [r["undecided"] for r in history], label="undecided groups")
    if any(r.get("flips") for r in history):
        ax3 = ax.twinx()
        ax3.plot(steps, [r["flips"] for r in history], color="C2", label="flips vs warm start")
        ax3.set_ylabel("weights flipped vs warm start")
    ax.set_title("undecided group fraction")
    ax.set_xlabel("step")
    ax = axes[1][1]
    names = list(layer_density)
    ax.bar(range(len(names)), [layer_density[n] for n in names], width=1.0)
    ax.set_ylim(0, 1)
    ax.set_title(f"final density per layer ({len(names)} layers)")
    ax.set_xlabel("layer index (graph order)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
