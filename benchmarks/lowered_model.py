"""A real model, hardened then lowered: same logits, same perplexity, memory and speed side by side.

    python -m benchmarks.lowered_model --model smollm2-135m --max-windows 40

Prunes with magnitude 2:4 (the mask does not matter here, only that it is exact N:M), casts to bf16,
and compares the hardened model (dense kernels on zeroed weights) with two lowered copies, one with the
measured dispatch and one with every layer on cuSPARSELt (``keep_dense="never"``; the dense fallback on
the CPU): logits relative error on one window, WikiText-2 perplexity on the same windows, weight bytes
of the lowered layers, and medians of prefill (CUDA events) and greedy decode, timed round by round.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import interleaved_median_ms, write_results
from sparseforge_compile.data import eval_windows, load_wikitext2, tokenize
from sparseforge_compile.evaluate import logits_of, perplexity
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.models import load_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=device)
    hardened, tok = loaded.model, loaded.tokenizer
    sparsify(hardened, SparsifyConfig(method="magnitude"), progress=False)
    hardened = hardened.to(torch.bfloat16).eval()
    # measured dispatch (the default), and every layer on the sparse kernel: the latter checks the kernel's
    # accuracy on a real model even where the dispatch keeps cuBLAS (SmolLM2's layers are too narrow to win)
    lowered = {"dispatch": copy.deepcopy(hardened), "sparse_only": copy.deepcopy(hardened)}
    reports = {"dispatch": lower_model(lowered["dispatch"]),
               "sparse_only": lower_model(lowered["sparse_only"], config=DispatchConfig(keep_dense="never"))}
    all_windows = eval_windows(tokenize(tok, load_wikitext2("test")), args.seqlen)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    models = {"hardened": hardened, **lowered}
    with torch.no_grad():
        ids = windows[:1].to(device)
        want = logits_of(hardened, ids).float()
        rel_err = {name: float((logits_of(m, ids).float() - want).norm() / want.norm()) for name, m in lowered.items()}
        ppl = {name: perplexity(m, windows, total_windows=all_windows.shape[0], progress=False).ppl
               for name, m in models.items()}
        batch = windows[: args.prefill_batch].to(device)
        prompt = windows[:1, :32].to(device)
        prefill = interleaved_median_ms({name: (lambda m=m: logits_of(m, batch)) for name, m in models.items()},
                                        args.repeats)
        decode = interleaved_median_ms(
            {name: (lambda m=m: m.generate(prompt, max_new_tokens=args.decode_tokens,
                                           min_new_tokens=args.decode_tokens, do_sample=False,
                                           pad_token_id=tok.eos_token_id))
             for name, m in models.items()}, max(args.repeats // 2, 3))
    rows = []
    for name, report in reports.items():
        config = (f"{args.model} bf16, {name}: {report.sparse_layers} cuSPARSELt + {report.fallback_layers} fallback "
                  f"+ {report.dense_faster_layers} left dense (cuBLAS faster at every bucket) layers")
        rows += [
            {"bench": "accuracy", "config": config, "model": args.model, "method": "magnitude", "pattern": "2:4",
             "budget_s": 0, "hardened_ppl": round(ppl["hardened"], 4), "lowered_ppl": round(ppl[name], 4),
             "wikitext2_ppl": round(ppl[name], 4), "ppl_rel_diff": round(ppl[name] / ppl["hardened"] - 1, 6),
             "logits_rel_err": round(rel_err[name], 6), "eval_windows": int(windows.shape[0])},
            {"bench": "memory", "config": config, "held_bytes": report.held_bytes, "dense_bytes": report.dense_bytes,
             "ratio": round(report.memory_ratio, 4)},
            {"bench": "e2e", "config": config, "phase": "prefill", "batch": args.prefill_batch, "seq": args.seqlen,
             "dense_ms": round(prefill["hardened"], 3), "sparse_ms": round(prefill[name], 3),
             "speedup": round(prefill["hardened"] / prefill[name], 4)},
            {"bench": "e2e", "config": config + ", greedy generate()", "phase": "decode", "batch": 1,
             "seq": args.decode_tokens, "dense_ms": round(decode["hardened"], 3), "sparse_ms": round(decode[name], 3),
             "speedup": round(decode["hardened"] / decode[name], 4)},
        ]
    write_results(f"lowered_{Path(args.model).name}", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
