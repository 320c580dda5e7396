"""FP8 (e4m3) x 2:4: weights and activations in float8 with per-row weight scales and per-token
activation scales, the ``sparseforge::fp8_linear`` op and the kernels it can run.

Scaling follows the row-wise convention of torchao and torch's ``_scaled_mm``: a row's scale is its
absolute maximum over ``torch.finfo(torch.float8_e4m3fn).max`` (448), values are divided by it and
clamped to the e4m3 range, and the kernel computes ``(x_q @ w_q^T) * s_x * s_w^T (+ bias)`` with fp32
accumulation. Backends, in order of preference where they import and the device takes them:

- ``"cutlass-sparse"``: torchao's CUTLASS 2:4 FP8 GEMM (Hopper, sm90), the weight compressed by
  ``to_sparse_semi_structured_cutlass_sm9x_f8``: half the FP8 bytes plus metadata;
- ``"scaled-mm"``: ``torch._scaled_mm`` on the dense FP8 weight (sm89+): FP8 speed, no 2:4 gain;
- ``"emulated"``: quantize, scale, fp32 matmul (the CPU): the numerical reference of both.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero (torchao's EPS)
BACKENDS = ("cutlass-sparse", "scaled-mm", "emulated")
SCALED_MM_TOKENS = 16  # _scaled_mm wants every dim a multiple of 16: tokens are padded up to it


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``t`` in e4m3, scaled so that its absolute maximum lands on 448, and the fp32 scales
    (``t.shape[:-1]``): ``t ~= q.float() * scale[..., None]``."""
    t32 = t.float()
    scale = t32.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / E4M3_MAX
    q = (t32 / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """The fp32 values a quantized tensor stands for."""
    return q.float() * scale.unsqueeze(-1)


def emulated_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                    out_dtype: torch.dtype) -> Tensor:
    """What the FP8 kernels compute, in fp32 on any device: the exact e4m3 products summed in fp32, then
    the per-token and per-row scales (the kernels' epilogue), the bias, the cast."""
    y = (x_q.float() @ w_q.float().t()) * x_scale.unsqueeze(-1) * w_scale.unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# The GPU kernels, looked up at runtime (torchao is optional)
# ---------------------------------------------------------------------------------------------

@cache
def _torchao_ops():
    """torchao's op namespace with the sparse FP8 ops, or None where torchao or its CUTLASS build is absent."""
    try:
        importlib.import_module("torchao")  # registers torch.ops.torchao.*
    except Exception:  # any import failure (missing, or built for another torch) means: not available
        return None
    ops = getattr(torch.ops, "torchao", None)
    needed = ("rowwise_scaled_linear_sparse_cutlass_f8f8", "to_sparse_semi_structured_cutlass_sm9x_f8")
    try:
        return ops if ops is not None and all(hasattr(ops, name) for name in needed) else None
    except RuntimeError:
        return None


def cutlass_sparse_available(device: torch.device) -> bool:
    """torchao's CUTLASS 2:4 FP8 kernel runs on ``device`` (an sm90 GPU with torchao built with CUTLASS)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and _torchao_ops() is not None)


def scaled_mm_available(device: torch.device) -> bool:
    """``torch._scaled_mm`` with row-wise scales runs on ``device`` (sm89 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def unsupported_reason(backend: str, out_features: int, in_features: int) -> str | None:
    """Why a weight of this shape cannot use ``backend`` (None: it can)."""
    if backend == "emulated":
        return None
    if in_features % 16 or out_features % 16:  # both kernels' alignment of the FP8 operands
        return f"shape ({out_features}, {in_features}) is not a multiple of 16"
    return None


def pick_backend(device: torch.device, out_features: int, in_features: int) -> tuple[str, str | None]:
    """The preferred backend for a weight on ``device``, and why the better ones were passed over (or None)."""
    passed = []
    if cutlass_sparse_available(device):
        reason = unsupported_reason("cutlass-sparse", out_features, in_features)
        if reason is None:
            return "cutlass-sparse", None
        passed.append(f"CUTLASS 2:4 FP8: {reason}")
    if scaled_mm_available(device):
        reason = unsupported_reason("scaled-mm", out_features, in_features)
        if reason is None:
            return "scaled-mm", "; ".join(passed) or None
        passed.append(f"_scaled_mm: {reason}")
    if device.type == "cuda" and not passed:
        passed.append("no FP8 kernel for this GPU (torchao's CUTLASS op needs sm90, _scaled_mm sm89+)")
    return "emulated", "; ".join(passed) or None


def compress_weight(w_q: Tensor, backend: str) -> tuple[Tensor, Tensor | None]:
    """The stored form of an e4m3 2:4 weight for ``backend``: (values, metadata or None)."""
    if backend == "cutlass-sparse":
        sparse, meta = _torchao_ops().to_sparse_semi_structured_cutlass_sm9x_f8(w_q)
        return sparse, meta
    return w_q.contiguous(), None


def _scaled_mm_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype) -> Tensor:
    tokens = x_q.shape[0]
    padded = max(SCALED_MM_TOKENS, -(-tokens // SCALED_MM_TOKENS) * SCALED_MM_TOKENS)
    if padded != tokens:
        x_q = F.pad(x_q.view(torch.uint8), (0, 0, 0, padded - tokens)).view(E4M3)  # pad has no e4m3 kernel
        x_scale = F.pad(x_scale, (0, padded - tokens), value=1.0)
    # w_q^T is column-major as _scaled_mm wants its second operand; row-wise scales are (M, 1) and (1, N).
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.unsqueeze(-1), scale_b=w_scale.unsqueeze(0),
                         out_dtype=torch.bfloat16)[:tokens]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


@torch.library.custom_op("sparseforge::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, meta: Tensor | None, weight_scale: Tensor, bias: Tensor | None,
               out_features: int, backend: str) -> Tensor:
    """``x @ W^T + bias`` with W stored in e4m3 (``weight``: dense, or compressed with ``meta`` for
    ``"cutlass-sparse"``; ``weight_scale`` fp32 per row) and ``x`` quantized per token on the fly."""
    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_rows(x2d)
    if backend == "cutlass-sparse":
        y = _torchao_ops().rowwise_scaled_linear_sparse_cutlass_f8f8(
            x_q, x_scale, weight, meta, weight_scale, None if bias is None else bias.to(x.dtype), x.dtype)
    elif backend == "scaled-mm":
        y = _scaled_mm_linear(x_q, x_scale, weight, weight_scale, bias, x.dtype)
    else:
        y = emulated_linear(x_q, x_scale, weight, weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], out_features)


@fp8_linear.register_fake
def _fp8_linear_fake(x: Tensor, weight: Tensor, meta: Tensor | None, weight_scale: Tensor, bias: Tensor | None,
                     out_features: int, backend: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def decompress_weight(weight: Tensor, meta: Tensor | None, weight_scale: Tensor, backend: str,
                      in_features: int) -> Tensor:
    """The fp32 (out, in) weight a stored FP8 weight stands for (the one the layer computes with)."""
    if backend == "cutlass-sparse":  # no unpacking op: multiply the identity through the kernel, as torchao does
        eye = torch.eye(in_features, device=weight.device).to(E4M3)
        ones = torch.ones(in_features, device=weight.device)
        w_t = _torchao_ops().rowwise_scaled_linear_sparse_cutlass_f8f8(eye, ones, weight, meta, weight_scale,
                                                                        None, torch.float32)
        return w_t.t().contiguous()
    return dequantize_rows(weight, weight_scale)
