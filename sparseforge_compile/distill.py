"""Distillation from the dense teacher: the KD loss and data-free text sampled from the teacher.

C4's 0.6 M tokens are few for minutes of training (300 s passes over them ~39 times and overfits);
text sampled from the teacher itself is unlimited and matches the teacher's own distribution.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .lowering.cuda_graphs import capture

log = logging.getLogger(__name__)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
            chunk_tokens: int = 8192, real_from_row: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the next token + tau^2 * KL(teacher_tau || student_tau), mean over predicted tokens.

    Computed in fp32 over token chunks so vocab-sized fp32 intermediates stay bounded. The CE is
    reported even with ``ce_weight=0`` (without a gradient): it is what perplexity measures.
    ``real_from_row``: rows from that index on are real text (C4), those before it teacher-sampled;
    then the parts also hold each source's CE and KL (``ce_real``, ``kl_real``, ``ce_sampled``,
    ``kl_sampled``) and the teacher's own CE on the real rows (``teacher_ce_real``). A student whose
    ``ce_real`` falls below the teacher's is memorizing the (small, repeated) real text.
    Returns the loss and its parts (detached; the caller reads them lazily).
    """
    n_rows, length = labels.shape
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = y.numel()
    split = count if real_from_row is None else min(max(real_from_row, 0), n_rows) * (length - 1)
    ce_tok, kl_tok, teacher_ce = [], [], s.new_zeros((), dtype=torch.float32)
    for i in range(0, count, chunk_tokens):
        sc, yc = s[i : i + chunk_tokens].float(), y[i : i + chunk_tokens]
        log_p_s = F.log_softmax(sc / temperature, dim=-1) if kl_weight else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and ce_weight != 0):
            if log_p_s is not None and temperature == 1:  # the CE's log-softmax is the KL's
                ce_tok.append(-log_p_s.gather(1, yc[:, None]).squeeze(1))
            else:
                ce_tok.append(F.cross_entropy(sc, yc, reduction="none"))
        log_p_t = F.log_softmax(t[i : i + chunk_tokens].float() / temperature, dim=-1) if kl_weight else None
        if log_p_t is not None:
            kl_tok.append(F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1))
        lo = max(i, split) - i  # the chunk's real rows start here
        if lo < yc.shape[0]:
            with torch.no_grad():  # at T=1 the KL's teacher log-softmax is the CE's too
                teacher_ce = teacher_ce + (
                    -log_p_t[lo:].gather(1, yc[lo:, None]).sum() if log_p_t is not None and temperature == 1
                    else F.cross_entropy(t[i + lo : i + chunk_tokens].float(), yc[lo:], reduction="sum"))
    ce_all = torch.cat(ce_tok)
    kl_all = torch.cat(kl_tok) * temperature**2 if kl_tok else torch.zeros_like(ce_all)
    ce, kl = ce_all.mean(), kl_all.mean()
    loss = ce_weight * ce + kl_weight * kl
    parts = {"ce": ce.detach(), "kl": kl.detach()}
    if real_from_row is not None:
        for source, sl in (("sampled", slice(0, split)), ("real", slice(split, count))):
            if sl.stop > sl.start:
                parts[f"ce_{source}"] = ce_all[sl].detach().mean()
                parts[f"kl_{source}"] = kl_all[sl].detach().mean()
        if split < count:
            parts["teacher_ce_real"] = teacher_ce / (count - split)
    return loss, parts


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                      energy: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Layer-wise distillation: mean over blocks of ||h_s - h_t||^2 / ||h_t||^2 (fp32).

    Normalizing each block by the teacher's energy keeps every depth on the same scale (the residual
    stream grows with depth), so no block's error dominates the sum. The logit KL says *that* the
    output is off; this says *where*: every block gets a direct signal about its own output.
    ``energy``: each block's ||h_t||^2 mean over a larger batch than this one (all ranks' rows), used in
    place of this batch's: then the ranks' losses average to the whole batch's.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_state_loss: {len(student)} student vs {len(teacher)} teacher block outputs")
    total = student[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student, teacher)):
        t = t.detach().float()
        norm = t.square().mean() if energy is None else energy[i]
        total = total + (s.float() - t).square().mean() / norm.clamp_min(1e-12)
    return total / len(student)


CAUSAL_SDPA = "sparseforge_causal_sdpa"


