"""FP8 (e4m3) x 2:4 lowering on the CPU: row-wise quantization, the emulation against a direct computation
of what the GPU kernels compute, the layer and its bookkeeping, and the GPU paths with their kernels faked."""

from __future__ import annotations

import types

import pytest
import torch
from test_lowering import harden, ids
from torch import nn

from sparseforge_compile.errors import UsageError
from sparseforge_compile.lowering import fp8
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.fp8_linear import Fp8Linear
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.masks import NMPattern, nm_mask
from sparseforge_compile.models import tiny_model

FP8 = DispatchConfig(layout="fp8")


def two_of_four(n: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * nm_mask(w.abs(), NMPattern(2, 4))).to(dtype)


def test_rows_are_scaled_by_their_absmax_over_448_and_zeros_stay_zero():
    w = two_of_four(16, 64, torch.float32)
    w[3] = 0.0
    q, scale = fp8.quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (16,)
    assert fp8.E4M3_MAX == 448.0
    torch.testing.assert_close(scale[:3], w[:3].abs().amax(-1) / 448.0)
    assert torch.equal(q.float().abs().amax(-1)[:3], torch.full((3,), 448.0))  # each row's largest hits the top
    assert torch.equal(q.float()[3], torch.zeros(64)) and scale[3] > 0  # an empty row: no NaN
    assert torch.equal(q.float() != 0, w != 0)  # still 2:4 (these values are far from e4m3's underflow)
    rel = (fp8.dequantize_rows(q, scale) - w).abs() / w.abs().clamp(min=1e-6)
    assert float(rel[w != 0].max()) <= 2 ** -4  # e4m3: 3 mantissa bits, half an ulp of relative error


def test_emulation_is_what_the_kernels_compute():
    """The reference, written out: quantize both operands by hand, scale them back, multiply in float64."""
    w = two_of_four(24, 64, torch.float32, seed=1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)) * 3
    bias = torch.randn(24)
    sx = x.abs().amax(-1) / 448.0
    sw = w.abs().amax(-1) / 448.0
    x_q = (x / sx[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_q = (w / sw[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    direct = (x_q.double() * sx.double()[:, None]) @ (w_q.double() * sw.double()[:, None]).T + bias.double()
    got = fp8.emulated_linear(*fp8.quantize_rows(x), *fp8.quantize_rows(w), bias, torch.float32)
    torch.testing.assert_close(got.double(), direct, rtol=1e-5, atol=1e-5)
    exact = x @ w.T + bias
    assert float((got - exact).norm() / exact.norm()) < 0.05  # and FP8 is close to the unquantized product


def test_fp8_layer_on_the_cpu_emulates_and_round_trips():
    w, b = two_of_four(32, 64), torch.randn(32).to(torch.bfloat16)
    layer = Fp8Linear.from_dense(w, b, "2:4", layer="probe", config=FP8)
    assert layer.backend == "emulated" and layer.state.kernel == "fp8-emulated"
    assert layer.weight_q.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (32,)
    x = torch.randn(3, 7, 64).to(torch.bfloat16)
    want = fp8.emulated_linear(*fp8.quantize_rows(x.reshape(-1, 64)), layer.weight_q, layer.weight_scale, b,
                               torch.bfloat16).reshape(3, 7, 32)
    assert torch.equal(layer(x), want)
    exact = nn.functional.linear(x.float(), w.float(), b.float())
    assert float((layer(x).float() - exact).norm() / exact.norm()) < 0.05
    held = layer.weight_bytes()
    assert held["compressed"] == 32 * 64 + 32 * 4 and held["dense_reference"] == 32 * 64 * 2  # e4m3 + fp32 scales
    sd = layer.state_dict()  # the weight it computes with, which quantizes again to the same e4m3 values
    again = Fp8Linear.from_dense(sd["weight"], sd["bias"], "2:4")
    assert torch.equal(again.weight_q.view(torch.uint8), layer.weight_q.view(torch.uint8))
    torch.testing.assert_close(again.weight_scale, layer.weight_scale, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="probe: weight \\(32, 64\\) is not 2:4"):
        layer.load_state_dict({"weight": torch.ones(32, 64), "bias": b})


def test_lowering_a_model_to_fp8_keeps_it_close():
    model = tiny_model("tiny-llama").to(torch.bfloat16)
    names = harden(model)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits.float()
    report = lower_model(model, config=FP8)
    assert report.sparse_layers == len(names) and {layer.kernel for layer in report.layers} == {"fp8-emulated"}
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in names)
    assert report.memory_ratio == pytest.approx(0.5, abs=0.05)  # dense e4m3 on the CPU: no 2:4 bytes saved
    with torch.no_grad():
        out = model(x).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_the_graph_pass_says_fp8_lowers_by_module_swap():
    from sparseforge_compile.passes.lower_sparse import LowerSparseLinears

    with pytest.raises(UsageError, match="layout 'fp8' lowers by module swap"):
        LowerSparseLinears(dispatch=FP8)


# ------------------------------------------------------------------ the GPU paths, their kernels faked

def _fake_torchao(calls: list):
    """torchao's two ops as the CPU can run them: a 'compressed' weight of the kept values (N, K/2) with the
    positions as metadata, and the GEMM computing the emulated product from them."""
    from sparseforge_compile.lowering import decode_kernel as dk

    def to_sparse(w_q):
        packed = dk.pack(w_q.float())
        calls.append(("compress", w_q.dtype, tuple(w_q.shape)))
        return packed.values.to(torch.float8_e4m3fn), packed.meta

    def gemm(x_q, x_scale, sparse, meta, w_scale, bias, out_dtype):
        calls.append(("gemm", x_q.dtype, x_scale.dtype, tuple(x_scale.shape), tuple(w_scale.shape), out_dtype))
        w_q = dk.unpack(dk.Packed24(sparse.float(), meta, 2 * sparse.shape[1])).to(torch.float8_e4m3fn)
        return fp8.emulated_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)

    return types.SimpleNamespace(to_sparse_semi_structured_cutlass_sm9x_f8=to_sparse,
                                 rowwise_scaled_linear_sparse_cutlass_f8f8=gemm)


def test_cutlass_sparse_fp8_is_preferred_where_torchao_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8, "_torchao_ops", lambda: _fake_torchao(calls))
    monkeypatch.setattr(fp8, "cutlass_sparse_available", lambda device: True)
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    w, b = two_of_four(48, 64), torch.randn(48).to(torch.bfloat16)
    layer = Fp8Linear.from_dense(w, b, "2:4")
    assert layer.backend == "cutlass-sparse" and layer.weight_q.shape == (48, 32)  # half the e4m3 values
    assert calls == [("compress", torch.float8_e4m3fn, (48, 64))]
    x = torch.randn(5, 64).to(torch.bfloat16)
    monkeypatch.setattr(fp8, "cutlass_sparse_available", lambda device: False)
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: False)
    emulated = Fp8Linear.from_dense(w, b, "2:4")
    assert emulated.backend == "emulated"
    assert torch.equal(layer(x), emulated(x))
    assert calls[-1] == ("gemm", torch.float8_e4m3fn, torch.float32, (5,), (48,), torch.bfloat16)
    torch.testing.assert_close(layer.materialize_weight(), emulated.materialize_weight())  # via the identity
    held = layer.weight_bytes()
    assert held["compressed"] < 0.35 * held["dense_reference"]


