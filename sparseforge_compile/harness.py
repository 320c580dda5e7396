"""lm-evaluation-harness's ``LM`` API over our model objects: a dense model, a model pruned in memory, a
loaded sparse checkpoint or a lowered model (its CPU fallback op on the CPU), with the model's own
tokenizer (the embedded GGUF's, or the byte tokenizer of the tiny test models).

lm-eval owns the tasks, prompts and metrics; this adapter only answers its three request kinds, batched
on the model's device, tokenized the way its ``HFLM`` tokenizes (so scores match HFLM's).
"""

from __future__ import annotations

import inspect

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm.auto import tqdm

from .evaluate import logits_of

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when the config names no context length


def model_max_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _tail_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all of them if the model cannot slice before its head)."""
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts:
        return logits_of(model, ids)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    return out.logits if hasattr(out, "logits") else out[0]


class SparseForgeLM(LM):
    """``lm_eval.api.model.LM`` for one of our models and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, progress: bool = False) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("lm-eval scoring needs the model's tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model)
        self.max_gen_toks = max_gen_toks
        self.progress = progress
        self._device = next(model.parameters()).device
        eos = getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.eot_token_id = eos
        self.prefix_token_id = bos if bos is not None else eos  # HFLM's choice for an empty context

    # ------------------------------------------------------------------------------ tokenizing

    def tok_encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as HFLM splits them: trailing spaces of the context move
        to the continuation, the pair is encoded whole, the continuation is what follows the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            if self.prefix_token_id is None:
                raise ValueError("an empty context needs the tokenizer's BOS or EOS token as its one context token")
            return [int(self.prefix_token_id)], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------------------------- requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of the model's context, each window seeing up to
        ``max_length`` tokens before it (lm-eval's rolling protocol)."""
        if self.prefix_token_id is None:
            raise ValueError("rolling log-likelihood needs the tokenizer's BOS or EOS token to start the text")
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=int(self.prefix_token_id),
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(ll for ll, _ in self.score_tokens(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut at the first stop string; batched by left padding."""
        out: list[str] = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in tqdm(range(0, len(order), self.batch_size), desc="generate", disable=not self.progress):
            chunk = order[start : start + self.batch_size]
            kwargs = [dict(requests[i].args[1] or {}) for i in chunk]
            max_new = max(int(k.get("max_gen_toks", self.max_gen_toks)) for k in kwargs)
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or
                        [int(self.prefix_token_id)] for i in chunk]
            texts = self._greedy(contexts, max_new)
            for i, k, text in zip(chunk, kwargs, texts):
                until = k.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
        return out

    def _greedy(self, contexts: list[list[int]], max_new: int) -> list[str]:
        width = max(len(c) for c in contexts)
        pad = int(self.eot_token_id or 0)
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, ctx in enumerate(contexts):
            ids[row, width - len(ctx):] = torch.tensor(ctx)
            mask[row, width - len(ctx):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        done = torch.zeros(len(contexts), dtype=torch.bool, device=self._device)
        new_tokens = []
        for _ in range(max_new):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            if self.eot_token_id is not None:
                done |= nxt == self.eot_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(done.all()):
                break
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in contexts]
        texts = []
        for row in generated:
            if self.eot_token_id is not None and self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            texts.append(self.tok_decode(row))
        return texts

    # -------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability, whether greedy decoding gives it) of each continuation given its
        context, batched longest first, right-padded (a causal model never sees the padding)."""
        inputs, targets = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a continuation encodes to no tokens: nothing to score")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                                 f"{self.max_length}")
            inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])  # left-truncated, as lm-eval does
            targets.append(cont)
        order = sorted(range(len(pairs)), key=lambda i: (-len(inputs[i]), i))
        scores: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=not self.progress):
                chunk = order[start : start + self.batch_size]
                for i, value in zip(chunk, self._score_chunk([inputs[i] for i in chunk], [targets[i] for i in chunk])):
                    scores[i] = value
        finally:
            self.model.train(was_training)
        return scores

    def _score_chunk(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        rows, cols, tgt = [], [], []
        for row, (inp, cont) in enumerate(zip(inputs, targets)):
            ids[row, : len(inp)] = torch.tensor(inp)
            rows += [row] * len(cont)
            cols += range(len(inp) - len(cont), len(inp))
            tgt += cont
        # Only positions from the earliest continuation on need the LM head (a vocabulary-wide matmul).
        keep = width - min(len(x) - len(c) for x, c in zip(inputs, targets))
        logits = _tail_logits(self.model, ids.to(self._device), keep)
        row_index = torch.tensor(rows, device=self._device)
        col_index = torch.tensor(cols, device=self._device) - (width - logits.shape[1])
        logprobs = torch.log_softmax(logits[row_index, col_index].float(), dim=-1)
        target = torch.tensor(tgt, device=self._device)
        token_lp = logprobs.gather(1, target[:, None]).squeeze(1)
        greedy_hit = (logprobs.argmax(-1) == target).float()
        sums = torch.zeros(len(inputs), device=self._device).index_add_(0, row_index, token_lp)
        misses = torch.zeros(len(inputs), device=self._device).index_add_(0, row_index, 1 - greedy_hit)
        return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]
