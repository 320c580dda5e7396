"""Eager lowering to SparseLinear, the sparse_linear op, the algorithm cache (CPU; GPU tests skip)."""

import json

import pytest
import torch
from torch import nn

from sparseforge_compile.errors import NMViolationError
from sparseforge_compile.lowering.dispatch import (
    AlgorithmCache,
    DispatchConfig,
    calibrate,
    shape_key,
    token_bucket,
)
from sparseforge_compile.lowering.kernels import KernelChoice
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.lowering.sparse_linear import SparseLinear, sparse_linear
from sparseforge_compile.masks import NMPattern, nm_mask
from sparseforge_compile.models import tiny_model

P24 = NMPattern(2, 4)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def harden(model: nn.Module, where: str = ".layers.") -> list[str]:
    """Prune every Linear (or Conv1D) under ``where`` to exact 2:4 by magnitude; the names pruned."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if where not in name:
                continue
            if isinstance(module, nn.Linear):
                module.weight.mul_(nm_mask(module.weight.abs(), P24))
            elif type(module).__name__ == "Conv1D":
                module.weight.mul_(nm_mask(module.weight.abs().t(), P24).t())
            else:
                continue
            names.append(name)
    return names


@pytest.fixture
def hardened_llama():
    model = tiny_model("tiny-llama")
    names = harden(model)
    return model, names


def ids(batch=2, seq=12):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_lowering_keeps_logits_identical(hardened_llama):
    model, names = hardened_llama
    x = ids()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x).logits
    with pytest.warns(UserWarning, match="device cpu has no sparse tensor cores"):
        report = lower_model(model)
    assert sorted(layer.name for layer in report.layers) == sorted(names) and len(names) == 14
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)
    assert isinstance(model.lm_head, nn.Linear)  # dense, not hardened: untouched
    assert report.fallback_layers == 14 and report.memory_ratio == 1.0
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    after_sd = model.state_dict()  # same keys and values as the hardened model: checkpoints stay portable
    assert after_sd.keys() == before_sd.keys()
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)


def test_lowering_by_registry_and_generate(hardened_llama):
    model, names = hardened_llama
    chosen = names[:3]
    model._sparseforge_layers = {n: {"pattern": "2:4", "transposed": False} for n in chosen}
    prompt = ids(1, 6)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=5, do_sample=False)
    with pytest.warns(UserWarning):
        report = lower_model(model)
    assert [layer.name for layer in report.layers] == chosen
    assert isinstance(model.get_submodule(names[3]), nn.Linear)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), ref)


def test_lowering_refuses_non_nm_weight_and_leaves_model_unchanged(hardened_llama):
    model, names = hardened_llama
    bad = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(bad).weight.add_(0.5)  # every group now holds 4 nonzeros
    groups = model.get_submodule(bad).weight.numel() // 4
    with pytest.raises(NMViolationError, match=rf"{bad}: weight \(128, 64\) is not 2:4: {groups} of {groups} groups"):
        lower_model(model, layers=names)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_lowering_unknown_or_wrong_layer_is_named(hardened_llama):
    model, _ = hardened_llama
    with pytest.raises(ValueError, match="model.layers.9.mlp: no such layer"):
        lower_model(model, layers=["model.layers.9.mlp"])
    with pytest.raises(ValueError, match="model.norm: a LlamaRMSNorm cannot be lowered"):
        lower_model(model, layers=["model.norm"])


def test_lowering_gpt2_conv1d():
    model = tiny_model("tiny-gpt2")
    names = harden(model, where=".h.")
    x = ids()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x).logits
    with pytest.warns(UserWarning):
        report = lower_model(model)
    assert len(report.layers) == len(names) == 8
    fc = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert (fc.in_features, fc.out_features) == (64, 256)  # Conv1D weight (in, out) = (64, 256)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert model.state_dict()["transformer.h.0.mlp.c_fc.weight"].shape == sd["transformer.h.0.mlp.c_fc.weight"].shape


def test_sparse_linear_module_from_dense_cast_and_load():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w = w * nm_mask(w.abs(), P24)
    b = torch.randn(32)
    layer = SparseLinear.from_dense(w, b, "2:4", layer="probe")
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, w, b))
    layer = layer.to(torch.float64)  # a cast re-installs (and re-checks) the weight
    assert layer.dense_weight.dtype == torch.float64
    torch.testing.assert_close(layer(x.double()), nn.functional.linear(x.double(), w.double(), b.double()))
    other = w.clone()
    other[0, :4] = 1.0
    with pytest.raises(RuntimeError, match="probe: weight \\(32, 64\\) is not 2:4: 1 of 512 groups"):
        layer.load_state_dict({"weight": other.double(), "bias": b.double()})
    with pytest.raises(NMViolationError, match="mlp: weight"):
        SparseLinear.from_dense(torch.ones(8, 8), layer="mlp")


def test_sparse_linear_op_registration():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w = w * nm_mask(w.abs(), P24)
    x = torch.randn(2, 3, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    torch.library.opcheck(sparse_linear, (x, None, w.requires_grad_(), b, 16))
    torch.library.opcheck(sparse_linear, (x.detach()[0], None, w.detach(), None, 16))
    y = sparse_linear(x, None, w, b, 16)
    y.sum().backward()  # gradients match F.linear's
    ref_x = x.detach().clone().requires_grad_()
    nn.functional.linear(ref_x, w.detach(), b.detach()).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_dispatch_config_and_buckets():
    assert DispatchConfig().buckets == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    assert [token_bucket(t) for t in (1, 16, 17, 100, 4096, 4097)] == [16, 16, 32, 128, 4096, 8192]
    with pytest.raises(ValueError, match="max_bucket=1000"):
        DispatchConfig(max_bucket=1000)
    with pytest.raises(ValueError, match="keep_dense"):
        DispatchConfig(keep_dense="sometimes")


def test_algorithm_cache_round_trips_through_disk(tmp_path):
    skey = shape_key("NVIDIA H200", 11008, 4096, torch.bfloat16)
    cache = AlgorithmCache(tmp_path)
    fast = KernelChoice(alg_id=3, split_k=2, split_k_mode=1, dense_ms=0.6, sparse_ms=0.4)
    slow = KernelChoice(use_dense=True, dense_ms=0.02, sparse_ms=0.09)
    cache.put(skey, 4096, fast)
    cache.put(skey, 16, slow)
    stored = json.loads((tmp_path / "kernel_plans.json").read_text())["entries"]
    assert f"NVIDIA H200|torch {torch.__version__}|11008x4096|bfloat16|bucket 4096" in stored
    again = AlgorithmCache(tmp_path)  # another process: reads the file
    assert again.get(skey, 4096) == fast and again.get(skey, 16) == slow
    assert again.lookup(skey, 1) == slow and again.lookup(skey, 3000) == fast
    assert again.lookup(skey, 100000) == fast  # beyond the largest bucket: the largest
    assert again.get(shape_key("NVIDIA H200", 4096, 4096, torch.bfloat16), 16) is None


def test_calibrate_measures_each_bucket_once_across_processes(tmp_path, monkeypatch):
    import sparseforge_compile.lowering.dispatch as sl

    calls = []

    def fake_measure(weight, packed, bias, bucket):
        calls.append(bucket)
        return KernelChoice(use_dense=bucket < 64, dense_ms=1.0, sparse_ms=2.0 if bucket < 64 else 0.5)

    monkeypatch.setattr(sl, "measure_bucket", fake_measure)
    config = DispatchConfig(max_bucket=128, cache_dir=str(tmp_path))
    w = torch.zeros(32, 64)
    table = calibrate(w, w, None, config, cache=AlgorithmCache(tmp_path))
    assert calls == [16, 32, 64, 128] and [b for b, c in table.items() if c.use_dense] == [16, 32]
    table2 = calibrate(w, w, None, config, cache=AlgorithmCache(tmp_path))  # fresh instance, same dir
    assert calls == [16, 32, 64, 128] and table2 == table


@pytest.mark.parametrize("bucket, confirm_ms, dense", [
    (1024, ((1.0, 0.9), (0.92, 1.0)), False),  # both orders: sparse >= 4 % faster
    (1024, ((1.0, 0.99), (0.9, 1.0)), True),  # dense first: a near tie
    (1024, ((1.0, 0.9), (0.99, 1.0)), True),  # sparse first (results come back in replay order): a near tie
    (256, ((1.0, 0.9), (0.92, 1.0)), True),  # below 1024 tokens 8 % is not enough
    (256, ((1.0, 0.85), (0.88, 1.0)), False),  # >= 10 % in both orders
])
def test_dispatch_retimes_the_fastest_sparse_config_against_dense(monkeypatch, bucket, confirm_ms, dense):
    """The best of many noisy timings is biased low: the winner is timed again, head to head with
    dense, in both replay orders, and the pair less favourable to sparse decides (here the first
    pass says 0.8 ms against dense's 1.0 ms); below 1024 tokens it must win by 10 %, not 4 %."""
    import sparseforge_compile.lowering.dispatch as sl

    timed = []

    def fake_times(variants, target_ms=4.0, replays=7):
        timed.append(len(variants))
        return [1.0, 1.2, 0.8, 1.1] if len(timed) == 1 else list(confirm_ms[len(timed) - 2])

    monkeypatch.setattr(sl, "rotation_copies", lambda nbytes, device, cap=4: 1)
    monkeypatch.setattr(sl, "_candidate_choices", lambda packed, x, bias, bucket: [
        KernelChoice(alg_id=a) for a in (0, 5, 9)])
    monkeypatch.setattr(sl, "_runs", lambda fn: True)
    monkeypatch.setattr(sl, "graph_times_ms", fake_times)
    w = torch.zeros(32, 64)
    choice = sl.measure_bucket(w, w, None, bucket)
    assert timed == [4, 2, 2]  # dense + three candidates, then dense + the winner in each order
    assert choice.alg_id == 5 and choice.use_dense is dense
    pairs = [confirm_ms[0], confirm_ms[1][::-1]]  # as (dense, sparse)
    assert (choice.dense_ms, choice.sparse_ms) == min(pairs, key=lambda p: p[0] / p[1])


def test_dispatch_does_not_retime_when_dense_already_wins(monkeypatch):
    import sparseforge_compile.lowering.dispatch as sl

    timed = []
    monkeypatch.setattr(sl, "rotation_copies", lambda nbytes, device, cap=4: 1)
    monkeypatch.setattr(sl, "_candidate_choices", lambda packed, x, bias, bucket: [KernelChoice(alg_id=0)])
    monkeypatch.setattr(sl, "_runs", lambda fn: True)
    monkeypatch.setattr(sl, "graph_times_ms", lambda variants, **kw: timed.append(1) or [1.0, 0.99])
    w = torch.zeros(32, 64)
    choice = sl.measure_bucket(w, w, None, 16)
    assert timed == [1] and choice.use_dense and choice.sparse_ms == 0.99


# ------------------------------------------------------------------ GPU (skipped without CUDA)

@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 256])
def test_gpu_sparse_op_matches_dense(tokens, tmp_path, monkeypatch):
    import sparseforge_compile.lowering.dispatch as dp
    import sparseforge_compile.lowering.kernels as sl

    torch.manual_seed(tokens)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = w * nm_mask(w.abs(), P24)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    packed = sl.compress(w)
    assert torch.equal(sl.decompress(packed, 512), w)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    ref = (x.double() @ w.double().t() + b.double())
    for choice in [sl.DEFAULT_CHOICE, *dp._candidate_choices(packed, x, b, dp.token_bucket(tokens))]:
        for bias in (b, None):
            y = sl.sparse_linear_2d(x, packed, bias, choice)
            want = ref if bias is not None else ref - b.double()
            err = float((y.double() - want).norm() / want.norm())
            assert y.shape == (tokens, 256) and err < 1e-2, (choice, bias is None, err)


