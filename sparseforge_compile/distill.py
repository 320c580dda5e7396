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


class StaticKVDecoder:
    """One-token decode steps of a LLaMA-family teacher (LLaMA, Qwen2, Mistral without a sliding
    window) over a preallocated KV cache, calling the model's own modules.

    Why not the model's forward with a ``DynamicCache``: decode of a small model is launch-bound, and
    per step that path re-concatenated every layer's whole cache (at 4096 rows and a mean length of
    256, ~24 GB of copies a step on SmolLM2) and ran the generic mask and cache machinery. Here each
    layer writes its new key/value in place and attends over exactly the filled prefix. Logits equal
    the model's own forward (test, CPU, fp32).
    """

    FAMILIES = ("llama", "qwen2", "mistral")

    def __init__(self, model: nn.Module, rows: int, length: int) -> None:
        inner, cfg = model.model, model.config
        self.model, self.layers, self.length = model, list(inner.layers), length
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        weight = inner.embed_tokens.weight
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.keys = [weight.new_empty(shape) for _ in self.layers]
        self.values = [weight.new_empty(shape) for _ in self.layers]
        positions = torch.arange(length, device=weight.device)[None]
        self.cos, self.sin = inner.rotary_emb(weight[:1, None], positions)  # (1, length, head_dim), model dtype

    @classmethod
    def supports(cls, model: nn.Module, length: int) -> bool:
        cfg = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if cfg is None or inner is None or getattr(cfg, "model_type", None) not in cls.FAMILIES:
            return False
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < length:
            return False
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        layer_parts = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                       "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                       "mlp.act_fn")
        try:
            return (all(hasattr(inner, n) for n in needed) and hasattr(model, "lm_head")
                    and all(inner.layers[0].get_submodule(p) is not None for p in layer_parts))
        except AttributeError:
            return False

    @staticmethod
    def _rms_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h32.to(h.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (rows, vocab) after feeding ``tokens`` (rows, 1) at ``position``."""
        rows = tokens.shape[0]
        h = self.model.model.embed_tokens(tokens)
        cos, sin = self.cos[:, position][:, None, None], self.sin[:, position][:, None, None]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            x = self._rms_norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            keys[:rows, :, position : position + 1] = self._rope(k, cos, sin)
            values[:rows, :, position : position + 1] = v
            # One query token: the query heads sharing a key/value head (consecutive ones, as the
            # model's repeat_kv pairs them) become that head's query rows, so grouped-query
            # attention needs no copy of the cache and no GQA support from the kernel.
            q = self._rope(q, cos, sin).reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            o = F.scaled_dot_product_attention(q, keys[:rows, :, : position + 1], values[:rows, :, : position + 1])
            h = h + attn.o_proj(o.reshape(rows, 1, self.heads * self.head_dim))
            x = self._rms_norm(layer.post_attention_layernorm, h)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(self._rms_norm(self.model.model.norm, h))[:, -1]


@torch.no_grad()
def sample_from_teacher(teacher: nn.Module, prompts: torch.Tensor, length: int, *, batch_size: int | None = None,
                        temperature: float = 1.0, seed: int = 0, time_limit_s: float | None = None,
                        progress: bool = False, static_cache: bool | None = None) -> torch.Tensor:
    """Continue each prompt row by ancestral sampling from ``teacher`` up to ``length`` tokens.

    A plain KV-cache loop (no generate() machinery: its per-step overhead dominated at small
    models); LLaMA-family teachers decode over a preallocated cache (:class:`StaticKVDecoder`;
    ``static_cache`` None: wherever supported). ``batch_size`` None picks it from memory
    (:func:`sample_batch_size`). With
    ``time_limit_s``, keeps whole batches and starts no batch that the last one's duration says
    would end past the limit (the first always runs). Returns ``(rows, length)`` token ids on the CPU.
    """
    from transformers import DynamicCache

    device = next(teacher.parameters()).device
    batch_size = batch_size or sample_batch_size(teacher, length)
    gen = torch.Generator(device=device).manual_seed(seed)
    # transformers >= 5.2x names the KV cache argument `cache`; earlier 5.x `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    if static_cache is None:
        static_cache = StaticKVDecoder.supports(teacher, length)
    decoder = StaticKVDecoder(teacher, min(batch_size, prompts.shape[0]), length) if static_cache else None
    start = time.perf_counter()
    out: list[torch.Tensor] = []
    last_batch_s = 0.0
    for i in range(0, prompts.shape[0], batch_size):
        if time_limit_s is not None and out and time.perf_counter() - start + last_batch_s > time_limit_s:
            break
        batch_start = time.perf_counter()
        ids = prompts[i : i + batch_size].to(device)
        if decoder is not None:
            for position in range(ids.shape[1]):
                logits = decoder.step(ids[:, position : position + 1], position)

            def forward(nxt: torch.Tensor, position: int) -> torch.Tensor:
                return decoder.step(nxt, position)
        else:
            cache = {cache_arg: DynamicCache()}
            logits = teacher(input_ids=ids, use_cache=True, **cache).logits[:, -1]

            def forward(nxt: torch.Tensor, position: int, cache: dict = cache) -> torch.Tensor:
                return teacher(input_ids=nxt, use_cache=True, **cache).logits[:, -1]
        tokens = [ids]
        for step in range(length - ids.shape[1]):
            # Exponential-race sampling: argmax(p / E), E ~ Exp(1), draws from p like multinomial,
            # without multinomial's per-row cumulative sums over the 49k-entry vocabulary.
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            race = torch.empty_like(probs).exponential_(generator=gen)
            nxt = (probs / race).argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
            if step < length - ids.shape[1] - 1:
                logits = forward(nxt, ids.shape[1] + step)
        out.append(torch.cat(tokens, dim=1).cpu())
        last_batch_s = time.perf_counter() - batch_start
        if progress:
            done = sum(t.numel() for t in out)
            log.info("teacher sampling: %d tokens in %.1fs", done, time.perf_counter() - start)
    return torch.cat(out)
