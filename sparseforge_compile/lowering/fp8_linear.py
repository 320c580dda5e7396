"""The FP8 x 2:4 lowered layer (``DispatchConfig(layout="fp8")``): :class:`Fp8Linear` holds the weight
quantized to e4m3 per row (compressed 2:4 where torchao's CUTLASS kernel runs) and calls
``sparseforge::fp8_linear`` (:mod:`.fp8`), which quantizes the activations per token on the fly.

FP8 is lossy: ``materialize_weight()`` and ``state_dict()`` give the weight the layer computes with
(dequantized), not the hardened bf16 weight; loading it quantizes again to the same e4m3 values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..masks import NMPattern
from . import fp8
from .dense_state import DenseStateDict
from .sparse_linear import KernelState, check_nm, tensor_bytes


class Fp8Linear(DenseStateDict, nn.Module):
    """A hardened N:M Linear in FP8 (e4m3 weights and activations, fp32 scales) for inference."""

    def __init__(self, in_features: int, out_features: int, pattern: NMPattern | str = "2:4", *, layer: str = "",
                 transposed_source: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.pattern = NMPattern.parse(pattern)
        self.layer = layer
        self.transposed_source = transposed_source
        self.dtype = dtype  # the activations' and outputs' dtype: the source weight's
        self.backend = "emulated"
        self.register_buffer("weight_q", None, persistent=False)
        self.register_buffer("weight_meta", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.state = KernelState(packed=None, keep_dense=False, fallback_reason="not initialised")
        self.dense_up_to = 0

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, pattern: NMPattern | str = "2:4", *,
                   layer: str = "", transposed: bool = False, config=None) -> Fp8Linear:
        """Quantize a hardened weight ((out, in), or (in, out) with ``transposed=True``); raises
        :class:`~sparseforge_compile.errors.NMViolationError` naming ``layer`` if it is not N:M."""
        w = weight.detach()
        w = w.t() if transposed else w
        if w.dim() != 2:
            raise ValueError(f"{layer or 'layer'}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        module = cls(w.shape[1], w.shape[0], pattern, layer=layer, transposed_source=transposed, dtype=w.dtype)
        module._install(w, None if bias is None else bias.detach())
        return module

    def _install(self, weight: Tensor, bias: Tensor | None) -> None:
        check_nm(weight, self.pattern, self.layer or "layer")
        backend, passed_over = fp8.pick_backend(weight.device, self.out_features, self.in_features)
        w_q, scale = fp8.quantize_rows(weight)
        self.weight_q, self.weight_meta = fp8.compress_weight(w_q, backend)
        self.weight_scale, self.bias, self.backend = scale, bias, backend
        self.state = KernelState(packed=None, keep_dense=False, fallback_reason=passed_over, label=f"fp8-{backend}")

    def materialize_weight(self) -> Tensor:
        """The (out, in) weight the layer computes with, dequantized, in the layer's dtype."""
        return fp8.decompress_weight(self.weight_q, self.weight_meta, self.weight_scale, self.backend,
                                     self.in_features).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.sparseforge.fp8_linear(x, self.weight_q, self.weight_meta, self.weight_scale, self.bias,
                                                self.out_features, self.backend)

    def weight_bytes(self) -> dict[str, int]:
        held = tensor_bytes(self.weight_q) + tensor_bytes(self.weight_meta) + tensor_bytes(self.weight_scale)
        return {"compressed": held, "dense_copy": 0, "dense_fallback": 0,
                "dense_reference": self.out_features * self.in_features * torch.empty(0, dtype=self.dtype).element_size()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"kernel={self.state.kernel}, dtype={str(self.dtype).replace('torch.', '')}, bias={self.bias is not None}")

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        if self.weight_q is None:
            return self
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.weight_q.device))
        if probe.device == self.weight_q.device and probe.dtype == self.dtype:
            return self
        weight, bias = self.materialize_weight(), self.bias
        self.dtype = probe.dtype
        self._install(weight.to(probe.device, probe.dtype), None if bias is None else fn(bias))
        return self

    def _install_target(self, weight):
        return (self.weight_q.device if self.weight_q is not None else weight.device), self.dtype
