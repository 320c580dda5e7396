"""FP8 (e4m3) x 2:4 against FP8 dense and bf16 dense, at prefill token counts (>= 4096) on LLaMA-7B layer
shapes: the lowered FP8 layer as users get it (torchao's CUTLASS 2:4 FP8 kernel where it imports, else
``torch._scaled_mm``; the activation quantization included), ``torch._scaled_mm`` on the dense FP8 weight
(activations quantized alike), and cuBLAS bf16 on the dense weight. Medians of interleaved CUDA-graph
replays; each output checked against the bf16 product.

    python -m benchmarks.fp8_table                     # writes benchmarks/results/fp8.json
    python -m benchmarks.fp8_table --accuracy          # + WikiText-2 ppl of SmolLM2 lowered in FP8 vs bf16
    python -m benchmarks.fp8_table --smoke             # tiny shapes on the CPU (the emulation): checks the script
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import results_path, time_variants, write_results
from benchmarks.decode_table import random_24
from sparseforge_compile.lowering import fp8
from sparseforge_compile.lowering.fp8_linear import Fp8Linear

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008),
          ("q+k+v fused", 12288, 4096), ("gate+up fused", 22016, 4096)]
SMOKE_SHAPES = [("tiny", 64, 128)]
TOKENS = [4096, 8192, 16384]


def fp8_dense(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, backend: str) -> torch.Tensor:
    """FP8 on the dense e4m3 weight, activations quantized per token as the lowered layer does."""
    return fp8.fp8_linear(x, w_q, None, w_scale, None, w_q.shape[0], backend)


def bench_shape(layer: str, out_f: int, in_f: int, tokens_list: list[int], device: str, repeats: int) -> list[dict]:
    dtype = torch.bfloat16
    w = random_24(out_f, in_f, device, dtype)
    lowered = Fp8Linear.from_dense(w, None, "2:4", layer=layer)
    w_q, w_scale = fp8.quantize_rows(w)
    dense_backend = "scaled-mm" if fp8.scaled_mm_available(w.device) else "emulated"
    held = lowered.weight_bytes()
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        fns = {"bf16": functools.partial(F.linear, x, w), "fp8_sparse": functools.partial(lowered, x),
               "fp8_dense": functools.partial(fp8_dense, x, w_q, w_scale, dense_backend)}
        ref = fns["bf16"]().float()
        errors = {name: float((fn().float() - ref).norm() / ref.norm()) for name, fn in fns.items() if name != "bf16"}
        ms = time_variants(fns, repeats)
        row = {"bench": "fp8", "model": "llama-7b" if not layer.startswith("tiny") else "smoke", "layer": layer,
               "shape": f"{out_f}x{in_f}", "tokens": tokens, "kernel": f"fp8 {lowered.backend}",
               "fp8_dense_kernel": f"fp8 {dense_backend}", "dense_ms": round(ms["bf16"], 5),
               "sparse_ms": round(ms["fp8_sparse"], 5), "speedup": round(ms["bf16"] / ms["fp8_sparse"], 4),
               "fp8_dense_ms": round(ms["fp8_dense"], 5),
               "fp8_dense_speedup": round(ms["bf16"] / ms["fp8_dense"], 4),
               "sparse_over_fp8_dense": round(ms["fp8_dense"] / ms["fp8_sparse"], 4),
               "memory_ratio": round((held["compressed"]) / held["dense_reference"], 4),
               "rel_err_vs_bf16": errors["fp8_sparse"], "fp8_dense_rel_err_vs_bf16": errors["fp8_dense"]}
        rows.append(row)
        print(f"{layer:14s} {out_f:>5d}x{in_f:<5d} tokens {tokens:>5d}: bf16 {row['dense_ms']:.4f} ms, FP8 2:4 "
              f"{row['sparse_ms']:.4f} ms ({row['speedup']:.2f}x, {row['kernel']}), FP8 dense {row['fp8_dense_ms']:.4f} "
              f"ms ({row['fp8_dense_speedup']:.2f}x), err {row['rel_err_vs_bf16']:.1e}", flush=True)
    return rows


def accuracy_rows(model_name: str, max_windows: int | None, seqlen: int) -> list[dict]:
    from sparseforge_compile.lowering.accuracy import wikitext2_fp8_vs_bf16
    from sparseforge_compile.models import load_model
    from sparseforge_compile.pipeline import SparsifyConfig, sparsify

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(model_name, device=device)
    sparsify(loaded.model, SparsifyConfig(method="magnitude"), progress=False)
    ppl = wikitext2_fp8_vs_bf16(loaded.model, loaded.tokenizer, seqlen=seqlen, max_windows=max_windows)
    return [{"bench": "accuracy", "config": f"{model_name} magnitude 2:4, lowered {layout}", "model": model_name,
             "method": "magnitude", "pattern": "2:4", "budget_s": 0, "layout": layout, "wikitext2_ppl": round(ppl[key], 4),
             "hardened_bf16_ppl": round(ppl["hardened"], 4), "fp8_over_bf16": round(ppl["fp8_over_bf16"], 5),
             "eval_windows": ppl["windows"]} for layout, key in (("bf16", "bf16"), ("fp8", "fp8"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--accuracy", action="store_true", help="also WikiText-2 ppl, FP8 vs bf16 (--model)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a temporary results file")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/fp8.json)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("fp8_table needs a CUDA GPU (FP8 tensor cores); --smoke checks it on the CPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, repeats = (SMOKE_SHAPES, 3) if args.smoke else (SHAPES, args.repeats)
    tokens = [64] if args.smoke else [int(t) for t in args.tokens.split(",")]
    out = results_path("fp8", args.out, args.smoke)
    rows = []
    for layer, out_f, in_f in shapes:
        rows += bench_shape(layer, out_f, in_f, tokens, device, repeats)
        write_results("fp8", rows, out, extra={"partial": True}, settings=vars(args))
    if args.accuracy:
        rows += accuracy_rows("tiny-llama" if args.smoke else args.model, 2 if args.smoke else args.max_windows,
                              64 if args.smoke else args.seqlen)
    path = write_results("fp8", rows, out, extra={"smoke": args.smoke, "torchao": fp8._torchao_ops() is not None}, settings=vars(args))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