@cuda
@pytest.mark.gpu
def test_gpu_lowering_tiny_llama(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    model = tiny_model("tiny-llama").to("cuda", torch.bfloat16)
    harden(model)
    x = ids().cuda()
    with torch.no_grad():
        ref = model(x).logits.float()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # keep_dense="never" forces the kernel: at these tiny shapes cuBLAS may win every bucket
    report = lower_model(model, config=DispatchConfig(max_bucket=64, keep_dense="never"))
    assert report.sparse_layers == 14, report.summary()
    with torch.no_grad():
        out = model(x).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    entries = json.loads((tmp_path / "kernel_plans.json").read_text())["entries"]
    assert any(torch.cuda.get_device_name() in k for k in entries)
    for name, w in weights.items():  # compressed weights decompress to the exact hardened weights
        module = model.get_submodule(name)
        if isinstance(module, SparseLinear):
            assert torch.equal(module.materialize_weight(), w)
    model.cpu()
    assert torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").dense_weight,
                       weights["model.layers.0.mlp.up_proj"].cpu())


def test_layers_where_dense_wins_every_bucket_stay_dense_linears(hardened_llama, monkeypatch):
    """SmolLM2-135M on the H200: cuBLAS won every bucket for every layer and the lowered model ran at
    0.73x (prefill) of dense from the op's call overhead alone. Such layers stay nn.Linear."""
    import sparseforge_compile.lowering.sparse_linear as sl

    model, names = hardened_llama
    # Pretend a sparse-capable device: compression is the identity, and the measured dispatch says
    # dense wins everywhere for the MLP's (out, in) = (64, 32) down-projection shape only.
    monkeypatch.setattr(sl, "sparse_unsupported_reason", lambda w: None)
    monkeypatch.setattr(sl, "compress", lambda w: w.clone())
    monkeypatch.setattr(sl, "decompress", lambda packed, n: packed)

    def fake_calibrate(weight, packed, bias, config, cache=None):
        dense = tuple(weight.shape) == (64, 128)
        return {b: KernelChoice(use_dense=dense, dense_ms=1.0, sparse_ms=2.0 if dense else 0.5) for b in config.buckets}

    monkeypatch.setattr(sl, "calibrate", fake_calibrate)
    kept = {n for n in names if tuple(model.get_submodule(n).weight.shape) == (64, 128)}
    assert kept and len(kept) < len(names)
    originals = {n: model.get_submodule(n) for n in kept}
    report = lower_model(model, config=DispatchConfig(calibrate=False))
    assert report.dense_faster_layers == len(kept) and report.sparse_layers == len(names) - len(kept)
    assert any("left as dense Linears" in w for w in report.warnings)
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear if name in kept else SparseLinear), name
    assert "left dense (cuBLAS faster)" in report.summary()
    by_name = {layer.name: layer for layer in report.layers}
    assert all(by_name[n].kernel == "dense-faster" and by_name[n].bytes_compressed == 0 for n in kept)
    assert all(model.get_submodule(n) is originals[n] for n in kept)  # the very same Linear, untouched


