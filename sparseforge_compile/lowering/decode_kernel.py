"""A 2:4 matmul for few tokens (decode) that reads the compressed weight only: kept values plus 2-bit
in-group positions, 0.5625x the bytes of the dense bf16 weight, never a dense copy.

Decode is memory-bound, so bytes read are the speed: each program streams a block of output rows'
values and positions, rebuilds the dense tile in registers (each kept value placed at its position in
its group of four) and multiplies it with the token tile on the tensor cores.

Layout (made once from an exact 2:4 weight ``(N, K)``, K a multiple of 8):
- ``values``  ``(N, K/2)``: the two kept values of each group, in column order;
- ``meta``    ``(N, K/8)`` uint8: per pair of groups one byte, group ``2j`` in the low nibble and
  ``2j+1`` in the high one, each nibble ``first | second << 2`` (the kept positions, 0..3, first < second).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: the CPU fallback below computes the same product
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

K_MULTIPLE = 8  # two groups of four per metadata byte
MAX_TOKENS = 64  # the largest token block of one program: more tokens run as more blocks
# Above this many tokens a call unpacks the weight and runs one dense GEMM: the kernel rebuilds every tile
# once per token block, and a prefill (thousands of tokens) ran 20x slower than cuBLAS through it
# (benchmarks/results/e2e_compact_h100.json).
DECODE_MAX_TOKENS = 256


@dataclass
class Packed24:
    """A 2:4 weight in the decode layout (see the module docstring)."""

    values: Tensor  # (N, K/2), the weight's dtype
    meta: Tensor  # (N, K/8) uint8
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def unsupported_reason(weight: Tensor) -> str | None:
    """Why ``weight`` cannot use this kernel (None: it can)."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not a matrix"
    if weight.shape[1] % K_MULTIPLE:
        return f"in_features {weight.shape[1]} is not a multiple of {K_MULTIPLE}"
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {weight.dtype} is not a float type"
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    if bool((groups > 2).any()):
        return "weight is not 2:4 (a group holds more than two nonzeros)"
    return None


def pack(weight: Tensor) -> Packed24:
    """The decode layout of an exact 2:4 ``weight`` (a group with fewer than two nonzeros keeps zeros)."""
    reason = unsupported_reason(weight)
    if reason:
        raise ValueError(f"cannot pack for the 2:4 decode kernel: {reason}")
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    # The two kept positions per group: the nonzeros first (stable), then zeros to fill up to two.
    order = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :2]
    positions = order.sort(dim=-1).values  # first < second
    values = groups.gather(-1, positions).reshape(n, k // 2).contiguous()
    nibble = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)  # (n, k/4)
    meta = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()
    return Packed24(values, meta, k)


