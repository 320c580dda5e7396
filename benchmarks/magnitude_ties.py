"""How much magnitude 2:4 depends on tie-breaking in a quantized model.

    python -m benchmarks.magnitude_ties --model smollm2-135m --max-windows 3

SmolLM2 ships as Q4_1 GGUF: 16 levels per block of 32 weights, so |w| often ties inside a group of
four. This counts groups whose 2nd and 3rd largest |w| tie (the keep/prune cut) and scores magnitude
2:4 under three tie rules: keep the lower index (our deterministic rule), keep the higher index, and
``torch.topk(|w|, 2, largest=False)`` on the pruned side (the Wanda reference code's call).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

from benchmarks.common import write_results
from sparseforge_compile.data import eval_windows, load_wikitext2, tokenize
from sparseforge_compile.evaluate import perplexity
from sparseforge_compile.layers import default_prune_layers
from sparseforge_compile.models import load_model

RULES = ("keep-lower-index", "keep-higher-index", "topk-prune-smallest")


def keep_mask(weight: torch.Tensor, rule: str) -> torch.Tensor:
    groups = weight.abs().reshape(-1, 4)
    if rule == "keep-lower-index":
        idx = groups.sort(dim=-1, descending=True, stable=True).indices[:, :2]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    elif rule == "keep-higher-index":
        idx = groups.flip(-1).sort(dim=-1, descending=True, stable=True).indices[:, :2]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, 3 - idx, True)
    else:
        idx = torch.topk(groups, 2, dim=1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, idx, False)
    return keep.reshape(weight.shape)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=device)
    model, tok = loaded.model, loaded.tokenizer
    all_windows = eval_windows(tokenize(tok, load_wikitext2("test")), 2048)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    layers = default_prune_layers(model)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
    ties = total = 0
    for w in dense.values():
        top = w.abs().reshape(-1, 4).sort(dim=-1, descending=True).values
        ties += int((top[:, 1] == top[:, 2]).sum())
        total += top.shape[0]
    rows = []
    for rule in RULES:
        with torch.no_grad():
            for n in layers:
                model.get_submodule(n).weight.copy_(dense[n] * keep_mask(dense[n], rule))
        ppl = perplexity(model, windows, total_windows=all_windows.shape[0], progress=False)
        rows.append({"model": args.model, "method": "magnitude", "pattern": "2:4", "tie_rule": rule,
                     "wikitext2_ppl": round(ppl.ppl, 2), "eval_windows": ppl.windows, "budget_s": 0,
                     "groups": total, "groups_tied_at_cut": ties, "tied_fraction": round(ties / total, 4)})
        print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    write_results("magnitude_ties", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
