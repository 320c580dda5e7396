"""InlineMaskOps: apply_mask nodes become weight * mask in a copy, same values and gradients."""

import pytest
import torch
from torch import nn

from sparseforge_compile.capture import capture
from sparseforge_compile.masks import make_masks
from sparseforge_compile.models import load_model
from sparseforge_compile.ops import APPLY_MASK
from sparseforge_compile.passes.base import PassConditionError
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.passes.inline_masks import InlineMaskOps
from sparseforge_compile.passes.insert_masks import InsertMasks


def masked(model: nn.Module, ids: torch.Tensor):
    captured = capture(model, (ids,))
    report = analyze_eligibility(captured, "2:4", kernel_constraints=None)
    masks = InsertMasks("2:4")(captured.gm, report).masks
    return captured.gm, masks


def mask_ops(gm) -> int:
    return sum(1 for m in gm.modules() if hasattr(m, "graph")
               for n in m.graph.nodes if n.op == "call_function" and n.target is APPLY_MASK)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # GPT-2's Conv1D: transposed weights
def test_inlined_graph_has_the_ops_values_and_gradients(name):
    model = load_model(name).model.train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gm, masks = masked(model, ids)
    before = mask_ops(gm)
    result = InlineMaskOps()(gm)
    assert before > 0 and result.stats["inlined"] == before
    assert mask_ops(gm) == before and mask_ops(result.gm) == 0  # the original keeps its ops (hardening)
    states = list(masks.values())
    with torch.no_grad():  # soft masks, not 0/1: the multiply must be the op's multiply
        for ms in states:
            ms.set_scores(torch.rand_like(ms.score))
            ms.set_schedule(0.5, 0.0)

    def run(graph):
        model.zero_grad(set_to_none=True)
        fed = make_masks(states, leaf=True)
        for ms, mask in zip(states, fed):
            ms.feed(mask)
        out = graph(ids)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        logits.float().square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logits.detach(), grads, [m.grad.clone() for m in fed]

    assert type(gm(ids)) is type(result.gm(ids))  # same calling convention (an exported graph's pytree)
    want, want_grads, want_mask_grads = run(gm)
    got, got_grads, got_mask_grads = run(result.gm)
    assert torch.equal(got, want)
    assert len(got_grads) == len(want_grads) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    assert all(torch.equal(a, b) for a, b in zip(got_mask_grads, want_mask_grads))


def test_nested_graphs_are_rewritten_in_place_only():
    from torch import fx

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))
            self.register_buffer("m", torch.ones(4, 8))

        def forward(self, x):
            return x @ APPLY_MASK(self.w, self.m, False).t()

    inner = fx.symbolic_trace(Outer())
    outer = nn.Module()
    outer.inner = inner
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("inner", (x,)))
    gm = fx.GraphModule(outer, graph)
    with pytest.raises(PassConditionError, match="copy=False"):
        InlineMaskOps()(gm)  # a copy would share, and so change, the nested graph
    result = InlineMaskOps(copy=False)(gm)
    assert result.stats["inlined"] == 1 and mask_ops(gm) == 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), x @ inner.w.t())