@pytest.mark.parametrize("dense_buckets, expected", [((16, 32, 64), 64), ((), 0), ((16, 64), 16), ((32,), 0)])
def test_dense_up_to_is_the_dense_prefix_of_the_buckets(dense_buckets, expected):
    from sparseforge_compile.lowering.sparse_linear import KernelState

    state = KernelState(packed=torch.zeros(1), keep_dense=bool(dense_buckets), fallback_reason=None,
                        dense_buckets=dense_buckets)
    assert state.dense_up_to(DispatchConfig(max_bucket=256).buckets) == expected


def test_small_token_calls_skip_the_op_where_dispatch_chose_dense(monkeypatch):
    """Buckets 16-64 measured dense, larger sparse: calls of <= 64 tokens are a plain F.linear in the
    traced graph (Inductor sees a matmul, eager skips the op), larger ones the sparse op."""
    import sparseforge_compile.lowering.sparse_linear as sl

    monkeypatch.setattr(sl, "sparse_unsupported_reason", lambda w: None)
    monkeypatch.setattr(sl, "compress", lambda w: w.clone())
    monkeypatch.setattr(sl, "calibrate", lambda weight, packed, bias, config, cache=None: {
        b: KernelChoice(use_dense=b <= 64, dense_ms=1.0, sparse_ms=2.0 if b <= 64 else 0.5) for b in config.buckets})
    w = torch.randn(32, 64)
    w = w * nm_mask(w.abs(), P24)
    layer = SparseLinear.from_dense(w, torch.randn(32), "2:4", config=DispatchConfig(calibrate=False))
    assert layer.dense_up_to == 64 and layer.dense_weight is not None
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    op = torch.ops.sparseforge.sparse_linear.default
    for tokens, uses_op in ((1, False), (64, False), (65, True), (300, True)):
        x = torch.randn(tokens, 64)
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(layer, backend=backend, dynamic=False)(x)
        targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
        assert (op in targets or torch.ops.sparseforge.sparse_linear in targets) == uses_op, tokens
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, layer.bias))


