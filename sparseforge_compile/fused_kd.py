"""The logit distillation loss with its gradient computed in the forward, chunk by chunk.

``distill.kd_loss`` lets autograd keep every chunk's fp32 log-softmaxes (student and teacher, vocab-wide)
for the backward: several times the logits' own size at a 49 k vocabulary. Here each chunk's gradient with
respect to the student logits is formed at once and stored in the logits' dtype, so the loss holds one
logits-sized tensor until the backward, and the backward is a multiply:

    d/ds [ kl_w * T^2 * KL(p_t || p_s) ] = kl_w * T * (p_s - p_t),     p = softmax(logits / T)
    d/ds [ ce_w * CE(s, y) ]             = ce_w * (softmax(s) - onehot(y))

It returns the same loss and parts as ``kd_loss`` (mean over predicted tokens; CE reported even at
``ce_weight=0``), for the loop to use in place of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, ce_weight: float,
                kl_weight: float, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = y.numel()
        grad = torch.empty_like(s) if s.requires_grad else None
        ce_sum = s.new_zeros((), dtype=torch.float32)
        kl_sum = s.new_zeros((), dtype=torch.float32)
        for i in range(0, count, chunk_tokens):
            sc, yc = s[i : i + chunk_tokens].float(), y[i : i + chunk_tokens]
            log_p_s1 = F.log_softmax(sc, dim=-1)
            ce_sum += -log_p_s1.gather(1, yc[:, None]).sum()
            g = torch.zeros_like(sc)
            if kl_weight:
                log_p_s = log_p_s1 if temperature == 1 else F.log_softmax(sc / temperature, dim=-1)
                log_p_t = F.log_softmax(t[i : i + chunk_tokens].float() / temperature, dim=-1)
                p_t = log_p_t.exp()
                kl_sum += (p_t * (log_p_t - log_p_s)).sum()
                g += (kl_weight * temperature) * (log_p_s.exp() - p_t)
            if ce_weight:
                g += ce_weight * log_p_s1.exp()
                g.scatter_add_(1, yc[:, None], torch.full_like(yc[:, None], -ce_weight, dtype=g.dtype))
            if grad is not None:
                grad[i : i + chunk_tokens] = (g / count).to(grad.dtype)
        ce = ce_sum / count
        kl = kl_sum * temperature**2 / count
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return ce_weight * ce + kl_weight * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def fused_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 2.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
                  chunk_tokens: int = 8192) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kd_loss``'s value and gradient (next-token CE + T^2 KL, mean over predicted tokens) without
    keeping vocab-wide fp32 intermediates for the backward."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    vocab = student_logits.shape[-1]
    s = student_logits[:, :-1].reshape(-1, vocab)
    t = teacher_logits[:, :-1].reshape(-1, vocab).detach()
    y = labels[:, 1:].reshape(-1)
    loss, ce, kl = _FusedKD.apply(s, t, y, float(temperature), float(ce_weight), float(kl_weight), int(chunk_tokens))
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
