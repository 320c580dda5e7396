"""Sparse checkpoint sizes and round trips on a real model, plus greedy-generation identity.

    python -m benchmarks.checkpoint_size [--model smollm2-135m] [--dtypes fp32,bf16] [--tokens 32]

The model is hardened to 2:4 by weight magnitude (every Linear but the tied lm_head; the sizes do not
depend on how the mask was chosen), then for each dtype saved in both formats. Rows (kind "size"):
the pruned layers' bytes stored dense vs compact (values + packed positions), each format's weight
file, whether loading it back gives bit-identical weights and identical logits (lowered, CPU).
Row kind "greedy": ``--tokens`` greedy tokens of the hardened model vs the lowered model loaded from
the compact file, on the CPU. Writes ``benchmarks/results/checkpoint_size.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from benchmarks.common import write_results
from sparseforge_compile import checkpoint
from sparseforge_compile.masks import NMPattern, nm_mask
from sparseforge_compile.models import DTYPES, load_model

PROMPT = "The capital of France is"


def harden_by_magnitude(model: nn.Module, pattern: NMPattern) -> int:
    layers = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.masked_fill_(~nm_mask(module.weight.abs(), pattern), 0.0)
                layers[name] = {"pattern": str(pattern), "transposed": False, "method": "magnitude"}
    model._sparseforge_layers = layers
    return len(layers)


def same_bits(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k].contiguous().reshape(-1).view(torch.uint8), sb[k].contiguous().reshape(-1).view(torch.uint8))
        for k in sa)


def size_rows(model: nn.Module, tokenizer, name: str, dtype: str, folder: Path, input_ids: torch.Tensor) -> list[dict]:
    start = time.perf_counter()
    report = checkpoint.save(model, folder, tokenizer=tokenizer, provenance={"method": "magnitude", "source_model": name})
    save_s = time.perf_counter() - start
    with torch.no_grad():
        reference = model(input_ids).logits
    rows = []
    for fmt in ("compact", "hf"):
        start = time.perf_counter()
        dense = checkpoint.load(folder, format=fmt, lower=False).model
        load_s = time.perf_counter() - start
        lowered = checkpoint.load(folder, format=fmt).model
        with torch.no_grad():
            logits_dense, logits_lowered = dense(input_ids).logits, lowered(input_ids).logits
        compact = fmt == "compact"
        rows.append({
            "kind": "size", "model": name, "format": fmt, "dtype": dtype, "layers": report.layers,
            "pruned_bytes": report.pruned_compact_bytes if compact else report.pruned_dense_bytes,
            "dense_bytes": report.pruned_dense_bytes,
            "ratio": round(report.pruned_ratio, 6) if compact else 1.0,
            "file_bytes": report.format_bytes[fmt],
            "bit_identical": same_bits(model, dense),
            "logits_identical": bool(torch.equal(reference, logits_dense)),
            "lowered_logits_identical": bool(torch.equal(reference, logits_lowered)),
            "save_s": round(save_s, 2), "load_s": round(load_s, 2),
        })
    return rows


def greedy_row(model: nn.Module, tokenizer, name: str, folder: Path, input_ids: torch.Tensor, tokens: int) -> dict:
    lowered = checkpoint.load(folder, format="compact").model
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        start = time.perf_counter()
        hardened_out = model.generate(input_ids, **kwargs)
        hardened_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered_out = lowered.generate(input_ids, **kwargs)
        lowered_s = time.perf_counter() - start
    new = hardened_out[0, input_ids.shape[1]:]
    return {"kind": "greedy", "model": name, "format": "compact", "dtype": "fp32", "device": "cpu",
            "prompt": PROMPT, "new_tokens": int(new.numel()),
            "identical": bool(torch.equal(hardened_out, lowered_out)),
            "sparse_layers": sum(type(m).__name__ == "SparseLinear" for m in lowered.modules()),
            "hardened_tok_s": round(new.numel() / hardened_s, 2), "lowered_tok_s": round(new.numel() / lowered_s, 2),
            "text": tokenizer.decode(new, skip_special_tokens=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/checkpoint_size.json)")
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", dtype="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    harden_by_magnitude(model, NMPattern(2, 4))
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            cast = model if dtype == "fp32" else copy.deepcopy(model).to(DTYPES[dtype])  # deepcopy keeps the tie
            rows += size_rows(cast, tokenizer, args.model, dtype, Path(tmp) / dtype, input_ids)
            if dtype == "fp32":
                rows.append(greedy_row(cast, tokenizer, args.model, Path(tmp) / dtype, input_ids, args.tokens))
            del cast
    print(tabulate([{k: v for k, v in r.items() if k != "text"} for r in rows if r["kind"] == "size"],
                   headers="keys", tablefmt="simple"))
    for row in rows:
        if row["kind"] == "greedy":
            print(f"greedy {row['new_tokens']} tokens, hardened vs lowered (CPU, fp32): "
                  f"{'IDENTICAL' if row['identical'] else 'DIFFERENT'}; text: {row['text']!r}")
    path = write_results("checkpoint_size", rows, out=args.out, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
