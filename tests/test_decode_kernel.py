"""The 2:4 decode kernel against the dense matmul of the decompressed weight (Triton in interpreter mode on
the CPU), over shapes, token counts 1-64, dtypes, odd sizes that mask or fall back with a reason."""

from __future__ import annotations

import os

import pytest
import torch

from sparseforge_compile.lowering import decode_kernel as dk
from sparseforge_compile.masks import NMPattern, nm_mask


def two_of_four(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return (w * nm_mask(w.abs(), NMPattern(2, 4))).to(dtype)


@pytest.mark.parametrize("n, k", [(16, 8), (24, 64), (70, 136), (128, 256)])
def test_pack_unpack_round_trips_and_is_compact(n, k):
    w = two_of_four(n, k, torch.bfloat16)
    packed = dk.pack(w)
    assert torch.equal(dk.unpack(packed), w)
    assert packed.values.shape == (n, k // 2) and packed.meta.shape == (n, k // 8)
    assert packed.nbytes() / (w.numel() * 2) == pytest.approx(0.5625)  # the bytes decode has to read


def test_groups_with_fewer_than_two_nonzeros_pack_too():
    w = two_of_four(8, 16)
    w[0, :4] = 0
    w[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])
    assert torch.equal(dk.unpack(dk.pack(w)), w)


@pytest.mark.parametrize("weight, reason", [
    (torch.ones(8, 12), "not a multiple of 8"),
    (torch.ones(8, 16), "not 2:4"),
    (torch.ones(8, 16, dtype=torch.int32), "not a float type"),
])
def test_weights_the_kernel_cannot_take_say_why(weight, reason):
    assert reason in dk.unsupported_reason(weight)
    with pytest.raises(ValueError, match=reason):
        dk.pack(weight)


triton_cpu = pytest.mark.skipif(dk.triton is None, reason="triton not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@triton_cpu
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n, k", [(64, 128), (40, 264)])  # 40 / 264: masked row and K tails
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_equals_the_dense_matmul(interpret, tokens, n, k, dtype):
    w = two_of_four(n, k, dtype)
    x = torch.randn(tokens, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    packed = dk.pack(w)
    assert dk.triton_available(x.device)
    y = dk.decode_linear(x, packed, bias, dk.DecodeTiles(block_n=32, block_k=64))
    ref = x.float() @ dk.unpack(packed).float().t() + bias.float()
    assert y.dtype == dtype and y.shape == (tokens, n)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@triton_cpu
@pytest.mark.parametrize("split_k", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_k_split_sums_to_the_same_product(interpret, split_k, bias):
    """K split over programs (fp32 partials, summed, then the bias): 264 columns in tiles of 32 leave a
    ragged last split, and 16 asks for more splits than tiles."""
    w = two_of_four(40, 264, torch.bfloat16, seed=split_k)
    x = torch.randn(3, 264).to(torch.bfloat16)
    b = torch.randn(40).to(torch.bfloat16) if bias else None
    y = dk.decode_linear(x, dk.pack(w), b, dk.DecodeTiles(block_n=32, block_k=32, split_k=split_k))
    ref = x.float() @ w.float().t() + (b.float() if bias else 0)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 40)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_auto_split_fills_the_processors_in_powers_of_two():
    cpu = torch.device("cpu")  # counts 4 processors: 16 programs wanted
    assert dk.auto_split(programs=16, k=4096, block_k=128, device=cpu) == 1
    assert dk.auto_split(programs=3, k=4096, block_k=128, device=cpu) == 4  # 16/3 -> 6 -> 4
    assert dk.auto_split(programs=1, k=4096, block_k=128, device=cpu) == dk.MAX_SPLIT_K
    assert dk.auto_split(programs=1, k=256, block_k=128, device=cpu) == 2  # no more splits than K tiles


@triton_cpu
def test_leading_dims_and_no_bias(interpret):
    w = two_of_four(32, 64, torch.float16)
    x = torch.randn(2, 3, 64).to(torch.float16)
    y = dk.decode_linear(x, dk.pack(w), None, dk.DecodeTiles(block_n=16, block_k=32))
    torch.testing.assert_close(y.float(), (x.float() @ w.float().t()), rtol=2e-2, atol=2e-2)


def test_cpu_fallback_computes_the_same_product(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = two_of_four(48, 96)
    x = torch.randn(5, 96)
    assert not dk.triton_available(x.device) or os.environ.get("TRITON_INTERPRET")
    y = dk.decode_linear(x, dk.pack(w), torch.ones(48))
    torch.testing.assert_close(y, x @ w.t() + 1)
    with pytest.raises(ValueError, match="input has 95 features"):
        dk.decode_linear(torch.randn(2, 95), dk.pack(w))


@triton_cpu
@pytest.mark.parametrize("tokens", [65, 128, 130, 200])
def test_triton_kernel_tiles_any_token_count_in_blocks_of_64(interpret, tokens):
    """Beyond 64 tokens the grid runs more token blocks (the last one masked), up to DECODE_MAX_TOKENS."""
    w = two_of_four(40, 64, torch.float16, seed=tokens)
    x = torch.randn(tokens, 64).to(torch.float16)
    y = dk.decode_linear(x, dk.pack(w), None, dk.DecodeTiles(block_n=32, block_k=32))
    ref = x.float() @ w.float().t()
    assert y.shape == (tokens, 40)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert dk._tokens_block(tokens) == dk.MAX_TOKENS


@triton_cpu
def test_a_prefill_unpacks_once_instead_of_running_the_kernel(interpret, monkeypatch):
    """Above DECODE_MAX_TOKENS the call is one GEMM on the unpacked weight, the same product as the
    hardened layer's; at the limit the kernel still runs."""
    w = two_of_four(40, 64, torch.float16, seed=5)
    x = torch.randn(dk.DECODE_MAX_TOKENS + 1, 64).to(torch.float16)
    launches = []
    real = dk._kernel
    monkeypatch.setattr(dk, "_kernel", lambda: launches.append(1) or real())
    y = dk.decode_linear(x, dk.pack(w))
    assert not launches
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    dk.decode_linear(x[: dk.DECODE_MAX_TOKENS], dk.pack(w))
    assert launches == [1]


@triton_cpu
def test_no_tokens_launches_nothing(interpret):
    w = two_of_four(16, 32, torch.float16)
    y = dk.decode_linear(torch.empty(0, 32, dtype=torch.float16), dk.pack(w))
    assert y.shape == (0, 16)


def test_cpu_fallback_is_the_hardened_layers_product_bit_for_bit(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = two_of_four(24, 64, torch.bfloat16)
    x, b = torch.randn(3, 64).to(torch.bfloat16), torch.randn(24).to(torch.bfloat16)
    assert torch.equal(dk.decode_linear(x, dk.pack(w), b), torch.nn.functional.linear(x, w, b))
