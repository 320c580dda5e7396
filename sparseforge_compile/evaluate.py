"""Perplexity by the standard protocol: exp(mean next-token NLL) over non-overlapping windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

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

    @property
    def subset(self) -> bool:
        return self.windows < self.total_windows

    def as_dict(self) -> dict:
        return {**asdict(self), "subset": self.subset}


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False) if _accepts_use_cache(model) else model(input_ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")


@torch.no_grad()
def token_nll_sum(model: nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLLs over a batch of windows (upcast to fp32), and the count."""
    logits = logits_of(model, batch)
    shift = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, total_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` over token ``windows`` (``(count, seqlen)``), on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch")
    try:
        for i in bar:
            batch = windows[i : i + batch_size].to(device)
            s, c = token_nll_sum(model, batch)
            nll_sum, count = nll_sum + s, count + c
            bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    finally:
        model.train(was_training)
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, windows=int(windows.shape[0]),
                            total_windows=int(total_windows or windows.shape[0]), seqlen=int(windows.shape[1]),
                            tokens=count, seconds=time.perf_counter() - start)
