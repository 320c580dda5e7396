"""What lowering costs in accuracy: perplexity of copies of one hardened model lowered with each
``DispatchConfig.layout``, e.g. FP8 (e4m3) against bf16 on WikiText-2."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data import eval_windows, load_wikitext2, tokenize
from ..evaluate import perplexity
from .dispatch import DispatchConfig
from .lower import lower_model


def lowered_ppl(model: nn.Module, windows: torch.Tensor, layouts: Sequence[str] = ("cusparselt", "fp8"),
                dtype: torch.dtype = torch.bfloat16, total_windows: int | None = None,
                dispatch: DispatchConfig | None = None) -> dict[str, float]:
    """Perplexity over ``windows`` of the hardened ``model`` (``"hardened"``, in ``dtype``) and of a copy
    lowered with each of ``layouts``; the model itself is left as it was."""
    base = dispatch or DispatchConfig()
    reference = copy.deepcopy(model).to(dtype).eval()
    out = {"hardened": perplexity(reference, windows, total_windows=total_windows, progress=False).ppl}
    for layout in layouts:
        lowered = copy.deepcopy(reference)
        lower_model(lowered, config=dataclasses.replace(base, layout=layout))
        with torch.no_grad():
            out[layout] = perplexity(lowered, windows, total_windows=total_windows, progress=False).ppl
        del lowered
    return out


def wikitext2_fp8_vs_bf16(model: nn.Module, tokenizer, seqlen: int = 2048, max_windows: int | None = None,
                          data_dir: str | Path | None = None, split: str = "test") -> dict[str, float | int]:
    """WikiText-2 ``split`` perplexity of a hardened model lowered in bf16 and in FP8, and the FP8 cost:
    ``{"hardened", "bf16", "fp8", "fp8_over_bf16", "windows"}``."""
    all_windows = eval_windows(tokenize(tokenizer, load_wikitext2(split, data_dir)), seqlen)
    windows = all_windows[:max_windows] if max_windows else all_windows
    ppl = lowered_ppl(model, windows, ("cusparselt", "fp8"), total_windows=int(all_windows.shape[0]))
    return {"hardened": ppl["hardened"], "bf16": ppl["cusparselt"], "fp8": ppl["fp8"],
            "fp8_over_bf16": ppl["fp8"] / ppl["cusparselt"], "windows": int(windows.shape[0])}
