"""Graph pass: the masked graph as torch.compile should see it, every ``apply_mask`` as plain tensor ops.

``sparseforge::apply_mask`` is a custom op so that graph passes can find each masked layer by target
(hardening, lowering, the report). Inductor cannot see into it: it calls the op back in Python once
per layer per forward (210 calls a step on SmolLM2, each through the op dispatcher), and cannot fuse
the multiply with the bf16 cast autocast puts in front of the matmul. The training loop is
host-bound on a GPU (benchmarks/results/profile/), so for compilation this pass rewrites

    w_eff = apply_mask(weight, mask, transposed)   ->   w_eff = weight * mask[.t()].type_as(weight)

on a *copy* of the graph (same parameters, mask modules and taps; the original keeps its custom ops
for hardening). Same values and gradients as the op's registered formula (tested: weight grad
``g * mask``, mask grad ``g * weight`` in the mask's dtype). A graph that outlined its blocks
(``outline_blocks``) has them in nested GraphModules; those are rewritten in place, since the outlined
graph exists only to be compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from sparseforge_compile.ops import APPLY_MASK

from .base import GraphPass, PassConditionError, PassResult


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its submodules, parameters and buffers."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # an exported graph's pytree calling convention
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _inline(gm: fx.GraphModule) -> int:
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not APPLY_MASK:
            continue
        weight, mask = node.args[0], node.args[1]
        transposed = node.args[2] if len(node.args) > 2 else node.kwargs.get("transposed", False)
        with graph.inserting_before(node):
            aligned = graph.call_method("t", (mask,)) if transposed else mask
            aligned = graph.call_method("type_as", (aligned, weight))
            product = graph.call_function(torch.mul, (weight, aligned))
        product.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


@dataclass
class InlineMaskOps(GraphPass):
    """``apply_mask`` nodes -> ``weight * mask`` in a copy of the graph (nested GraphModules in place)."""

    copy: bool = True

    def run(self, gm: fx.GraphModule) -> PassResult:
        out = _copy(gm) if self.copy else gm
        inlined = _inline(out)
        if not self.copy:  # outlined blocks live in nested GraphModules (passes/outline_blocks.py)
            for sub in out.modules():
                if sub is not out and isinstance(sub, fx.GraphModule):
                    inlined += _inline(sub)
        return PassResult(gm=out, modified=inlined > 0, stats={"inlined": inlined})

    def ensures(self, result: PassResult) -> None:
        left = [n for m in result.gm.modules() if isinstance(m, fx.GraphModule)
                for n in m.graph.nodes if n.op == "call_function" and n.target is APPLY_MASK]
        if left:
            raise PassConditionError(f"InlineMaskOps: {len(left)} apply_mask nodes left"
                                     + (" in nested graphs, which a copy shares: use copy=False" if self.copy else ""))