class MasklessCausalAttention:
    """A Hugging Face causal LM's training forwards with no attention mask built.

    Training rows are whole windows (no padding, no packing), so SDPA's causal flag is the whole mask,
    and transformers' own path ends there too. Before it does, though, each forward without mask or
    cache checks the position ids for packed sequences by reading a device value on the host
    (``masking_utils.find_packed_sequence_indices``): one host sync per forward, two a step (teacher,
    plain student), which stalls a host-bound loop until the GPU drains (H200, SmolLM2, batch 32:
    ``benchmarks/step_time.py --host-report``). Under an attention implementation registered as
    transformers' SDPA function itself but with no mask function, transformers builds no mask and
    SDPA runs causally.

    Applied only where that is the model's own computation: SDPA attention, no sliding window, every
    layer full attention, and the logits on ``check_ids`` unchanged; otherwise ``reason`` says why not
    and nothing changes. :meth:`restore` puts the model's implementation back.
    """

    def __init__(self, model: nn.Module, check_ids: torch.Tensor, autocast: bool = False) -> None:
        self.model = model
        # the top config and any a submodule holds apart
        configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
        self._configs = list({id(c): c for c in configs}.values())
        self.reason = self._why_not()
        self.applied = self.restored = False
        if self.reason is None:
            self._apply(check_ids, autocast)

    def _why_not(self) -> str | None:
        if not self._configs:
            return "not a Hugging Face model"
        for config in self._configs:
            if getattr(config, "_attn_implementation", None) != "sdpa":
                return f"attention is {getattr(config, '_attn_implementation', None)!r}, not 'sdpa'"
            if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
                return f"sliding-window attention ({config.sliding_window} tokens) needs its mask"
            if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
                return "some layers are not full attention"
            if getattr(config, "is_encoder_decoder", False):
                return "an encoder-decoder model"
        return None

    def _set(self, name: str) -> None:
        for config in self._configs:
            config._attn_implementation = name

    @torch.no_grad()
    def _apply(self, ids: torch.Tensor, autocast: bool) -> None:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from .evaluate import logits_of

        AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            before = logits_of(self.model, ids).float()
            self._set(CAUSAL_SDPA)
            after = logits_of(self.model, ids).float()
        finite = before[before.isfinite()]  # a broken model's NaNs are the training loop's to report
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
        if not torch.allclose(after, before, rtol=0, atol=1e-4 * scale, equal_nan=True):
            self._set("sdpa")
            diff = float((after - before).abs().max())
            self.reason = f"the logits changed without the mask (max |diff| {diff:.3g}): kept the mask"
            log.warning("%s: %s", type(self.model).__name__, self.reason)
            return
        self.applied = True

    def restore(self) -> None:
        """Put the model's SDPA back (``applied`` stays: whether the training forwards ran without)."""
        if self.applied and not self.restored:
            self._set("sdpa")
            self.restored = True


class BlockOutputHooks:
    """Forward hooks on a module's decoder blocks that hand each block's output to ``recorder``.

    For Hugging Face modules (the teacher, the plain student); the masked graph gets the same
    recorder through the ``TapBlockOutputs`` pass instead, since export inlines the blocks.
    """

    def __init__(self, model: nn.Module) -> None:
        from .layers import find_decoder_blocks
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


# The cap costs no sampling speed: 4096 whole 512-token rows sample at 149 k tokens/s on the H200, 3932 at
# 148 k, 3840 at 135 k (benchmarks/results/sample_rate.json).
MAX_SAMPLE_BATCH = 4096
# Of the GPU memory not held by tensors, for the KV cache and vocab-sized buffers. 0.45, not 0.4: at 0.4 an
# H200 with SmolLM2 came to 4099 rows, 3 over the cap, so a few hundred MB more tensors in one method's
# process would have given it 3840 rows; at 0.45 it is ~500 rows (7 GB) clear of the cap.
SAMPLE_MEMORY_SHARE = 0.45
# Batches are rounded down to this many rows: two runs whose tensors differ by a few hundred MB then
# sample the same rows, as a side-by-side comparison needs.
SAMPLE_BATCH_STEP = 256


GRAPH_BUCKET = 64  # positions per captured decode graph (GraphedDecoder)
TEACHER_DECODES = ("auto", "forward", "static", "graphs")  # sample_from_teacher(decode=...)


