"""Keep position math in float32 when the graph runs under autocast.

Transformers computes the rotary frequencies as ``inv_freq @ position_ids`` inside
``maybe_autocast(enabled=False)`` (transformers 5.1x; 5.2x multiplies elementwise instead), so
that under bf16 autocast the angles stay in fp32. ``maybe_autocast`` is a no-op when no autocast is
active, which is how ``capture`` exports: the autocast-off region never reaches the graph, and at
run time under autocast the matmul runs in bf16. bf16 holds integers exactly only up to 256, so the
angles of later positions are off by up to a radian: on SmolLM2 the captured graph's bf16 logits were
0.19 nats of KL from fp32 beyond position 128 against 0.0009 for the model itself
(``benchmarks/graph_numerics.py``, H200, transformers 5.17), and the annealing loop trained on that.

transformers 5.1x also decorates that ``forward`` with ``torch.no_grad``, which export turns into a
``wrap_with_set_grad_enabled`` region with its own subgraph: the matmul sits there, not in the top
graph (a first version of this pass looked only at the top graph and fixed nothing on the GPU
machine; its test had emulated the rotary code without the decorator).

The pass pins every matmul-class node (the ops autocast would run in bf16) whose operands depend on
the graph's inputs through their sizes alone (positions, frequencies, buffers, constants), in the
graph or in a region's subgraph, to run with autocast off, as the model's source meant. Matmuls over
activations are left to autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .base import GraphPass, PassResult, depends_on_input_values

aten = torch.ops.aten


def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aten.matmul`` with autocast off (the operands keep their captured dtype, fp32)."""
    with _autocast_off(a.device):
        return aten.matmul.default(a, b)


def float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aten.bmm`` with autocast off."""
    with _autocast_off(a.device):
        return aten.bmm.default(a, b)


def float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aten.mm`` with autocast off."""
    with _autocast_off(a.device):
        return aten.mm.default(a, b)


def float32_einsum(equation: str, operands: list[torch.Tensor], path: list[int] | None = None) -> torch.Tensor:
    """``aten.einsum`` with autocast off (older rotary code: ``einsum("i,j->ij", t, inv_freq)``)."""
    with _autocast_off(operands[0].device):
        return aten.einsum.default(equation, operands, path)


PINNED = {
    aten.matmul.default: float32_matmul,
    aten.bmm.default: float32_bmm,
    aten.mm.default: float32_mm,
    aten.einsum.default: float32_einsum,
}


def _regions(gm: fx.GraphModule, node: fx.Node) -> list[tuple[fx.GraphModule, list]]:
    """The subgraphs a higher-order op node runs, each with the operands its placeholders take.

    Export puts a ``torch.no_grad`` function (transformers 5.1x's rotary ``forward``) into a
    ``wrap_with_set_grad_enabled(enabled, submod, *operands)`` region, an autocast context into
    ``wrap_with_autocast(..., submod, *operands)``: the operands follow the subgraph. For any other
    layout the operands are unknown (empty), and every placeholder of the subgraph counts as input."""
    found = []
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            sub = getattr(gm, str(arg.target), None)
            if isinstance(sub, fx.GraphModule):
                found.append((sub, list(node.args[i + 1:])))
    return found if len(found) == 1 else [(sub, []) for sub, _ in found]


def _pin(gm: fx.GraphModule, value_inputs: set[fx.Node] | None) -> list[str]:
    """Pin the position matmuls of ``gm`` and of the regions it calls; the pinned nodes' names."""
    pinned = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in PINNED and not depends_on_input_values(node, value_inputs):
            node.target = PINNED[node.target]
            pinned.append(node.name)
        for sub, operands in _regions(gm, node):
            placeholders = list(sub.graph.find_nodes(op="placeholder"))
            if len(operands) != len(placeholders):  # unknown layout: every placeholder is an input
                fed_by_values = set(placeholders)
            else:
                fed_by_values = {ph for ph, arg in zip(placeholders, operands)
                                 if isinstance(arg, fx.Node) and depends_on_input_values(arg, value_inputs)}
            pinned += [f"{node.name}/{name}" for name in _pin(sub, fed_by_values)]
    if pinned:
        gm.recompile()
    return pinned


@dataclass
class KeepPositionMathInFloat32(GraphPass):
    """Matmul-class nodes computed from input sizes, parameters and buffers only -> autocast-off calls,
    in the graph and in the subgraphs of its higher-order ops (no_grad and autocast regions)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        pinned = _pin(gm, None)
        return PassResult(gm=gm, modified=bool(pinned), stats={"pinned": pinned})
