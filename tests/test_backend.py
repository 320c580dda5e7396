"""The graph pass on Dynamo and export graphs, the torch.compile backend, compile() (CPU; GPU skips)."""

import pytest
import torch
from test_lowering import harden, ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sparseforge_compile
from sparseforge_compile.errors import NMViolationError
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.sparse_linear import KernelState, SparseLinear
from sparseforge_compile.models import tiny_model
from sparseforge_compile.passes.lower_sparse import PATTERN_TAG, SPARSE_LINEAR, LowerSparseLinears

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def one_layer_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    harden(model)
    return model


def recording_backend(results):
    """Runs only the lowering pass (no Inductor): cheap, and shows what the backend would lower."""
    def backend(gm, example_inputs):
        results.append(LowerSparseLinears()(gm, example_inputs))
        return gm.forward
    return backend


@pytest.mark.parametrize("name, where, count", [("tiny-llama", ".layers.", 14), ("tiny-gpt2", ".h.", 8)])
def test_pass_lowers_hardened_linears_in_dynamo_graph(name, where, count):
    model = tiny_model(name)
    names = harden(model, where)
    x = ids()
    results = []
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend=recording_backend(results))(x).logits
    stats = results[0].stats
    assert sorted(stats["dense_fallback"]) == sorted(names) and len(names) == count  # CPU: dense op
    ops = [n for n in results[0].gm.graph.nodes if n.op == "call_function" and n.target is SPARSE_LINEAR]
    assert len(ops) == count
    assert torch.equal(out, ref)


def test_pass_on_exported_graph_with_get_attr_weights():
    model = tiny_model("tiny-llama")
    harden(model)
    x = ids()

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    gm = torch.export.export(Logits(model), (x,), strict=False).module()
    with torch.no_grad():
        ref = gm(x)
        result = LowerSparseLinears()(gm)
        assert len(result.stats["dense_fallback"]) == 14
        assert torch.equal(result.gm(x), ref)


def test_pass_refuses_tagged_weight_that_is_not_nm():
    model = tiny_model("tiny-llama")
    harden(model)
    up = model.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        up.weight[0, :4] = 1.0
    setattr(up.weight, PATTERN_TAG, "2:4")
    message = r"model\.layers\.0\.mlp\.up_proj: weight \(128, 64\) is not 2:4: 1 of"
    with pytest.raises(Exception, match=message), torch.no_grad():
        torch.compile(model, backend=recording_backend([]))(ids())
    assert issubclass(NMViolationError, ValueError)


def test_lowered_model_traces_as_one_custom_op_per_layer():
    model = tiny_model("tiny-llama")
    harden(model)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    with pytest.warns(UserWarning):
        sparseforge_compile.lowering.lower.lower_model(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x).logits
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    op = torch.ops.sparseforge.sparse_linear
    assert sum(t in (op, op.default) for t in targets) == 14
    assert torch.equal(out, ref)


