"""Mask insertion: a ``sparseforge::apply_mask`` node between each eligible weight and its matmul.

For every eligible layer the pass installs a :class:`~sparseforge_compile.masks.MaskState` as
``gm.sparseforge_masks.<layer name with dots as underscores>`` and rewrites

    weight = get_attr[...]            weight = get_attr[...]
    y = linear(x, weight)      ->     mask = call_module[sparseforge_masks.<layer>]()
                                      masked = sparseforge.apply_mask(weight, mask, transposed)
                                      y = linear(x, masked)

so ``print(gm.graph)`` shows one ``apply_mask`` per eligible layer, and the graph is
differentiable in the weights and in each ``MaskState.score`` (when it requires grad). Scores
start at ``|weight|`` (magnitude; ``init="ones"`` keeps MaskState's default), in the Linear
layout ``(out, in)`` whatever the weight's storage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from sparseforge_compile.masks import MaskState, NMPattern
from sparseforge_compile.ops import APPLY_MASK

from .base import GraphPass, PassConditionError, PassResult, as_graph_module
from .eligibility import (
    DEFAULT_PATTERN,
    EligibilityReport,
    analyze_eligibility,
    matmul_weight,
    validate_exclude,
)

MASK_CONTAINER = "sparseforge_masks"
SCORE_INITS = ("magnitude", "ones")


def mask_module_name(layer: str) -> str:
    """A valid submodule name for a layer: ``model.layers.0.mlp.up_proj`` -> ``model_layers_0_mlp_up_proj``."""
    return re.sub(r"\W", "_", layer) or "root"


def apply_mask_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=APPLY_MASK))


def graph_masks(gm_or_captured: Any) -> dict[str, MaskState]:
    """The masks of a masked graph, by layer name (the original model's module qualified name)."""
    gm = as_graph_module(gm_or_captured)
    masks = {}
    for node in apply_mask_nodes(gm):
        mask_node = node.args[1]
        if isinstance(mask_node, fx.Node) and mask_node.op == "call_module":
            state = gm.get_submodule(mask_node.target)
            if isinstance(state, MaskState):
                masks[state.layer] = state
    return masks


@dataclass
class MaskInsertionResult(PassResult):
    masks: dict[str, MaskState] = field(default_factory=dict)


@dataclass
class InsertMasks(GraphPass):
    """Insert a MaskState + apply_mask in front of every eligible weight matmul."""

    pattern: NMPattern | str = DEFAULT_PATTERN
    exclude: tuple[str, ...] = ()
    init: str = "magnitude"  # initial scores: "magnitude" (|W|) or "ones"
    kernel_constraints: str | None = "cusparselt"  # used only when no eligibility report is given

    def __post_init__(self) -> None:
        self.pattern = NMPattern.parse(self.pattern)
        self.exclude = validate_exclude(self.exclude)
        if self.init not in SCORE_INITS:
            raise ValueError(f"InsertMasks(init={self.init!r}): choose one of {', '.join(SCORE_INITS)}")

    def requires(self, gm: fx.GraphModule) -> None:
        existing = apply_mask_nodes(gm)
        if existing:
            raise PassConditionError(
                f"InsertMasks: the graph already holds {len(existing)} apply_mask nodes; harden it "
                f"(Harden()) before masking again"
            )

    def run(self, gm: fx.GraphModule, eligibility: EligibilityReport | None = None) -> MaskInsertionResult:
        if eligibility is None:
            eligibility = analyze_eligibility(gm, self.pattern, self.exclude, kernel_constraints=self.kernel_constraints)
        elif eligibility.pattern != self.pattern:
            raise ValueError(f"InsertMasks({self.pattern}) given an eligibility report for pattern "
                             f"{eligibility.pattern}: analyze with the same pattern")
        if not hasattr(gm, MASK_CONTAINER):
            gm.add_submodule(MASK_CONTAINER, nn.Module())
        container = gm.get_submodule(MASK_CONTAINER)
        nodes = {node.name: node for node in gm.graph.nodes}
        masks: dict[str, MaskState] = {}
        for info in eligibility.eligible:
            matmul = nodes.get(info.node)
            if matmul is None:
                raise ValueError(f"eligibility report names node {info.node} ({info.name}) that is not in this "
                                 f"graph: analyze the graph being masked")
            use = matmul_weight(matmul)
            if use is None or use[0].get_attr.target != info.target:
                raise ValueError(f"node {info.node} of this graph does not read {info.target} ({info.name}): "
                                 f"analyze the graph being masked")
            weight_node, consumer = use[0].get_attr, use[0].reader
            weight = gm.get_parameter(info.target)
            state = MaskState((info.out_features, info.in_features), self.pattern, layer=info.name)
            state.to(weight.device)
            if self.init == "magnitude":
                state.set_scores((weight.detach().t() if info.transposed else weight.detach()).abs().float())
            sub_name = _unique_name(container, mask_module_name(info.name))
            container.add_module(sub_name, state)
            with gm.graph.inserting_before(consumer):
                mask_node = gm.graph.call_module(f"{MASK_CONTAINER}.{sub_name}")
                masked = gm.graph.call_function(APPLY_MASK, (weight_node, mask_node, info.transposed))
            consumer.replace_input_with(weight_node, masked)
            masked.meta["sparseforge_layer"] = mask_node.meta["sparseforge_layer"] = info.name
            masks[info.name] = state
        gm.graph.lint()
        gm.recompile()
        return MaskInsertionResult(gm=gm, modified=bool(masks), masks=masks,
                                   stats={"masks_inserted": len(masks), "eligible": len(eligibility.eligible),
                                          "matmuls": len(eligibility.layers)})

    def ensures(self, result: PassResult) -> None:
        assert isinstance(result, MaskInsertionResult)
        count = len(apply_mask_nodes(result.gm))
        if count != len(result.masks):
            raise PassConditionError(f"InsertMasks: {count} apply_mask nodes for {len(result.masks)} masks")


def _unique_name(container: nn.Module, name: str) -> str:
    candidate, index = name, 1
    while hasattr(container, candidate):
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def mask_parameters(gm_or_captured: Any) -> list[torch.nn.Parameter]:
    """The score parameters of a masked graph (to hand to an optimizer)."""
    return [state.score for state in graph_masks(gm_or_captured).values()]