def sample_batch_size(teacher: nn.Module, length: int) -> int:
    """Rows to sample at once: decode of a small model is launch-bound (SmolLM2 on an H200: ~25 ms
    a step at 512 and at 2048 rows alike), so tokens/s grow with the batch until memory runs out.
    On a GPU, as many rows as fit in 45% of the device's memory not held by tensors (at most
    MAX_SAMPLE_BATCH, in steps of SAMPLE_BATCH_STEP); on the CPU 16."""
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
    # K and V of every layer, one layer more of headroom (the DynamicCache path's concatenation
    # copy), fp32 logits/probs/noise, and the logits each captured decode graph keeps (GraphedDecoder).
    graphs = -(-length // GRAPH_BUCKET)
    per_row = (layers + 1) * 2 * kv_heads * head_dim * length * elem + (4 + graphs) * vocab * 4
    # The device's memory less what this process's tensors hold, not mem_get_info's free memory: that also
    # moves with the allocator's cache and with what the CUDA libraries reserved, and on the H200 it read
    # 143 GB in one 10-minute run and 149 GB in the other beside it (3932 rows against 4096: different text
    # for the two methods). The share leaves the headroom for a device shared with others.
    usable = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return rows_for_memory(usable, per_row)


def rows_for_memory(free_bytes: int, per_row_bytes: int) -> int:
    """Sampling rows for ``free_bytes`` of device memory at ``per_row_bytes`` each: SAMPLE_MEMORY_SHARE of
    it, at most MAX_SAMPLE_BATCH, rounded down to SAMPLE_BATCH_STEP rows (below one step: exact, >= 1)."""
    rows = int(min(MAX_SAMPLE_BATCH, SAMPLE_MEMORY_SHARE * free_bytes // per_row_bytes))
    return rows // SAMPLE_BATCH_STEP * SAMPLE_BATCH_STEP if rows >= SAMPLE_BATCH_STEP else max(1, rows)


class StaticKVDecoder:
    """One-token decode steps of a LLaMA-family teacher (LLaMA, Qwen2, Mistral without a sliding
    window) over a preallocated KV cache, calling the model's own modules.

    Why not the model's forward with a ``DynamicCache``: decode of a small model is launch-bound, and
    per step that path re-concatenated every layer's whole cache (at 4096 rows and a mean length of
    256, ~24 GB of copies a step on SmolLM2, by arithmetic) and ran the generic mask and cache machinery. Here each
    layer writes its new key/value in place and attends over exactly the filled prefix. Logits equal
    the model's own forward (test, CPU, fp32).
    """

    FAMILIES = ("llama", "qwen2", "mistral")

    def __init__(self, model: nn.Module, rows: int, length: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb  # the family's RoPE (Qwen2 and Mistral share it)
        inner, cfg = model.model, model.config
        self.model, self.layers, self.length = model, list(inner.layers), length
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        weight = inner.embed_tokens.weight
        shape = (rows, self.kv_heads, length, self.head_dim)
        # Zeros, not empty: bucket_step reads slots past the position (masked to weight 0), and
        # 0 x NaN from uninitialised memory would still be NaN.
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
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
        layer_parts = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                       "self_attn.v_proj", "self_attn.o_proj")
        try:
            return (all(hasattr(inner, n) for n in needed) and hasattr(model, "lm_head")
                    and all(inner.layers[0].get_submodule(p) is not None for p in layer_parts))
        except AttributeError:
            return False

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (rows, vocab) after feeding ``tokens`` (rows, 1) at ``position``."""
        cos, sin = self.cos[:, position][:, None], self.sin[:, position][:, None]  # (1, 1, head_dim)

        def write(cache: torch.Tensor, value: torch.Tensor) -> None:
            cache[: value.shape[0], :, position : position + 1] = value

        def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, keys[: q.shape[0], :, : position + 1],
                                                  values[: q.shape[0], :, : position + 1])
        return self._decode(tokens, cos, sin, write, attend)

    def bucket_step(self, tokens: torch.Tensor, position: torch.Tensor, end: int) -> torch.Tensor:
        """:meth:`step` with the position as a 0-d device tensor and attention over the first ``end``
        cache slots, masked past the position: fixed shapes and addresses for a whole bucket of
        positions, so one CUDA graph serves them all (:class:`GraphedDecoder`)."""
        index = position.view(1)
        cos = self.cos[0].index_select(0, index)[None]
        sin = self.sin[0].index_select(0, index)[None]
        slots = torch.arange(end, device=position.device)
        mask = torch.zeros(end, dtype=self.cos.dtype, device=position.device).masked_fill(slots > position, -math.inf)
        mask = mask.view(1, 1, 1, end)

        def write(cache: torch.Tensor, value: torch.Tensor) -> None:
            cache.index_copy_(2, index, value)

        def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)
        return self._decode(tokens, cos, sin, write, attend)

    def _decode(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                write: Callable[[torch.Tensor, torch.Tensor], None],
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        rows = tokens.shape[0]
        h = self.model.model.embed_tokens(tokens)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            write(keys, k)
            write(values, v)
            # One query token: the query heads sharing a key/value head (consecutive ones, as the
            # model's repeat_kv pairs them) become that head's query rows, so grouped-query
            # attention needs no copy of the cache and no GQA support from the kernel.
            o = attend(q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim), keys, values)
            h = h + attn.o_proj(o.reshape(rows, 1, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.model.model.norm(h))[:, -1]


class GraphedDecoder:
    """:class:`StaticKVDecoder` steps replayed as CUDA graphs: one graph per bucket of ``bucket``
    positions (attention over the bucket's end, masked), so a decode step is a single replay instead
    of ~45 launches per layer. Decode of a small model is launch-bound (SmolLM2 at 4096 rows: ~25 ms a
    step against ~8 ms of GPU work). Only for full batches of ``rows``."""

    def __init__(self, decoder: StaticKVDecoder, rows: int, bucket: int = GRAPH_BUCKET) -> None:
        self.decoder, self.rows, self.bucket = decoder, rows, bucket
        device = decoder.cos.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _graph(self, end: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if end not in self.graphs:
            self.graphs[end] = capture(lambda: self.decoder.bucket_step(self.tokens, self.position, end),
                                       pool=self.pool)
        return self.graphs[end]

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        end = min(self.decoder.length, (position // self.bucket + 1) * self.bucket)
        graph, logits = self._graph(end)
        self.tokens.copy_(tokens)
        self.position.fill_(position)
        graph.replay()
        return logits


@torch.no_grad()
def sample_from_teacher(teacher: nn.Module, prompts: torch.Tensor, length: int, *, batch_size: int | None = None,
                        temperature: float = 1.0, seed: int = 0, time_limit_s: float | None = None,
                        progress: bool = False, decode: str = "auto") -> torch.Tensor:
    """Continue each prompt row by ancestral sampling from ``teacher`` up to ``length`` tokens.

    A plain KV-cache loop (no generate() machinery: its per-step overhead dominated at small
    models). ``decode``: ``"forward"`` (the model's forward with a ``DynamicCache``), ``"static"``
    (:class:`StaticKVDecoder`, LLaMA-family), ``"graphs"`` (its steps replayed as CUDA graphs,
    :class:`GraphedDecoder`; full batches on a GPU), ``"auto"``: graphs on CUDA and static on the CPU
    where the static decoder supports the model, else forward. H200, SmolLM2, 4096 rows: graphs 172k
    tokens/s, static 122k, forward 125k (benchmarks/results/step_time.json); same samples, tested.
    ``batch_size`` None picks it from memory (:func:`sample_batch_size`). With
    ``time_limit_s``, keeps whole batches and starts no batch that the last one's duration says
    would end past the limit (the first always runs). Returns ``(rows, length)`` token ids on the CPU.
    """
    from transformers import DynamicCache

    device = next(teacher.parameters()).device
    batch_size = batch_size or sample_batch_size(teacher, length)
    gen = torch.Generator(device=device).manual_seed(seed)
    # transformers >= 5.2x names the KV cache argument `cache`; earlier 5.x `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    if decode not in TEACHER_DECODES:
        raise ValueError(f"decode={decode!r}: use one of {', '.join(TEACHER_DECODES)}")
    if decode == "auto":
        decode = ("forward" if not StaticKVDecoder.supports(teacher, length)
                  else "graphs" if device.type == "cuda" else "static")
    rows = min(batch_size, prompts.shape[0])
    decoder = StaticKVDecoder(teacher, rows, length) if decode in ("static", "graphs") else None
    graphed = GraphedDecoder(decoder, rows) if decode == "graphs" and device.type == "cuda" else None
    start = time.perf_counter()
    out: list[torch.Tensor] = []
    last_batch_s = 0.0
    for i in range(0, prompts.shape[0], batch_size):
        if time_limit_s is not None and out and time.perf_counter() - start + last_batch_s > time_limit_s:
            break
        batch_start = time.perf_counter()
        ids = prompts[i : i + batch_size].to(device)
        if decoder is not None:
            stepper = graphed if graphed is not None and ids.shape[0] == graphed.rows else decoder
            for position in range(ids.shape[1]):
                logits = stepper.step(ids[:, position : position + 1], position)

            def forward(nxt: torch.Tensor, position: int, stepper=stepper) -> torch.Tensor:
                return stepper.step(nxt, position)
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
