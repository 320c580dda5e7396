"""The ``sparseforge::apply_mask`` custom op: ``weight * mask``, one node per masked layer.

A custom op (rather than a plain ``aten.mul``) keeps the mask application visible and findable in
the graph, so that hardening and lowering can locate it by target, and it survives re-tracing
(export, ``torch.compile``) as one opaque node with a fake impl and a registered autograd formula.

``mask`` is always in the Linear layout ``(out_features, in_features)`` (N:M groups run along its
last dim). ``transposed=True`` is for weights stored ``(in, out)`` (GPT-2 ``Conv1D``): the mask is
applied transposed. The result has the weight's dtype, shape and strides; the gradient reaching
the mask has the mask's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _aligned_mask(mask: Tensor, transposed: bool, dtype: torch.dtype) -> Tensor:
    return (mask.t() if transposed else mask).to(dtype)


@torch.library.custom_op("sparseforge::apply_mask", mutates_args=())
def apply_mask(weight: Tensor, mask: Tensor, transposed: bool = False) -> Tensor:
    """``weight * mask`` (``mask`` transposed first when ``transposed``)."""
    expected = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"apply_mask: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)} "
            f"(transposed={transposed}): the mask must be (out_features, in_features) = {expected}"
        )
    # Written into a tensor laid out like the weight, so real and fake outputs have the same strides
    # whatever the mask's layout (a transposed view for Conv1D).
    out = torch.empty_like(weight)
    torch.mul(weight, _aligned_mask(mask, transposed, weight.dtype), out=out)
    return out


@apply_mask.register_fake
def _apply_mask_fake(weight: Tensor, mask: Tensor, transposed: bool = False) -> Tensor:
    return torch.empty_like(weight)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    weight, mask, transposed = inputs
    ctx.transposed = transposed
    ctx.save_for_backward(weight, mask)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    weight, mask = ctx.saved_tensors
    grad_weight = grad_mask = None
    if ctx.needs_input_grad[0]:
        grad_weight = grad * _aligned_mask(mask, ctx.transposed, grad.dtype)
    if ctx.needs_input_grad[1]:
        grad_mask = grad * weight
        grad_mask = (grad_mask.t() if ctx.transposed else grad_mask).to(mask.dtype)
    return grad_weight, grad_mask, None


apply_mask.register_autograd(_backward, setup_context=_setup_context)

#: The OpOverload that graph passes match ``node.target`` against.
APPLY_MASK = torch.ops.sparseforge.apply_mask.default
