"""Graph pass: outline the repeated decoder blocks of a flat graph into one shared region.

``torch.export`` inlines every decoder block, so a 30-layer model is one flat graph and
``torch.compile`` traces, lowers and code-generates all 30 copies of the same block (SmolLM2 on the CPU:
SparseForge's first, compiling step 75.5 s flat, 33.1 s outlined; benchmarks/results/step_time_cpu_compile.json).
This pass checks that the blocks' subgraphs are the
same computation (same ops in the same order, same constants; only the parameters and masks they
read differ) and returns a new graph in which each block is a call of one function taking the
block's activations, parameters and masks as inputs, marked ``torch.compiler.nested_compile_region``
so that the compiler builds it once and reuses it for every block. In eager mode the region is a
plain call: the outlined graph computes exactly what the flat one does (tested). The loop
(``--outline-blocks regional``) compiles the block's body alone (:meth:`SharedBlock.compile_body`):
Inductor differentiated wrongly through a nested region's first call with buffer reuse on.

The input graph is left as it is (hardening, lowering and the report keep working on it); the
outlined one shares its parameters, mask modules and taps. Inputs of a block: ``get_attr`` and
``call_module`` nodes (parameters, masks) and any value computed outside the block (the hidden
state, rotary tables, sizes). ``apply_mask`` nodes belong to the block of the Linear they feed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from sparseforge_compile.ops import APPLY_MASK

from .base import GraphPass, PassConditionError, PassResult, module_paths


@dataclass
class _Block:
    body: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    signature: tuple


BLOCK_MODULE = "sparseforge_shared_block"


class SharedBlock(torch.nn.Module):
    """The outlined block, called once per block with that block's inputs."""

    def __init__(self, block_gm: fx.GraphModule) -> None:
        super().__init__()
        self.body = block_gm

        def sparseforge_block(*args: Any) -> Any:
            return self.body(*args)

        self._region = torch.compiler.nested_compile_region(sparseforge_block)

    def forward(self, *args: Any) -> Any:
        return self._region(*args)

    def compile_body(self) -> None:
        """Compile the block's body on its own, once, and call that for every block ("regional"
        compilation, as ``nn.Module.compile`` per decoder block does for the plain model): the graph
        around it then runs eagerly, and no nested region is involved."""
        self._region = torch.compile(self.body, dynamic=False)


@dataclass
class OutlineRepeatedBlocks(GraphPass):
    """Outline blocks ``{blocks_path}.{i}`` (``i < blocks``) into one ``nested_compile_region``."""

    blocks_path: str
    blocks: int

    def requires(self, gm: fx.GraphModule) -> None:
        if self.blocks < 2:
            raise PassConditionError(f"OutlineRepeatedBlocks: nothing repeats in {self.blocks} block(s)")
        if not hasattr(torch.compiler, "nested_compile_region"):
            raise PassConditionError("OutlineRepeatedBlocks: this torch has no torch.compiler.nested_compile_region")

    def _block_of(self, node: fx.Node) -> int | None:
        for path in module_paths(node):
            for i in range(self.blocks):
                name = f"{self.blocks_path}.{i}"
                if path == name or path.endswith("." + name) or f".{name}." in f".{path}.":
                    return i
        return None

    def _partition(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        bodies: list[list[fx.Node]] = [[] for _ in range(self.blocks)]
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            index = self._block_of(node)
            if index is None and node.target is APPLY_MASK:  # no module stack: its Linear's block
                index = next((self._block_of(user) for user in node.users), None)
            if index is not None:
                bodies[index].append(node)
        empty = [i for i, body in enumerate(bodies) if not body]
        if empty:
            raise PassConditionError(f"OutlineRepeatedBlocks: no nodes for block(s) {empty[:5]} of {self.blocks_path}")
        return bodies

    @staticmethod
    def _describe(body: list[fx.Node]) -> _Block:
        members = {node: i for i, node in enumerate(body)}
        inputs: list[fx.Node] = []
        index_of: dict[fx.Node, int] = {}

        def canon(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                if arg in members:
                    return ("body", members[arg])
                if arg not in index_of:
                    index_of[arg] = len(inputs)
                    inputs.append(arg)
                return ("input", index_of[arg])
            if isinstance(arg, (list, tuple)):
                return (type(arg).__name__, tuple(canon(a) for a in arg))
            if isinstance(arg, dict):
                return ("dict", tuple((k, canon(v)) for k, v in sorted(arg.items())))
            return ("const", repr(arg))

        signature = tuple((node.target, canon(node.args), canon(node.kwargs)) for node in body)
        outputs = [node for node in body if any(user not in members for user in node.users)]
        return _Block(body, inputs, outputs, signature + (tuple(members[n] for n in outputs),))

    def run(self, gm: fx.GraphModule) -> PassResult:
        blocks = [self._describe(body) for body in self._partition(gm)]
        first = blocks[0]
        for i, block in enumerate(blocks[1:], start=1):
            if block.signature != first.signature:
                raise PassConditionError(f"OutlineRepeatedBlocks: block {i} of {self.blocks_path} computes "
                                         f"something else than block 0; left flat")
        # The shared function: block 0's body, its inputs as placeholders.
        block_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for k, node in enumerate(first.inputs):
            env[node] = block_graph.placeholder(f"in_{k}")
        for node in first.body:
            env[node] = block_graph.node_copy(node, lambda n: env[n])
        block_graph.output(tuple(env[n] for n in first.outputs))
        block_gm = fx.GraphModule(torch.nn.Module(), block_graph, class_name="SparseforgeBlock")

        # The main graph: every node outside the blocks, and one call per block where its last node was.
        owner = {node: i for i, block in enumerate(blocks) for node in block.body}
        last = {block.body[-1]: i for i, block in enumerate(blocks)}
        graph = fx.Graph()
        graph.set_codegen(gm.graph._codegen)  # an exported graph's pytree in/out handling
        env = {}
        for node in gm.graph.nodes:
            i = owner.get(node)
            if i is None:
                missing = [a for a in node.all_input_nodes if a not in env]
                if missing:
                    raise PassConditionError(f"OutlineRepeatedBlocks: {node.name} reads {missing[0].name} from "
                                             f"inside a block before the block ends; left flat")
                env[node] = graph.node_copy(node, lambda n: env[n])
                continue
            if node not in last:
                continue
            block = blocks[i]
            call = graph.call_module(BLOCK_MODULE, tuple(env[n] for n in block.inputs))
            for k, out in enumerate(block.outputs):
                env[out] = graph.call_function(operator.getitem, (call, k))
                env[out].meta = dict(out.meta)
        root = torch.nn.Module()
        for name, child in gm.named_children():
            root.add_module(name, child)
        root.add_module(BLOCK_MODULE, SharedBlock(block_gm))
        for node in graph.nodes:  # parameters and buffers read by get_attr, shared with the flat graph
            if node.op == "get_attr" and not hasattr(root, node.target.split(".")[0]):
                _copy_attr(gm, root, node.target)
        new_gm = fx.GraphModule(root, graph, class_name=type(gm).__name__)
        return PassResult(gm=new_gm, modified=True,
                          stats={"blocks": len(blocks), "nodes_per_block": len(first.body),
                                 "block_inputs": len(first.inputs), "block_outputs": len(first.outputs)})


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    for part in path:
        src = getattr(src, part)
        if not hasattr(dst, part):
            dst.add_module(part, torch.nn.Module())
        dst = getattr(dst, part)
    value = getattr(src, leaf)
    if isinstance(value, torch.nn.Parameter):
        dst.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        dst.register_buffer(leaf, value)
    else:
        setattr(dst, leaf, value)
