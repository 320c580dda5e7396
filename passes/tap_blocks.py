"""Block-output taps: record the residual stream after each decoder block while the graph runs.

Layer-wise distillation (``distill.hidden_state_loss``) compares the student's hidden state after
every decoder block with the teacher's. The teacher and the plain student are Hugging Face modules
(forward hooks do the job), but the masked graph inlines the blocks, so this pass finds each
block's output node, the last node the export attributed to that block (``nn_module_stack``), and
adds a ``call_module`` to a :class:`BlockOutputRecorder` after it:

    h = aten.add(residual, mlp_out)        h = aten.add(residual, mlp_out)
                                    ->     _ = call_module[sparseforge_block_taps](h, 3)

The recorder is impure (never dead-code eliminated) and records only while ``enabled``; the graph's
outputs and numerics are unchanged. :func:`remove_block_taps` undoes the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .base import GraphPass, PassConditionError, PassResult, module_paths

TAP_MODULE = "sparseforge_block_taps"


class BlockOutputRecorder(nn.Module):
    """Keeps the tensors the taps hand it, by block index, while ``enabled``; returns its input."""

    _is_impure = True  # FX dead-code elimination must keep the tap nodes: they have no users

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.enabled = False
        self.outputs: dict[int, torch.Tensor] = {}

    def forward(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        if self.enabled:
            self.outputs[index] = hidden
        return hidden

    def clear(self) -> None:
        self.outputs = {}

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs in block order, and forget them (they hold the autograd graph)."""
        if len(self.outputs) != self.blocks:
            raise RuntimeError(f"block taps recorded {len(self.outputs)} of {self.blocks} blocks: "
                               f"run the graph with the recorder enabled first")
        out = [self.outputs[i] for i in range(self.blocks)]
        self.outputs = {}
        return out


@dataclass
class TapBlockOutputs(GraphPass):
    """Adds a recorder tap after the output node of each block ``{blocks_path}.{i}``.

    ``blocks_path`` is the qualified name of the model's block list (``model.layers``); graph module
    paths may carry a wrapper prefix (``model.model.layers.0``), so a path matches when it ends with
    ``.{blocks_path}.{i}`` or equals it.
    """

    blocks_path: str
    blocks: int

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, TAP_MODULE):
            raise PassConditionError(f"TapBlockOutputs: the graph already has block taps ({TAP_MODULE})")
        if self.blocks < 1:
            raise PassConditionError(f"TapBlockOutputs: need at least one block, got {self.blocks}")

    def _block_of(self, path: str) -> int | None:
        for i in range(self.blocks):
            name = f"{self.blocks_path}.{i}"
            if path == name or path.endswith("." + name):
                return i
        return None

    def run(self, gm: fx.GraphModule) -> PassResult:
        last: dict[int, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            for path in module_paths(node):
                index = self._block_of(path)
                if index is not None:
                    last[index] = node
        missing = [i for i in range(self.blocks) if i not in last]
        if missing:
            raise PassConditionError(
                f"TapBlockOutputs: no graph node belongs to block(s) {missing[:5]} of {self.blocks_path} "
                f"(the export kept no nn_module_stack for them); layer-wise distillation cannot run on this "
                f"graph: set --hidden-weight 0"
            )
        gm.add_module(TAP_MODULE, BlockOutputRecorder(self.blocks))
        for index, node in last.items():
            with gm.graph.inserting_after(node):
                gm.graph.call_module(TAP_MODULE, (node, index))
        gm.recompile()
        return PassResult(gm=gm, modified=True, stats={"taps": len(last)})

    def ensures(self, result: PassResult) -> None:
        taps = result.gm.graph.find_nodes(op="call_module", target=TAP_MODULE)
        if len(taps) != self.blocks:
            raise PassConditionError(f"TapBlockOutputs: {len(taps)} taps for {self.blocks} blocks")


def block_recorder(gm: fx.GraphModule) -> BlockOutputRecorder:
    recorder = getattr(gm, TAP_MODULE, None)
    if not isinstance(recorder, BlockOutputRecorder):
        raise RuntimeError("the graph has no block taps: run TapBlockOutputs first")
    return recorder


def remove_block_taps(gm: fx.GraphModule) -> int:
    """Erase the tap nodes and the recorder; returns how many taps were removed."""
    taps = list(gm.graph.find_nodes(op="call_module", target=TAP_MODULE))
    for node in taps:
        gm.graph.erase_node(node)
    if hasattr(gm, TAP_MODULE):
        delattr(gm, TAP_MODULE)
    gm.recompile()
    return len(taps)