def test_scaled_mm_on_the_fp8_weight_where_torchao_does_not(monkeypatch):
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        calls.append((tuple(a.shape), b.stride(0), tuple(scale_a.shape), tuple(scale_b.shape), out_dtype))
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)

    monkeypatch.setattr(fp8, "cutlass_sparse_available", lambda device: False)
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    w, b = two_of_four(32, 64), torch.randn(32).to(torch.bfloat16)
    layer = Fp8Linear.from_dense(w, b, "2:4")
    assert layer.backend == "scaled-mm" and layer.weight_q.shape == (32, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = layer(x)
    # 3 tokens padded to 16; the weight's transpose column-major (stride 1 along K); row-wise scales
    assert calls == [((16, 64), 1, (16, 1), (1, 32), torch.bfloat16)]
    ref = fp8.emulated_linear(*fp8.quantize_rows(x), layer.weight_q, layer.weight_scale, None, torch.float32)
    torch.testing.assert_close(y.float(), (ref.to(torch.bfloat16) + b).float(), rtol=1e-2, atol=1e-2)
    assert y.shape == (3, 32) and y.dtype == torch.bfloat16


def test_odd_shapes_fall_back_to_the_emulation_and_say_why(monkeypatch):
    monkeypatch.setattr(fp8, "cutlass_sparse_available", lambda device: True)
    monkeypatch.setattr(fp8, "scaled_mm_available", lambda device: True)
    backend, why = fp8.pick_backend(torch.device("cpu"), 24, 40)
    assert backend == "emulated"
    assert why == ("CUTLASS 2:4 FP8: shape (24, 40) is not a multiple of 16; "
                   "_scaled_mm: shape (24, 40) is not a multiple of 16")
    model = nn.Sequential(nn.Linear(40, 24))
    with torch.no_grad():
        model[0].weight.copy_(two_of_four(24, 40, torch.float32))
    with pytest.warns(UserWarning, match=r"run fp8-emulated \(CUTLASS 2:4 FP8: shape \(24, 40\)"):
        lower_model(model, config=FP8)


def test_ppl_hook_compares_fp8_with_bf16():
    from sparseforge_compile.lowering.accuracy import lowered_ppl

    model = tiny_model("tiny-llama")
    harden(model)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ppl = lowered_ppl(model, windows)
    assert set(ppl) == {"hardened", "cusparselt", "fp8"}
    assert ppl["cusparselt"] == ppl["hardened"]  # bf16 lowered on the CPU: the same product
    assert ppl["fp8"] != ppl["hardened"] and abs(ppl["fp8"] / ppl["hardened"] - 1) < 0.05
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("proj"))  # untouched
