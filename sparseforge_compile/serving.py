"""Greedy decoding with a static KV cache, the decode step optionally under ``torch.compile`` (CUDA
graphs with ``mode="reduce-overhead"`` on CUDA), reporting prefill and decode tokens/s.

A static cache (transformers' ``StaticCache``) keeps every decode step's shapes fixed, so one compiled
graph (and one CUDA graph) serves all steps: the per-token host work of eager Hugging Face
``generate()`` is what a lowered 2:4 model would otherwise be measured against. The output is the
same token sequence as ``model.generate(do_sample=False)``.

    gen = Generator(model, max_cache_len=prompt_len + 64)
    result = gen.generate(input_ids, max_new_tokens=64)   # result.sequences, result.decode_tokens_per_s
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UsageError


@dataclass
class GenerationResult:
    sequences: Tensor  # (batch, prompt + new tokens)
    prompt_tokens: int  # per sequence
    new_tokens: int  # per sequence
    prefill_s: float  # the prompt's forward and the first new token
    decode_s: float  # every later token
    compiled: bool

    @property
    def batch(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second after the first, over the whole batch."""
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_s if steps > 0 and self.decode_s else float("nan")

    def as_dict(self) -> dict:
        return {"batch": self.batch, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "compiled": self.compiled,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


def _eos_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


class Generator:
    """Greedy generation for one causal LM with a static KV cache of ``max_cache_len`` tokens.

    ``compile``: compile the decode step (default: on CUDA only); ``mode``: ``torch.compile``'s (default
    ``"reduce-overhead"`` on CUDA: CUDA graphs); ``backend``: Dynamo's (``"eager"`` to check tracing).
    The compiled step and the cache are kept between calls: a second ``generate`` of the same batch size
    runs warm (time that one).
    """

    def __init__(self, model: nn.Module, max_cache_len: int, *, compile: bool | None = None, mode: str | None = None,
                 backend: str | Callable = "inductor") -> None:
        params = inspect.signature(model.forward).parameters
        if "past_key_values" not in params and "cache" not in params:
            raise UsageError(f"{type(model).__name__} takes no KV cache, so the static-cache loop cannot drive it")
        self.model = model
        self.max_cache_len = int(max_cache_len)
        self.device = next(model.parameters()).device
        self.compiled = self.device.type == "cuda" if compile is None else bool(compile)
        # transformers >= 5.2x names the argument ``cache`` and tracks positions itself; earlier ones take
        # ``past_key_values`` and ``cache_position``.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._takes_cache_position = "cache_position" in params
        self._caches: dict[int, object] = {}
        step = self._step
        if self.compiled:
            mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
            step = torch.compile(step, mode=mode, backend=backend, dynamic=False)
        self._compiled_step = step

    def _cache(self, batch: int):
        from transformers import StaticCache

        cache = self._caches.get(batch)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self._caches[batch] = cache
        else:
            cache.reset()
        return cache

    def _forward(self, ids: Tensor, positions: Tensor, cache, cache_position: Tensor) -> Tensor:
        extra = {"cache_position": cache_position} if self._takes_cache_position else {}
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: cache}, **extra)
        return out.logits[:, -1].argmax(-1)

    def _step(self, ids: Tensor, positions: Tensor, cache, cache_position: Tensor) -> Tensor:
        return self._forward(ids, positions, cache, cache_position)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> GenerationResult:
        """Greedy continuation of ``input_ids`` (``(batch, prompt)``, no padding) by up to ``max_new_tokens``;
        stops early once every sequence has produced an end token (later ones padded), as ``generate`` does."""
        batch, prompt = input_ids.shape
        if prompt + max_new_tokens > self.max_cache_len:
            raise UsageError(f"prompt {prompt} + {max_new_tokens} new tokens exceed the static cache of "
                             f"{self.max_cache_len}: make the Generator with max_cache_len >= {prompt + max_new_tokens}")
        eos = torch.tensor(_eos_ids(self.model, eos_token_id), device=self.device, dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        cache = self._cache(batch)
        ids = input_ids.to(self.device)
        self._sync()
        start = time.perf_counter()
        positions = torch.arange(prompt, device=self.device).expand(batch, -1)
        token = self._forward(ids, positions, cache, torch.arange(prompt, device=self.device))
        tokens = [token]
        done = torch.isin(token, eos) if eos.numel() else None
        self._sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(1, max_new_tokens):
            if done is not None and bool(done.all()):  # the host waits here only where an end token can stop it
                break
            position = prompt + i - 1
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            nxt = self._compiled_step(token[:, None], torch.full((batch, 1), position, device=self.device),
                                      cache, torch.tensor([position], device=self.device)).clone()
            if done is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done = done | torch.isin(nxt, eos)
            token = nxt
            tokens.append(token)
        self._sync()
        decode_s = time.perf_counter() - start
        sequences = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
        return GenerationResult(sequences=sequences, prompt_tokens=prompt, new_tokens=len(tokens),
                                prefill_s=prefill_s, decode_s=decode_s, compiled=self.compiled)


def greedy_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, compile: bool | None = None,
                    mode: str | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None) -> GenerationResult:
    """One greedy generation with a fresh :class:`Generator` (its cache sized for this call)."""
    gen = Generator(model, input_ids.shape[1] + max_new_tokens, compile=compile, mode=mode)
    return gen.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