# ------------------------------------------------------------------ layout="compact": the decode layout on the CPU

COMPACT = DispatchConfig(layout="compact")


def _two_four(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * nm_mask(w.abs(), P24)).to(dtype)


@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 0.5625), (torch.float32, 0.53125)])
def test_compact_layer_holds_only_the_decode_layout_and_computes_through_it(dtype, ratio, monkeypatch):
    import sparseforge_compile.lowering.sparse_linear as sl

    w, b = _two_four(48, 96, dtype), torch.randn(48).to(dtype)
    layer = SparseLinear.from_dense(w, b, "2:4", layer="probe", config=COMPACT)
    assert layer.state.kernel == "decode" and layer.state.fallback_reason is None
    assert layer.dense_weight is None and layer.packed is None  # no dense copy anywhere
    assert layer.values.shape == (48, 48) and layer.meta.shape == (48, 12) and layer.meta.dtype == torch.uint8
    assert torch.equal(layer.materialize_weight(), w)
    held = layer.weight_bytes()
    assert held["compressed"] / held["dense_reference"] == ratio and held["dense_copy"] == held["dense_fallback"] == 0
    unpacked = []  # the forward really goes through the decode layout (the kernel's unpacking fallback)
    real_unpack = sl.decode_kernel.unpack
    monkeypatch.setattr(sl.decode_kernel, "unpack", lambda p: unpacked.append(p) or real_unpack(p))
    for shape in ((5, 96), (2, 3, 96), (1, 96)):
        x = torch.randn(*shape).to(dtype)
        assert torch.equal(layer(x), nn.functional.linear(x, w, b))
    assert len(unpacked) == 3 and all(p.values is layer.values for p in unpacked)


