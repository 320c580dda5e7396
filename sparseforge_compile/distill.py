"""Distillation from the dense teacher: the KD loss and data-free text sampled from the teacher.

C4's 0.6 M tokens are few for minutes of training (300 s passes over them ~39 times and overfits);
text sampled from the teacher itself is unlimited and matches the teacher's own distribution.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
            chunk_tokens: int = 8192) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the next token + tau^2 * KL(teacher_tau || student_tau), mean over predicted tokens.

    Computed in fp32 over token chunks so vocab-sized fp32 intermediates stay bounded.
    Returns the loss and its parts (detached floats are read lazily by the caller).
    """
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = y.numel()
    ce_total = s.new_zeros((), dtype=torch.float32)
    kl_total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, count, chunk_tokens):
        sc = s[i : i + chunk_tokens].float()
        if ce_weight:
            ce_total = ce_total + F.cross_entropy(sc, y[i : i + chunk_tokens], reduction="sum")
        if kl_weight:
            log_p_s = F.log_softmax(sc / temperature, dim=-1)
            log_p_t = F.log_softmax(t[i : i + chunk_tokens].float() / temperature, dim=-1)
            kl_total = kl_total + F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    ce = ce_total / count
    kl = kl_total / count * temperature**2
    loss = ce_weight * ce + kl_weight * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Layer-wise distillation: mean over blocks of ||h_s - h_t||^2 / ||h_t||^2 (fp32).

    Normalizing each block by the teacher's energy keeps every depth on the same scale (the residual
    stream grows with depth), so no block's error dominates the sum. The logit KL says *that* the
    output is off; this says *where*: every block gets a direct signal about its own output.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_state_loss: {len(student)} student vs {len(teacher)} teacher block outputs")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        t = t.detach().float()
        total = total + (s.float() - t).square().mean() / t.square().mean().clamp_min(1e-12)
    return total / len(student)


class BlockOutputHooks:
    """Forward hooks on a module's decoder blocks that hand each block's output to ``recorder``.

    For Hugging Face modules (the teacher, the plain student); the masked graph gets the same
    recorder through the ``TapBlockOutputs`` pass instead, since export inlines the blocks.
    """

    def __init__(self, model: nn.Module) -> None:
        from .baselines import find_decoder_blocks
        from .passes.tap_blocks import BlockOutputRecorder

        _, blocks = find_decoder_blocks(model)
        self.recorder = BlockOutputRecorder(len(blocks))
        self._handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, index: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            self.recorder(output[0] if isinstance(output, tuple) else output, index)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


MAX_SAMPLE_BATCH = 4096
SAMPLE_MEMORY_SHARE = 0.4  # of the free GPU memory, for the KV cache and vocab-sized buffers


def sample_batch_size(teacher: nn.Module, length: int) -> int:
    """Rows to sample at once: decode of a small model is launch-bound (SmolLM2 on an H200: ~25 ms
    a step at 512 and at 2048 rows alike), so tokens/s grow with the batch until memory runs out.
    On a GPU, as many rows as fit in 40% of the free memory (at most 4096); on the CPU 16."""
    device = next(teacher.parameters()).device
    if device.type != "cuda":
        return 16
    cfg = getattr(teacher, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and heads and hidden):
        return 1024
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    elem = next(teacher.parameters()).element_size()
    vocab = getattr(cfg, "vocab_size", 0) or 0
    # K and V of every layer, plus one layer's concatenation copy, plus fp32 logits/probs/noise.
    per_row = (layers + 1) * 2 * kv_heads * head_dim * length * elem + 4 * vocab * 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_SAMPLE_BATCH, SAMPLE_MEMORY_SHARE * free // per_row)))


@torch.no_grad()
def sample_from_teacher(teacher: nn.Module, prompts: torch.Tensor, length: int, *, batch_size: int | None = None,
                        temperature: float = 1.0, seed: int = 0, time_limit_s: float | None = None,
                        progress: bool = False) -> torch.Tensor:
    """Continue each prompt row by ancestral sampling from ``teacher`` up to ``length`` tokens.

    A plain KV-cache loop (no generate() machinery: its per-step overhead dominated at small
    models); ``batch_size`` None picks it from memory (:func:`sample_batch_size`). With
    ``time_limit_s``, keeps whole batches and starts no batch that the last one's duration says
    would end past the limit (the first always runs). Returns ``(rows, length)`` token ids on the CPU.
    """
    from transformers import DynamicCache

    device = next(teacher.parameters()).device
    batch_size = batch_size or sample_batch_size(teacher, length)
    gen = torch.Generator(device=device).manual_seed(seed)
    # transformers >= 5.2x names the KV cache argument `cache`; earlier 5.x `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    start = time.perf_counter()
    out: list[torch.Tensor] = []
    last_batch_s = 0.0
    for i in range(0, prompts.shape[0], batch_size):
        if time_limit_s is not None and out and time.perf_counter() - start + last_batch_s > time_limit_s:
            break
        batch_start = time.perf_counter()
        ids = prompts[i : i + batch_size].to(device)
        cache = {cache_arg: DynamicCache()}
        logits = teacher(input_ids=ids, use_cache=True, **cache).logits[:, -1]
        tokens = [ids]
        for step in range(length - ids.shape[1]):
            # Exponential-race sampling: argmax(p / E), E ~ Exp(1), draws from p like multinomial,
            # without multinomial's per-row cumulative sums over the 49k-entry vocabulary.
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            race = torch.empty_like(probs).exponential_(generator=gen)
            nxt = (probs / race).argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
            if step < length - ids.shape[1] - 1:
                logits = teacher(input_ids=nxt, use_cache=True, **cache).logits[:, -1]
        out.append(torch.cat(tokens, dim=1).cpu())
        last_batch_s = time.perf_counter() - batch_start
        if progress:
            done = sum(t.numel() for t in out)
            log.info("teacher sampling: %d tokens in %.1fs", done, time.perf_counter() - start)
    return torch.cat(out)
