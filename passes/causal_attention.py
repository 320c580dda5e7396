"""Causal attention: give ``scaled_dot_product_attention`` ``is_causal=True`` instead of a built mask.

Exporting a Hugging Face decoder materializes its causal mask: while tracing, transformers cannot
take its eager shortcut (no mask, ``is_causal``), so the graph builds a ``(B, 1, S, S)`` boolean mask
from ``arange``s of the sequence length and hands it to SDPA. A mask argument rules out the flash
kernels, and the annealing loop runs this graph for every soft-phase step: on the H200 those steps
took 1.37x a plain-model step (``benchmarks/results/step_time.json``).

The pass rewrites an SDPA node only when its mask is provably the causal one:

* structurally, the mask depends on the graph's inputs through their *sizes* alone (``sym_size``):
  no ``attention_mask`` or other input values reach it;
* numerically, evaluated at two sequence lengths, it equals the lower-triangular pattern (boolean
  ``j <= i``, or additive ``0`` / ``<= -1e4``), whatever the batch and head dims.

A sliding-window, padded, prefix-LM or bidirectional mask fails one of the checks and is kept.
The dead mask nodes are erased afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .base import GraphPass, PassResult, depends_on_input_values

SDPA = torch.ops.aten.scaled_dot_product_attention.default
EXAMPLE_LENGTHS = (7, 12)


def _mask_arg(node: fx.Node) -> fx.Node | None:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return mask if isinstance(mask, fx.Node) else None


def _is_causal_pattern(mask: torch.Tensor) -> bool:
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not bool((mask[..., ~causal] <= -1e4).all()):
            return False
    return bool((allowed == causal).all())


class _MaskRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.nodes:
            self.values[n] = out
        return out


def _example_inputs(gm: fx.GraphModule, length: int | None) -> list[torch.Tensor] | None:
    """Inputs shaped like the captured ones with sequence length ``length`` (None: as captured)."""
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return None
        shape = [d if isinstance(d, int) else 2 for d in val.shape]
        if length is not None:
            shape[1] = length
        elif not all(isinstance(d, int) for d in val.shape):
            return None
        if val.dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=val.dtype, device=val.device))
        else:
            inputs.append(torch.zeros(shape, dtype=val.dtype, device=val.device))  # token 0: always valid
    return inputs


@dataclass
class UseCausalAttention(GraphPass):
    """SDPA with a shape-only causal mask -> SDPA(q, k, v, is_causal=True) (flash-eligible)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        candidates = {}
        kept: dict[str, str] = {}
        for node in gm.graph.find_nodes(op="call_function", target=SDPA):
            mask = _mask_arg(node)
            if mask is None:
                continue
            if depends_on_input_values(mask):
                kept[node.name] = "the mask depends on input values (padding or an attention_mask input)"
                continue
            candidates[node] = mask
        if candidates:
            for node, reason in self._check_numerically(gm, candidates).items():
                kept[node.name] = reason
                del candidates[node]
        for node in candidates:
            q, k, v = node.args[:3]
            dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            kwargs = {key: value for key, value in node.kwargs.items() if key not in ("attn_mask", "dropout_p",
                                                                                       "is_causal")}
            node.args = (q, k, v)
            node.kwargs = {**kwargs, "dropout_p": dropout, "is_causal": True}
        erased = self._erase_dead(gm, list(candidates.values()))
        if candidates:
            gm.recompile()
        return PassResult(gm=gm, modified=bool(candidates),
                          stats={"rewritten": len(candidates), "kept": kept, "erased_nodes": erased})

    @staticmethod
    def _check_numerically(gm: fx.GraphModule, candidates: dict[fx.Node, fx.Node]) -> dict[fx.Node, str]:
        """Evaluate the masks at two sequence lengths (one, the captured, for a static graph)."""
        recorded: list[dict[fx.Node, torch.Tensor]] = []
        for length in (*EXAMPLE_LENGTHS, None):
            if length is None and recorded:
                break
            inputs = _example_inputs(gm, length)
            if inputs is None:
                return dict.fromkeys(candidates, "no example inputs to evaluate the mask with")
            recorder = _MaskRecorder(gm, set(candidates.values()))
            try:
                with torch.no_grad():
                    recorder.run(*inputs)
            except Exception:  # a graph captured with static shapes rejects other lengths
                if length is None:
                    return dict.fromkeys(candidates, "the graph did not run on example inputs")
                break
            recorded.append(recorder.values)
        failed = {}
        for node, mask in candidates.items():
            if not all(_is_causal_pattern(values[mask]) for values in recorded):
                failed[node] = "the mask is not the plain causal pattern (window, prefix or padding)"
        return failed

    @staticmethod
    def _erase_dead(gm: fx.GraphModule, roots: list[fx.Node]) -> int:
        """Erase the old mask subgraphs where nothing else uses them (pure ops only)."""
        erased: set[fx.Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in erased or node.users or node.op in ("placeholder", "output", "get_attr") or node.is_impure():
                continue
            inputs = node.all_input_nodes
            gm.graph.erase_node(node)
            erased.add(node)
            stack.extend(inputs)
        return len(erased)
