"""2:4 Linear layers on sparse tensor cores: the ``sparseforge::sparse_linear`` custom op (with its
fake and backward), the compressed-weight module :class:`SparseLinear` and the N:M checks.

Which kernel a call runs is :mod:`.dispatch`'s measured choice for its token bucket; the raw
cuSPARSELt calls are in :mod:`.kernels`, the compressed-only decode kernel in :mod:`.decode_kernel`
(``DispatchConfig.layout``). On the CPU (and for dtypes or shapes the kernel does not take) a
cuSPARSELt layer is a dense matmul with the masked weight, identical to the hardened model; a
``"compact"`` layer holds the decode layout there too and computes through it (the kernel's fallback
unpacks it), so CPU tests check the sparse bookkeeping itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NMViolationError
from ..masks import NMPattern, count_nm_violations
from . import decode_kernel
from .decode_kernel import Packed24, decode_linear
from .dense_state import DenseStateDict
from .dispatch import DispatchConfig, calibrate, choose_kernel, run_choice
from .kernels import compress, decompress, sparse_unsupported_reason


def nm_violation_error(layer: str, weight: Tensor, pattern: NMPattern, violations: int) -> NMViolationError:
    groups = weight.numel() // pattern.m
    return NMViolationError(
        f"{layer}: weight {tuple(weight.shape)} is not {pattern}: {violations} of {groups} groups of "
        f"{pattern.m} inputs hold more than {pattern.n} nonzeros. Harden the layer to {pattern} first "
        f"(prune and fix its mask) or leave it out of the layers to lower"
    )


def check_nm(weight: Tensor, pattern: NMPattern, layer: str) -> None:
    """Raise :class:`NMViolationError` naming the layer and the count unless ``weight`` is N:M."""
    pattern.check_divides(int(weight.shape[-1]), layer)
    violations = count_nm_violations(weight, pattern)
    if violations:
        raise nm_violation_error(layer, weight, pattern, violations)


def is_exact_nm(weight: Tensor, pattern: NMPattern) -> bool:
    """True for a hardened weight: no group breaks the pattern and about N/M of it is nonzero.

    The lower density bound keeps nearly empty weights (zero-initialised adapters) out.
    """
    if weight.dim() != 2 or weight.shape[-1] % pattern.m or weight.numel() == 0:
        return False
    if count_nm_violations(weight, pattern):
        return False
    density = float((weight.detach() != 0).sum()) / weight.numel()
    return 0.5 * pattern.density <= density <= pattern.density


@torch.library.custom_op("sparseforge::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, packed: Tensor | None, dense_weight: Tensor | None, bias: Tensor | None,
                  out_features: int, values: Tensor | None = None, meta: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for a 2:4 weight W (out_features x in).

    ``packed``: W compressed for cuSPARSELt, or None. ``dense_weight``: W in Linear layout, or
    None; needed where there is no compressed weight (CPU, unsupported dtype) and where dispatch chose
    dense cuBLAS for the call's token bucket. ``values``/``meta``: W in the decode layout
    (:class:`~.decode_kernel.Packed24`), or None: with no cuSPARSELt weight for the device it serves
    every call, next to one it is the candidate dispatch may have chosen for the bucket.
    """
    decode = None if values is None else Packed24(values, meta, x.shape[-1])
    if packed is None or not x.is_cuda:
        if decode is not None:
            return decode_linear(x, decode, bias)
        if dense_weight is None:
            raise RuntimeError("sparse_linear: neither a compressed weight for this device nor a dense weight")
        return F.linear(x, dense_weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    choice = choose_kernel(x2d, out_features, "both" if decode is not None else "cusparselt")
    if choice.use_dense and dense_weight is not None:
        y = F.linear(x2d, dense_weight, bias)
    else:
        y = run_choice(x2d, packed, decode, bias, choice)
    return y.reshape(*x.shape[:-1], out_features)


@sparse_linear.register_fake
def _sparse_linear_fake(x: Tensor, packed: Tensor | None, dense_weight: Tensor | None, bias: Tensor | None,
                        out_features: int, values: Tensor | None = None, meta: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, _, dense_weight, bias, _, values, meta = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, dense_weight, values, meta)


def _backward(ctx, grad: Tensor):
    x, dense_weight, values, meta = ctx.saved_tensors
    if dense_weight is None and values is None:
        raise RuntimeError(
            "sparse_linear: no gradient through a lowered layer without its dense weight; lowered models are "
            "for inference (run under torch.no_grad()), or lower with DispatchConfig(keep_dense='auto')"
        )
    grad2d = grad.reshape(-1, grad.shape[-1])
    grad_b = grad2d.sum(0) if ctx.has_bias else None
    if dense_weight is None:  # a compact layer: the input's gradient through the unpacked weight, none for it
        weight = decode_kernel.unpack(Packed24(values, meta, x.shape[-1])).to(grad.dtype)
        return grad @ weight, None, None, grad_b, None, None, None
    grad_x = grad @ dense_weight
    grad_w = grad2d.t() @ x.reshape(-1, x.shape[-1])
    return grad_x, None, grad_w, grad_b, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Kernel state of one weight, shared by SparseLinear and the graph pass
# ---------------------------------------------------------------------------------------------

@dataclass
class KernelState:
    """What a lowered layer holds: the cuSPARSELt weight and/or the decode layout (or neither) and
    whether it keeps the dense one."""

    packed: Tensor | None
    keep_dense: bool
    fallback_reason: str | None  # why the layer runs dense everywhere, or None
    dense_buckets: tuple[int, ...] = ()
    decode: Packed24 | None = None
    label: str = ""  # the kernel's name where another module (FP8) fills this in

    @property
    def kernel(self) -> str:
        if self.label:
            return self.label
        if self.packed is None:
            return "dense-fallback" if self.decode is None else "decode"
        return "cusparselt" if self.decode is None else "cusparselt+decode"

    def dense_up_to(self, buckets: Sequence[int]) -> int:
        """Token count up to which every call runs dense (0: none): the largest bucket B such that
        all measured buckets <= B chose dense. Lowered layers route such calls to ``F.linear``
        before the custom op, so Inductor sees a plain matmul there (layouts, fusion) and eager
        decode skips the op's dispatch cost; dense buckets further up still dispatch inside the op."""
        if self.packed is None or not self.keep_dense or not self.dense_buckets:
            return 0
        dense = set(self.dense_buckets)
        prefix = 0
        for bucket in sorted(buckets):
            if bucket not in dense:
                break
            prefix = bucket
        return prefix


def build_kernel_state(weight: Tensor, bias: Tensor | None, config: DispatchConfig) -> KernelState:
    """Compress a 2:4 weight (Linear layout) into ``config.layout`` and settle its dispatch; dense
    fallback where unsupported. ``"both"`` where cuSPARSELt is not (the CPU) holds the decode layout alone."""
    if config.layout == "fp8":
        raise ValueError("build_kernel_state: layout 'fp8' is built by lowering.fp8_linear.Fp8Linear")
    weight = weight.detach().contiguous()
    decode_reason = decode_kernel.unsupported_reason(weight) if config.layout in ("compact", "both") else None
    reason = sparse_unsupported_reason(weight)
    if config.layout == "compact" or (config.layout == "both" and reason is not None):
        if decode_reason is not None:
            return KernelState(packed=None, keep_dense=True, fallback_reason=f"2:4 decode layout: {decode_reason}")
        return KernelState(packed=None, keep_dense=False, fallback_reason=None, decode=decode_kernel.pack(weight))
    if reason is not None:
        return KernelState(packed=None, keep_dense=True, fallback_reason=reason)
    packed = compress(weight)
    decode = decode_kernel.pack(weight) if config.layout == "both" and decode_reason is None else None
    extra = {"decode": decode} if decode is not None else {}
    table = calibrate(weight, packed, None if bias is None else bias.detach(), config, **extra)
    dense_buckets = tuple(b for b, c in sorted(table.items()) if c.use_dense)
    keep = config.keep_dense == "auto" and bool(dense_buckets)
    return KernelState(packed=packed, keep_dense=keep, fallback_reason=None, dense_buckets=dense_buckets,
                       decode=decode)


def dense_wins_everywhere(state: KernelState, config: DispatchConfig) -> bool:
    """The measured dispatch picked dense cuBLAS at every token bucket: lowering the layer would only
    add the sparse op's call overhead, so lowering passes leave it a dense Linear."""
    return bool(config.buckets) and state.dense_up_to(config.buckets) == max(config.buckets)


def tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class SparseLinear(DenseStateDict, nn.Module):
    """A hardened N:M Linear lowered for inference: ``y = x W^T + b`` through ``sparse_linear``.

    Holds what ``config.layout`` asks: W compressed for cuSPARSELt on a supporting GPU, plus the dense W
    only where dispatch needs it, and/or W in the decode layout (``values``, ``meta``); elsewhere (CPU,
    fp32, odd shapes) the masked dense W. ``state_dict()`` has the same
    keys and layout as the layer it replaced (``weight`` dense, ``bias``), so checkpoints stay
    portable; moving or casting the module (``.to()``, ``.cuda()``, ``.half()``) recompresses.
    """

    def __init__(self, in_features: int, out_features: int, pattern: NMPattern | str = "2:4", *,
                 layer: str = "", transposed_source: bool = False, config: DispatchConfig | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.pattern = NMPattern.parse(pattern)
        self.layer = layer
        self.transposed_source = transposed_source  # came from a GPT-2 Conv1D: state_dict keeps (in, out)
        self.config = config or DispatchConfig()
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("dense_weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.register_buffer("values", None, persistent=False)
        self.register_buffer("meta", None, persistent=False)
        self.state = KernelState(packed=None, keep_dense=True, fallback_reason="not initialised")
        self.dense_up_to = 0  # calls with at most this many tokens run F.linear (KernelState.dense_up_to)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, pattern: NMPattern | str = "2:4", *,
                   layer: str = "", transposed: bool = False, config: DispatchConfig | None = None) -> SparseLinear:
        """Lower a hardened weight. ``weight`` is (out, in), or (in, out) with ``transposed=True``
        (GPT-2 Conv1D). Raises :class:`NMViolationError` naming ``layer`` if it is not N:M."""
        w = weight.detach()
        w = w.t() if transposed else w
        if w.dim() != 2:
            raise ValueError(f"{layer or 'layer'}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        module = cls(w.shape[1], w.shape[0], pattern, layer=layer, transposed_source=transposed, config=config)
        module._install(w, None if bias is None else bias.detach())
        return module

    def _install(self, weight: Tensor, bias: Tensor | None) -> None:
        check_nm(weight, self.pattern, self.layer or "layer")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.layer or 'layer'}: weight {tuple(weight.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        state = build_kernel_state(weight, bias, self.config)
        self.state = state
        self.dense_up_to = state.dense_up_to(self.config.buckets)
        self.packed = state.packed
        self.dense_weight = weight.contiguous() if state.keep_dense else None
        self.bias = bias
        self.values = None if state.decode is None else state.decode.values
        self.meta = None if state.decode is None else state.decode.meta

    def _held(self) -> Tensor | None:
        """A tensor of the weight's device and dtype (None: not initialised)."""
        for t in (self.packed, self.values, self.dense_weight):
            if t is not None:
                return t
        return None

    def materialize_weight(self) -> Tensor:
        """The dense (out, in) weight, from the kept copy, decompressed or unpacked."""
        if self.dense_weight is not None:
            return self.dense_weight
        if self.packed is not None:
            return decompress(self.packed, self.in_features)
        if self.values is not None:
            return decode_kernel.unpack(Packed24(self.values, self.meta, self.in_features))
        raise RuntimeError(f"{self.layer or 'SparseLinear'}: holds no weight")

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_up_to and x.numel() <= self.dense_up_to * x.shape[-1]:  # tokens <= dense_up_to
            return F.linear(x, self.dense_weight, self.bias)
        return torch.ops.sparseforge.sparse_linear(x, self.packed, self.dense_weight, self.bias, self.out_features,
                                                   self.values, self.meta)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes held for the weight, split by form, and what the dense weight takes."""
        held = self._held()
        sparse = self.packed is not None or self.values is not None
        return {"compressed": tensor_bytes(self.packed) + tensor_bytes(self.values) + tensor_bytes(self.meta),
                "dense_copy": tensor_bytes(self.dense_weight) if sparse else 0,
                "dense_fallback": 0 if sparse else tensor_bytes(self.dense_weight),
                "dense_reference": self.out_features * self.in_features * held.element_size()}

    def extra_repr(self) -> str:
        sparse = self.packed is not None or self.values is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"kernel={self.state.kernel}, dense_copy={self.dense_weight is not None and sparse}, "
                f"bias={self.bias is not None}")

    # --- moving, casting and checkpoints go through the dense weight: the packed bytes hold
    # metadata that a cast or a CPU copy would corrupt.
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        held = self._held()
        if held is None:
            return self
        probe = fn(torch.empty(0, dtype=held.dtype, device=held.device))
        if probe.device == held.device and probe.dtype == held.dtype:
            return self  # nothing moves or changes type
        weight, bias = self.materialize_weight(), self.bias
        self.packed = self.dense_weight = self.values = self.meta = None
        new_weight = fn(weight)
        self._install(new_weight, None if bias is None else fn(bias))
        return self

    def _install_target(self, weight):
        held = self._held()
        return (held.device, held.dtype) if held is not None else (weight.device, weight.dtype)