def test_backend_through_inductor_matches_eager(monkeypatch):
    """The one Inductor compile on the CPU (slow the first time: Inductor builds its C++ kernels).

    The kernel state is faked to hold a "compressed" tensor as on a GPU, so the graph carries the
    extra buffer that AOTAutograd must accept; on the CPU the op still runs the dense weight.
    """
    import sparseforge_compile.passes.lower_sparse as lower_sparse

    def gpu_like_state(weight, bias, config):
        return KernelState(packed=torch.ones(weight.shape[0], weight.shape[1] // 2), keep_dense=True,
                           fallback_reason=None)

    monkeypatch.setattr(lower_sparse, "build_kernel_state", gpu_like_state)
    model = one_layer_llama()
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        compiled = sparseforge_compile.compile(model, via="backend")
        out = compiled(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # the backend leaves the model as is


def test_backend_follows_changing_sequence_lengths(monkeypatch):
    """generate() and prompts of many lengths: after the second length Dynamo recompiles with a symbolic
    token count; the lowered op (its fake kernel, its runtime dispatch) must take that graph too."""
    import torch._dynamo

    import sparseforge_compile.passes.lower_sparse as lower_sparse

    monkeypatch.setattr(lower_sparse, "build_kernel_state", lambda weight, bias, config: KernelState(
        packed=torch.ones(weight.shape[0], weight.shape[1] // 2), keep_dense=True, fallback_reason=None))
    torch._dynamo.reset()
    model = one_layer_llama()
    compiled = sparseforge_compile.compile(model, via="backend")
    with torch.no_grad():
        for length in (8, 12, 17):
            x = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_compiling_a_dense_model_says_nothing_was_lowered(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    with caplog.at_level("WARNING", logger="sparseforge_compile.lowering.backend"):
        compiled = sparseforge_compile.compile(model, backend="eager")
    assert compiled._sparseforge_report.layers == []
    assert any("nothing was lowered" in r.getMessage() and "Sequential" in r.getMessage() for r in caplog.records)


def test_compile_rejects_unknown_route():
    with pytest.raises(ValueError, match="via='fast'"):
        sparseforge_compile.compile(nn.Linear(4, 4), via="fast")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("via", ["lower", "backend"])
def test_gpu_compile_reduce_overhead(via, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    model = one_layer_llama().to("cuda", torch.bfloat16)
    x = ids().cuda()
    with torch.no_grad():
        ref = model(x).logits.float()
        compiled = sparseforge_compile.compile(model, via=via, mode="reduce-overhead",
                                               dispatch=DispatchConfig(max_bucket=64, keep_dense="never"))
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("fuse", [True, False])
def test_siblings_reading_one_input_become_one_sparse_op(monkeypatch, fuse):
    """q/k/v and gate/up share their input: fused, each group is one op on the row-concatenated
    weight (still 2:4) and a split; o/down stay alone. Same logits as eager."""
    import sparseforge_compile.passes.lower_sparse as lower_sparse

    def gpu_like_state(weight, bias, config):  # as on a GPU: a compressed weight, dense kept for dispatch
        return KernelState(packed=torch.ones(weight.shape[0], weight.shape[1] // 2), keep_dense=True,
                           fallback_reason=None)

    monkeypatch.setattr(lower_sparse, "build_kernel_state", gpu_like_state)
    model = one_layer_llama()
    x = ids()
    results = []

    def backend(gm, example_inputs):
        results.append(LowerSparseLinears(fuse_siblings=fuse)(gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend=backend)(x).logits
    stats = results[0].stats
    ops = [n for n in results[0].gm.graph.nodes if n.op == "call_function" and n.target is SPARSE_LINEAR]
    assert len(stats["sparse"]) == 7
    if fuse:
        groups = sorted(sorted(name.rsplit(".", 1)[-1] for name in g) for g in stats["fused"])
        assert groups == [["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"]]
        assert len(ops) == 4
        fused_widths = sorted(n.args[4] for n in ops)
        assert fused_widths == [64, 64, 64 + 2 * 32, 2 * 128]  # o, down | q+k+v (GQA: k, v 32 wide) | gate+up
    else:
        assert stats["fused"] == [] and len(ops) == 7
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pass_with_the_compact_layout_reads_the_decode_layout_buffers():
    """layout="compact" through the graph pass: every op reads kept values + positions (sibling Linears
    fused into one op on their concatenated weight), no dense weight, and the logits stay the hardened ones."""
    model = tiny_model("tiny-llama")
    harden(model)
    x = ids()
    results = []

    def backend(gm, example_inputs):
        results.append(LowerSparseLinears(dispatch=DispatchConfig(layout="compact"))(gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend=backend)(x).logits
    result = results[0]
    assert len(result.stats["sparse"]) == 14 and not result.stats["dense_fallback"]
    assert sorted(len(group) for group in result.stats["fused"]) == [2, 2, 3, 3]  # q/k/v and gate/up per layer
    ops = [n for n in result.gm.graph.nodes if n.op == "call_function" and n.target is SPARSE_LINEAR]
    assert len(ops) == 14 - 6  # fused groups run as one op
    for op in ops:
        packed, dense, values, meta = op.args[1], op.args[2], op.args[5], op.args[6]
        assert packed is None and dense is None and values is not None and meta is not None
        assert getattr(result.gm, meta.target).dtype == torch.uint8
    assert torch.equal(out, ref)


def test_backend_option_picks_the_layout(monkeypatch):
    import sparseforge_compile.lowering.backend as be

    class Stop(Exception):
        pass

    def spy(pattern, dispatch):
        seen.append(dispatch)
        raise Stop

    seen = []
    monkeypatch.setattr(be, "lower_passes", spy)
    with pytest.raises(Stop):
        be.sparseforge_backend(None, [], options={"sparseforge_layout": "compact", "sparseforge_keep_dense": "never"})
    assert seen[0].layout == "compact" and seen[0].keep_dense == "never"
