"""OutlineRepeatedBlocks: the flat exported graph's decoder blocks become calls of one shared region."""

import pytest
import torch
from torch import fx

from sparseforge_compile.capture import capture
from sparseforge_compile.layers import find_decoder_blocks
from sparseforge_compile.masks import NMPattern
from sparseforge_compile.models import tiny_model
from sparseforge_compile.passes.base import PassConditionError
from sparseforge_compile.passes.causal_attention import UseCausalAttention
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.passes.insert_masks import InsertMasks
from sparseforge_compile.passes.outline_blocks import BLOCK_MODULE, OutlineRepeatedBlocks

PATTERN = NMPattern(2, 4)


def masked_graph(device: str = "cpu"):
    model = tiny_model("tiny-llama").to(device)
    ids = torch.randint(0, 256, (2, 32), device=device)
    captured = capture(model, (ids,))
    report = analyze_eligibility(captured, PATTERN, kernel_constraints=None)
    UseCausalAttention()(captured.gm)
    masks = InsertMasks(PATTERN)(captured.gm, report).masks
    for ms in masks.values():
        ms.set_schedule(0.3, 0.0)
    return model, captured.gm, masks, ids


def outline(model, gm):
    path, blocks = find_decoder_blocks(model)
    return OutlineRepeatedBlocks(path, len(blocks))(gm)


def grads(model, fn, masks, ids):
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    for ms in masks.values():
        ms.feed(ms.make_mask(leaf=True))
    out = fn(ids)
    out.float().square().mean().backward()
    for ms in masks.values():
        ms.feed(None)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_blocks_become_calls_of_one_region_and_compute_the_same():
    model, gm, masks, ids = masked_graph()
    result = outline(model, gm)
    calls = [n for n in result.gm.graph.nodes if n.op == "call_module" and n.target == BLOCK_MODULE]
    assert result.stats["blocks"] == len(calls) == 2
    # Every mask node and parameter is an input of the region; the flat graph is untouched.
    assert result.stats["block_inputs"] >= 7 + 7 + 2
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == BLOCK_MODULE) == 0
    out_flat, g_flat = grads(model, gm, masks, ids)
    out_outlined, g_outlined = grads(model, result.gm, masks, ids)
    assert torch.equal(out_flat, out_outlined)
    assert g_flat.keys() == g_outlined.keys() and all(torch.equal(g_flat[k], g_outlined[k]) for k in g_flat)


def test_compiled_outlined_graph_has_the_flat_graphs_gradients_aot_eager():
    model, gm, masks, ids = masked_graph()
    outlined = outline(model, gm).gm
    _, g_flat = grads(model, gm, masks, ids)
    _, g_compiled = grads(model, torch.compile(outlined, backend="aot_eager", dynamic=False), masks, ids)
    for name, g in g_flat.items():
        torch.testing.assert_close(g_compiled[name], g, rtol=1e-4, atol=1e-6)


def test_blocks_that_differ_are_left_flat():
    model, gm, _, _ = masked_graph()
    path, blocks = find_decoder_blocks(model)
    victim = next(n for n in gm.graph.nodes if n.op == "call_function" and f"{path}.1" in str(n.meta.get("nn_module_stack")))
    with gm.graph.inserting_after(victim):
        extra = gm.graph.call_function(torch.ops.aten.mul.Tensor, (victim, 1.0))
    victim.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    extra.meta = dict(victim.meta)
    gm.recompile()
    with pytest.raises(PassConditionError, match="block 1 .* computes something else"):
        OutlineRepeatedBlocks(path, len(blocks))(gm)
    assert isinstance(gm, fx.GraphModule)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_gradients_of_the_regionally_compiled_block(device):
    """outline_blocks="regional": the shared block's body compiled alone and called for every block,
    the graph around it eager; the same gradients as the flat graph, and one compiled frame for all
    blocks (no recompilation per block)."""
    from sparseforge_compile.passes.outline_blocks import SharedBlock

    torch._dynamo.reset()
    model, gm, masks, ids = masked_graph(device)
    outlined = outline(model, gm).gm
    _, g_flat = grads(model, gm, masks, ids)
    shared = [m for m in outlined.modules() if isinstance(m, SharedBlock)]
    assert len(shared) == 1
    shared[0].compile_body()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):  # the second step reuses what the first compiled
        _, g_regional = grads(model, outlined, masks, ids)
        for name, g in g_flat.items():
            torch.testing.assert_close(g_regional[name], g, rtol=1e-3, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
