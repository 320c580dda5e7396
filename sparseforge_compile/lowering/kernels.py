"""The raw cuSPARSELt calls: compress/decompress a 2:4 weight and ``x @ W^T + b`` with one kernel
configuration (:class:`KernelChoice`), plus whether a weight can go to the sparse kernel at all.

The kernel is cuSPARSELt through ``torch._cslt_sparse_mm``, whose *first* operand is the structured
one, so a Linear ``y = x W^T`` runs as ``y^T = W (x^T)`` with ``transpose_result=True`` (the kernel
writes ``y`` directly) and the bias fused into the epilogue. The input is flattened to 2-D and its
token count padded to a multiple of :data:`TOKEN_MULTIPLE` (cuSPARSELt rejects a single token).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TOKEN_MULTIPLE = 16  # cuSPARSELt bf16/fp16 dense-operand multiple (8), rounded up: 1 token fails
WEIGHT_MULTIPLE = 16  # both dims of the compressed operand
SPARSE_DTYPES = (torch.bfloat16, torch.float16)


def padded_tokens(tokens: int) -> int:
    return max(TOKEN_MULTIPLE, -(-int(tokens) // TOKEN_MULTIPLE) * TOKEN_MULTIPLE)


@dataclass(frozen=True)
class KernelChoice:
    """What runs for one (device, shape, bucket, dtype): dense cuBLAS, or the fastest sparse kernel
    measured: ``kernel`` ``"cusparselt"`` (``alg_id``/``split_k``/``split_k_mode``) or ``"decode"`` (the
    compressed-only 2:4 kernel of :mod:`.decode_kernel`, tiles ``block_n`` x ``block_k``, 0: the default;
    ``split_k`` its K split, 0: chosen from the grid size)."""

    use_dense: bool = False
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1
    dense_ms: float | None = None
    sparse_ms: float | None = None
    kernel: str = "cusparselt"
    block_n: int = 0
    block_k: int = 0

    @property
    def runs(self) -> str:
        """The kernel a call runs where the layer keeps a dense copy: "dense", "decode" or "cusparselt"."""
        return "dense" if self.use_dense else self.kernel

    @property
    def speedup(self) -> float | None:
        if self.dense_ms and self.sparse_ms:
            return self.dense_ms / self.sparse_ms
        return None


DEFAULT_CHOICE = KernelChoice()


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def sparse_unsupported_reason(weight: Tensor) -> str | None:
    """Why ``weight`` (Linear layout) cannot go to the sparse kernel, or None if it can."""
    if weight.device.type != "cuda":
        return f"device {weight.device.type} has no sparse tensor cores"
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).replace('torch.', '')} is not bf16/fp16"
    major, _ = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"compute capability {major}.x < 8.0"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    out_f, in_f = weight.shape
    if out_f % WEIGHT_MULTIPLE or in_f % WEIGHT_MULTIPLE:
        return f"shape {tuple(weight.shape)} is not a multiple of {WEIGHT_MULTIPLE}"
    return None


def compress(weight: Tensor) -> Tensor:
    """cuSPARSELt-compressed form of a 2:4 weight in Linear layout (values + metadata)."""
    return torch._cslt_compress(weight.contiguous())


def decompress(packed: Tensor, in_features: int) -> Tensor:
    """The dense (out, in) weight back from its compressed form: W = W @ I, exact."""
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return torch._cslt_sparse_mm(packed, eye)


def _cslt_linear_2d(x2d: Tensor, packed: Tensor, bias: Tensor | None, choice: KernelChoice) -> Tensor:
    tokens = x2d.shape[0]
    padded = padded_tokens(tokens)
    if padded != tokens:
        x2d = F.pad(x2d, (0, 0, 0, padded - tokens))
    if bias is not None and bias.dtype != x2d.dtype:
        bias = bias.to(x2d.dtype)
    # y^T = W x^T: the structured operand is the first; transpose_result makes the kernel write y.
    y = torch._cslt_sparse_mm(packed, x2d.t(), bias=bias, transpose_result=True, alg_id=choice.alg_id,
                              split_k=choice.split_k, split_k_mode=choice.split_k_mode)
    return y[:tokens] if padded != tokens else y


_FAILED_CHOICES: set[tuple] = set()


def sparse_linear_2d(x2d: Tensor, packed: Tensor, bias: Tensor | None, choice: KernelChoice) -> Tensor:
    """``x2d @ W^T + bias`` on cuSPARSELt; a configuration the library refuses falls back to alg 0."""
    key = (tuple(packed.shape), x2d.shape[0], choice.alg_id, choice.split_k, choice.split_k_mode)
    if key not in _FAILED_CHOICES:
        try:
            return _cslt_linear_2d(x2d, packed, bias, choice)
        except RuntimeError as exc:  # cuSPARSELt refuses before launching: nothing ran
            if choice == DEFAULT_CHOICE:
                raise
            _FAILED_CHOICES.add(key)
            warnings.warn(f"sparse kernel config {choice} failed for {tuple(x2d.shape)} ({exc}); "
                          f"using the default algorithm", stacklevel=2)
    return _cslt_linear_2d(x2d, packed, bias, DEFAULT_CHOICE)

