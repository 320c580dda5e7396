"""Keep position math in float32 when the graph runs under autocast.

Transformers computes the rotary frequencies as ``inv_freq @ position_ids`` inside
``maybe_autocast(enabled=False)`` (transformers 5.1x; 5.2x multiplies elementwise instead), so
that under bf16 autocast the angles stay in fp32. ``maybe_autocast`` is a no-op when no autocast is
active, which is how ``capture`` exports: the autocast-off region never reaches the graph, and at
run time under autocast the matmul runs in bf16. bf16 holds integers exactly only up to 256, so the
angles of later positions are off by up to a radian: on SmolLM2 the captured graph's bf16 logits were
0.19 nats of KL from fp32 beyond position 128 against 0.0009 for the model itself
(``benchmarks/graph_numerics.py``, H200, transformers 5.17), and the annealing loop trained on that.

The pass pins every matmul-class node (the ops autocast would run in bf16) whose operands depend on
the graph's inputs through their sizes alone (positions, frequencies, buffers, constants) to run
with autocast off, as the model's source meant. Matmuls over activations are left to autocast.
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


@dataclass
class KeepPositionMathInFloat32(GraphPass):
    """Matmul-class nodes computed from input sizes, parameters and buffers only -> autocast-off calls."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        pinned = []
        for op, pinned_op in PINNED.items():
            for node in list(gm.graph.find_nodes(op="call_function", target=op)):
                if not depends_on_input_values(node):
                    node.target = pinned_op
                    pinned.append(node.name)
        if pinned:
            gm.recompile()
        return PassResult(gm=gm, modified=bool(pinned), stats={"pinned": pinned})
