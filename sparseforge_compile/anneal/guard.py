"""Gradient clipping and the non-finite check: which step went bad first, and in which parameter.

With the fused optimizer (CUDA) the check is deferred: the first bad step is kept on the device and
the loop raises at its next check (log step, checkpoint, end), with no host sync per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AnnealError
from ..sharding import local_shard


class FiniteGuard:
    """``params``: what the optimizer trains; ``names``: id(parameter) -> its layer name."""

    def __init__(self, params: list[nn.Parameter], names: dict[int, str], grad_clip: float, device: torch.device,
                 deferred: bool, out_dir: Path | None = None, ranks=None) -> None:
        self.params, self.names, self.grad_clip, self.out_dir = params, names, grad_clip, out_dir
        self.ranks = ranks  # distributed.Ranks where gradients are sharded: the norm sums every rank's shards
        self.deferred = deferred
        self.first_bad_step = torch.tensor(-1, device=device)
        self.bad_param = torch.tensor(-1, device=device)
        self.bad_loss = torch.tensor(0.0, device=device)
        self._grad_params: list[nn.Parameter] = []

    @torch.no_grad()
    def clip_and_check(self, loss: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the gradients to ``grad_clip`` and return whether this step is non-finite (a device
        bool: a non-finite loss gives non-finite gradients too, and the norm catches both) and the
        gradient norm before clipping."""
        params = [p for p in self.params if p.grad is not None]
        grads = [local_shard(p.grad) for p in params]
        per_param = torch.stack(torch._foreach_norm(grads))
        norm = per_param.norm()
        if self.ranks is not None:
            square = norm.square().reshape(1)
            self.ranks.sum_([square])
            norm = square.sqrt()[0]
        if self.grad_clip:
            torch._foreach_mul_(grads, (self.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        bad = ~torch.isfinite(norm + loss)
        first = self.first_bad_step < 0
        nonfinite = ~torch.isfinite(per_param)
        culprit = torch.where(nonfinite.any(), nonfinite.int().argmax(), -1)  # -1: only the total overflowed
        self.bad_param = torch.where(bad & first, culprit, self.bad_param)
        self.first_bad_step = torch.where(bad & first, step, self.first_bad_step)
        self.bad_loss = torch.where(bad & first, loss.float(), self.bad_loss)
        self._grad_params = params
        return bad, norm

    def check(self) -> None:
        """Raise :class:`AnnealError` if a step since the start went non-finite (one host sync)."""
        step = int(self.first_bad_step)
        if step >= 0:
            raise AnnealError(self.message(self.bad_loss, step))

    def message(self, loss: torch.Tensor, step: int) -> str:
        culprit = next((self.names.get(id(p), "?") for p in self.params if not torch.isfinite(p).all()), None)
        where = (f"; non-finite weights in {culprit}" if culprit
                 else f"; first non-finite gradient in {self._first_nonfinite_grad()}")
        return (f"loss is {float(loss.detach())} at step {step}{where}; lower --lr or check the data. "
                f"The model was not hardened; {self._kept_note()}")

    def _first_nonfinite_grad(self) -> str:
        i = int(self.bad_param)
        if i < 0 or i >= len(self._grad_params):
            return "(no single parameter: the total norm overflowed)"
        p = self._grad_params[i]
        return self.names.get(id(p), f"a parameter of shape {tuple(p.shape)}")

    def _kept_note(self) -> str:
        return (f"the last good checkpoint is in {self.out_dir / 'checkpoint'}"
                if self.out_dir and (self.out_dir / "checkpoint").exists() else "no checkpoint was written yet")
