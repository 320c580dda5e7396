"""Perplexity by the standard protocol: exp(mean next-token NLL) over non-overlapping windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean next-token negative log-likelihood (nats)
    windows: int
    total_windows: int
    seqlen: int
    tokens: int  # predicted tokens scored
    seconds: float
    # Mean NLL at each predicted position (index i: the token at i + 1, predicted from i + 1 tokens
    # of context): where in the window a model loses, e.g. beyond the training length.
    position_nll: list[float] = field(default_factory=list, repr=False)

    @property
    def subset(self) -> bool:
        return self.windows < self.total_windows

    def ppl_between(self, start: int, end: int) -> float:
        """Perplexity over the predicted positions ``start <= i < end`` (clipped to the window)."""
        span = self.position_nll[max(start, 0) : min(end, len(self.position_nll))]
        if not span:
            raise ValueError(f"no predicted positions in [{start}, {end}) of a {self.seqlen}-token window")
        return math.exp(sum(span) / len(span))

    def as_dict(self) -> dict:
        out = {**asdict(self), "subset": self.subset}
        out.pop("position_nll")
        return out


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False) if _accepts_use_cache(model) else model(input_ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")


def not_a_causal_lm(model: nn.Module) -> str | None:
    """Why ``model`` does not predict the next token (a masked LM such as BERT), or None (a causal LM,
    or a module that does not say)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        return f"{type(model).__name__} is not a causal language model"
    return None


def perplexity_unsupported(model: nn.Module, seqlen: int) -> str | None:
    """Why next-token perplexity over ``seqlen``-token windows cannot be measured on ``model``, or
    None: not a causal LM, or windows longer than the model's position table (they fail deep inside
    its embedding)."""
    problem = not_a_causal_lm(model)
    if problem:
        return f"{problem} (next-token perplexity does not apply)"
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and seqlen > positions:
        return f"windows of {seqlen} tokens exceed {type(model).__name__}'s {positions} positions (use --seqlen {positions})"
    return None


@torch.no_grad()
def position_nll_sums(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token NLL summed over the batch's windows at each predicted position (fp32, on the
    CPU: ``seqlen - 1`` values), and the number of windows."""
    logits = logits_of(model, batch)
    shift = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(0).cpu(), targets.shape[0]


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, total_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` over token ``windows`` (``(count, seqlen)``), on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    position_sums = torch.zeros(max(windows.shape[1] - 1, 0), dtype=torch.float64)
    rows = 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch")
    try:
        for i in bar:
            batch = windows[i : i + batch_size].to(device)
            sums, n = position_nll_sums(model, batch)
            position_sums += sums.double()
            rows += n
            bar.set_postfix(ppl=f"{math.exp(float(position_sums.sum()) / (rows * position_sums.numel())):.3f}")
    finally:
        model.train(was_training)
    count = rows * position_sums.numel()
    nll = float(position_sums.sum()) / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, windows=int(windows.shape[0]),
                            total_windows=int(total_windows or windows.shape[0]), seqlen=int(windows.shape[1]),
                            tokens=count, seconds=time.perf_counter() - start,
                            position_nll=(position_sums / max(rows, 1)).tolist())