def test_compact_state_dict_round_trips_and_reinstalls_on_cast():
    w, b = _two_four(32, 64), torch.randn(32)
    layer = SparseLinear.from_dense(w, b, "2:4", config=COMPACT)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], w)  # the hardened layer's keys and values
    other = SparseLinear.from_dense(_two_four(32, 64, seed=1), torch.zeros(32), "2:4", config=COMPACT)
    other.load_state_dict(sd)
    assert other.state.kernel == "decode" and torch.equal(other.materialize_weight(), w)
    x = torch.randn(4, 64)
    assert torch.equal(other(x), layer(x))
    half = other.to(torch.bfloat16)  # a cast re-packs the weight in the new dtype
    assert half.values.dtype == torch.bfloat16 and half.meta.dtype == torch.uint8
    assert torch.equal(half.materialize_weight(), w.to(torch.bfloat16))


def test_compact_gradient_reaches_the_input_through_the_unpacked_weight():
    w = _two_four(16, 32)
    layer = SparseLinear.from_dense(w, None, "2:4", config=COMPACT)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    nn.functional.linear(ref, w).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_compact_odd_shapes_fall_back_and_say_why():
    w = _two_four(16, 12)  # 12 inputs: three groups of four, not two whole metadata bytes per row
    model = nn.Sequential(nn.Linear(12, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) run a dense matmul .*2:4 decode layout: in_features 12 "
                                         r"is not a multiple of 8\): 0"):
        report = lower_model(model, config=COMPACT)
    layer = model[0]
    assert report.fallback_layers == 1 and layer.state.kernel == "dense-fallback" and layer.values is None
    x = torch.randn(2, 12)
    assert torch.equal(layer(x), nn.functional.linear(x, w))


def test_lowering_compact_model_matches_hardened_logits_and_bytes(hardened_llama):
    model, names = hardened_llama
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    report = lower_model(model, config=COMPACT)  # no warning: nothing falls back
    assert report.sparse_layers == 14 and report.fallback_layers == 0
    assert {layer.kernel for layer in report.layers} == {"decode"} and "on decode" in report.summary()
    assert report.memory_ratio == pytest.approx(0.53125)  # fp32 values + one byte per 8 inputs
    for name in names:
        module = model.get_submodule(name)
        assert module.dense_weight is None and torch.equal(module.materialize_weight(), weights[name])
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_layout_both_without_cusparselt_holds_the_decode_layout():
    layer = SparseLinear.from_dense(_two_four(32, 64), None, "2:4", config=DispatchConfig(layout="both"))
    assert layer.state.kernel == "decode" and layer.packed is None and layer.values is not None
    with pytest.raises(ValueError, match="layout='sparse'"):
        DispatchConfig(layout="sparse")


