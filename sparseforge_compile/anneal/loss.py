"""The training loss: tau^2 KL to the dense teacher's logits, CE on the labels, and the layer-wise
block-output loss through :class:`LayerTaps`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..distill import hidden_state_loss, kd_loss
from ..fused_kd import fused_kd_loss
from ..passes.tap_blocks import BlockOutputRecorder

SOURCE_METRICS = ("ce_real", "teacher_ce_real", "kl_real", "ce_sampled", "kl_sampled")  # see distill.kd_loss


@dataclass
class LayerTaps:
    """Block-output recorders for layer-wise distillation: the teacher's, the masked graph's and the
    plain student's (``passes.tap_blocks``, ``distill.BlockOutputHooks``)."""

    teacher: BlockOutputRecorder
    graph: BlockOutputRecorder
    plain: BlockOutputRecorder
    hooks: list = field(default_factory=list)  # distill.BlockOutputHooks to remove after training

    def recorders(self) -> tuple[BlockOutputRecorder, ...]:
        return self.teacher, self.graph, self.plain


def loss_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor,
               hidden: tuple[list[torch.Tensor], list[torch.Tensor]] | None, temperature: float,
               ce_weight: float, kl_weight: float, real_from_row: int | None = None,
               hidden_energy: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """CE + tau^2 KL to the teacher, and the layer-wise loss as ``parts["hidden"]`` (with its
    gradient; the caller weighs it in): one function, so that torch.compile fuses the vocab-sized
    fp32 work (a quarter of an eager step on SmolLM2). The batch's first ``real_from_row`` rows are
    teacher-sampled, the rest real text (``kd_loss``); ``hidden_energy``: see ``hidden_state_loss``."""
    loss, parts = kd_loss(s_logits, t_logits, ids, temperature=temperature, ce_weight=ce_weight,
                          kl_weight=kl_weight, real_from_row=real_from_row)
    if hidden is not None:
        parts["hidden"] = hidden_state_loss(*hidden, energy=hidden_energy)
    return loss, parts


def fused_loss_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor,
                     hidden: tuple[list[torch.Tensor], list[torch.Tensor]] | None, temperature: float,
                     ce_weight: float, kl_weight: float, real_from_row: int | None = None,
                     hidden_energy: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """:func:`loss_terms` with the KD loss's gradient formed in the forward (``fused_kd``): the same loss,
    without the per-source metrics (``real_from_row`` is not split out)."""
    loss, parts = fused_kd_loss(s_logits, t_logits, ids, temperature=temperature, ce_weight=ce_weight,
                                kl_weight=kl_weight)
    if hidden is not None:
        parts["hidden"] = hidden_state_loss(*hidden, energy=hidden_energy)
    return loss, parts