def unpack(packed: Packed24) -> Tensor:
    """The dense ``(N, K)`` weight back from its decode layout."""
    n, k = packed.out_features, packed.in_features
    # uint8 compares, no int64 scatter indices: the transient memory stays near the dense weight's bytes.
    nibble = torch.stack([packed.meta & 0xF, packed.meta >> 4], dim=-1).reshape(n, k // 4, 1)
    slots = torch.arange(4, dtype=torch.uint8, device=packed.values.device)
    values = packed.values.reshape(n, k // 4, 2)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    dense = torch.where(slots == (nibble & 3), values[..., :1],
                        torch.where(slots == (nibble >> 2), values[..., 1:], zero))
    return dense.reshape(n, k)


if triton is not None:

    def _decode_24_kernel(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                          stride_xm, stride_vn, stride_mn, stride_ym, stride_ys,
                          HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # Program (n, m, s) covers K columns [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT) (a multiple of BLOCK_K):
        # with few tokens the row blocks alone are too few programs to keep the GPU's loads in flight.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        groups = tl.arange(0, BLOCK_K // 4)  # groups of four in one K tile
        slots = tl.arange(0, 4)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # a builtin: jitted helpers break the CPU interpreter
        k_begin = pid_s * K_PER_SPLIT
        for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), BLOCK_K):
            g = k0 // 4 + groups  # global group index, (BLOCK_K/4,)
            g_ok = g < K // 4
            w_mask = (rn[:, None] < N) & g_ok[None, :]
            v_row = v_ptr + rn[:, None] * stride_vn
            first = tl.load(v_row + 2 * g[None, :], mask=w_mask, other=0.0).to(tl.float32)
            second = tl.load(v_row + 2 * g[None, :] + 1, mask=w_mask, other=0.0).to(tl.float32)
            byte = tl.load(m_ptr + rn[:, None] * stride_mn + g[None, :] // 2, mask=w_mask, other=0).to(tl.int32)
            nib = (byte >> ((g[None, :] % 2) * 4)) & 0xF
            pos_a = nib & 3
            pos_b = (nib >> 2) & 3
            dense = tl.where(slots[None, None, :] == pos_a[:, :, None], first[:, :, None], 0.0) + \
                tl.where(slots[None, None, :] == pos_b[:, :, None], second[:, :, None], 0.0)
            w_tile = tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
            rk = k0 + tl.arange(0, BLOCK_K)
            x_tile = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                             mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            if DOT_FP32:  # the CPU interpreter multiplies bf16 tiles wrongly; fp32 holds bf16 products exactly
                acc += tl.dot(x_tile.to(tl.float32), tl.trans(w_tile.to(tl.float32)))
            else:
                acc += tl.dot(x_tile, tl.trans(w_tile))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + pid_s * stride_ys + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


_JITTED: dict[bool, object] = {}


def _kernel():
    """The jitted kernel, made on first use: Triton picks its interpreter (TRITON_INTERPRET=1, for CPU
    tests) when a function is jitted, so jitting at import would fix the mode before a test can set it."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _JITTED:
        _JITTED[interpret] = triton.jit(_decode_24_kernel)
    return _JITTED[interpret]


@dataclass(frozen=True)
class DecodeTiles:
    """Tile sizes of one launch (tuned per GPU and shape; any multiple-of-16 sizes are correct).
    ``split_k``: programs along K, each summing its share into an fp32 partial (0: :func:`auto_split`)."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0


MAX_SPLIT_K = 16
PROGRAMS_PER_SM = 4  # programs the grid aims for per multiprocessor, to hide load latency


@functools.cache
def _multiprocessors(index: int) -> int:  # once per GPU: auto_split runs on every eager decode call
    return torch.cuda.get_device_properties(index).multi_processor_count


def auto_split(programs: int, k: int, block_k: int, device: torch.device) -> int:
    """A K split that brings ``programs`` (row blocks x token blocks) up to about PROGRAMS_PER_SM per
    multiprocessor: a power of two, no more splits than K tiles and at most MAX_SPLIT_K."""
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = max(1, -(-PROGRAMS_PER_SM * sms // max(programs, 1)))
    split = 1
    while split * 2 <= min(want, MAX_SPLIT_K, -(-k // block_k)):
        split *= 2
    return split


def _tokens_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else MAX_TOKENS  # tl.dot needs >= 16 rows


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel runs for tensors on ``device`` (CUDA, or the CPU interpreter)."""
    import os

    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def decode_linear(x: Tensor, packed: Packed24, bias: Tensor | None = None, tiles: DecodeTiles | None = None) -> Tensor:
    """``x @ W.T + bias`` for a 2:4 ``W`` in decode layout; ``x`` is ``(..., K)``, any number of tokens
    (the grid tiles them in blocks of up to :data:`MAX_TOKENS`; it is built for few).

    Runs the Triton kernel where :func:`triton_available` for up to :data:`DECODE_MAX_TOKENS` tokens, else
    ``F.linear`` with the unpacked weight (the same product, bit for bit what the hardened layer computes).
    """
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {packed.in_features}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, packed.in_features)
    if not triton_available(x.device) or x2d.shape[0] > DECODE_MAX_TOKENS:
        y = F.linear(x2d, unpack(packed).to(x.dtype), None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, packed.out_features)
    tiles = tiles or DecodeTiles()
    x2d = x2d.contiguous()
    m, n = x2d.shape[0], packed.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:  # an empty grid is not a launch
        return y.reshape(*lead, n)
    block_m = _tokens_block(m)
    k = packed.in_features
    blocks = triton.cdiv(n, tiles.block_n) * triton.cdiv(m, block_m)
    split = tiles.split_k or auto_split(blocks, k, tiles.block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), tiles.block_k) * tiles.block_k
    split = triton.cdiv(k, k_per_split)  # whole K tiles per split: no empty split, none beyond the K tiles
    # One split stores the output (bias added) directly; several store fp32 partials, summed below.
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, block_m), split)
    _kernel()[grid](x2d, packed.values, packed.meta, bias if bias is not None and split == 1 else x2d, out, m, n, k,
                    k_per_split, x2d.stride(0), packed.values.stride(0), packed.meta.stride(0), out.stride(-2),
                    out.stride(0) if split > 1 else 0, HAS_BIAS=bias is not None and split == 1,
                    DOT_FP32=x.device.type != "cuda", BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                    num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if split > 1:
        total = out.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
    return y.reshape(*lead, n)