def test_layout_both_measures_decode_among_the_candidates(monkeypatch, tmp_path):
    """With a cuSPARSELt weight and the decode layout, the bucket's choice may name the decode kernel; a
    call in that bucket then runs it (CUDA faked: compression the identity, the decode kernel spied on)."""
    import sparseforge_compile.lowering.dispatch as dp
    import sparseforge_compile.lowering.sparse_linear as sl

    seen = {}

    def fake_measure(weight, packed, bias, bucket, decode=None):
        seen[bucket] = decode is not None
        if bucket <= 32:
            return KernelChoice(kernel="decode", block_n=32, block_k=128, split_k=4, dense_ms=1.0, sparse_ms=0.6)
        return KernelChoice(alg_id=2, dense_ms=1.0, sparse_ms=0.7)

    monkeypatch.setattr(sl, "sparse_unsupported_reason", lambda w: None)
    monkeypatch.setattr(sl, "compress", lambda w: w.clone())
    monkeypatch.setattr(dp, "measure_bucket", fake_measure)
    monkeypatch.setattr(dp, "device_name", lambda device: "fake-gpu")
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))  # the default cache the op reads: a fresh one
    config = DispatchConfig(layout="both", max_bucket=64)
    w = _two_four(32, 64)
    cache = dp.algorithm_cache()
    layer = SparseLinear.from_dense(w, None, "2:4", config=config)
    assert seen == {16: True, 32: True, 64: True} and layer.state.kernel == "cusparselt+decode"
    skey = shape_key("fake-gpu", 32, 64, torch.float32, "both")
    assert skey.endswith("|both") and cache.get(skey, 16).kernel == "decode" and cache.get(skey, 64).runs == "cusparselt"
    ran = []
    monkeypatch.setattr(dp, "decode_linear", lambda x, p, b, tiles: ran.append(("decode", tiles)) or x @ w.t())
    monkeypatch.setattr(dp, "sparse_linear_2d", lambda x, p, b, c: ran.append(("cusparselt", c.alg_id)) or x @ w.t())
    for tokens in (1, 20, 64):
        x = torch.randn(tokens, 64)
        torch.testing.assert_close(dp.run_choice(x, layer.packed, layer.state.decode, None,
                                                 dp.choose_kernel(x, 32, "both")), x @ w.t())
    tiles = dp.DecodeTiles(block_n=32, block_k=128, split_k=4)
    assert ran == [("decode", tiles), ("decode", tiles),
                   ("cusparselt", 2)]
    assert "|both|bucket 16" in (tmp_path / "kernel_plans.json").read_text()


def test_measure_bucket_times_decode_tiles_only_up_to_its_bucket_cap(monkeypatch):
    import sparseforge_compile.lowering.dispatch as dp
    from sparseforge_compile.lowering.decode_kernel import pack

    timed = []
    monkeypatch.setattr(dp, "rotation_copies", lambda nbytes, device, cap=4: 1)
    monkeypatch.setattr(dp, "_candidate_choices", lambda packed, x, bias, bucket: [KernelChoice(alg_id=0)])
    monkeypatch.setattr(dp, "_runs", lambda fn: True)

    def fake_times(variants, **kw):  # dense (F.linear) 1.0 ms, cuSPARSELt 0.95, the decode tiles 0.5, 0.51, ...
        timed.append(len(variants))
        names = [getattr(v[0].func, "__name__", "") for v in variants]
        decode = iter(0.5 + 0.01 * i for i in range(len(variants)))
        return [1.0 if n == "linear" else 0.95 if n == "_cslt_linear_2d" else next(decode) for n in names]

    monkeypatch.setattr(dp, "graph_times_ms", fake_times)
    w = _two_four(32, 64)
    choice = dp.measure_bucket(w, w, None, 16, decode=pack(w))
    assert timed[0] == 2 + len(dp.DECODE_TILES) and choice.kernel == "decode" and not choice.use_dense
    assert (choice.block_n, choice.block_k, choice.split_k) == dp.DECODE_TILES[0]
    timed.clear()
    big = dp.measure_bucket(w, w, None, 2 * dp.DECODE_MAX_BUCKET, decode=pack(w))
    assert timed[0] == 2 and big.kernel == "cusparselt"
