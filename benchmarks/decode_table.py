"""The 2:4 decode kernel (compressed weight only: kept values + 2-bit positions, 0.5625x the dense bf16
bytes) against cuBLAS bf16 on the dense weight, and cuSPARSELt where the GPU has it, at 1-64 tokens on
LLaMA-7B layer shapes and their fused q+k+v / gate+up shapes. Each shape's output is checked against
the fp32 product. Medians of interleaved CUDA-graph replays on a GPU.

    python -m benchmarks.decode_table                 # writes benchmarks/results/decode_kernels.json
    python -m benchmarks.decode_table --smoke         # tiny shapes on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import results_path, time_variants, write_results
from sparseforge_compile.lowering import decode_kernel as dk
from sparseforge_compile.lowering.dispatch import DECODE_TILES
from sparseforge_compile.masks import NMPattern, nm_mask

SHAPES = [  # (layer, out_features, in_features)
    ("q/k/v/o", 4096, 4096),
    ("gate/up", 11008, 4096),
    ("down", 4096, 11008),
    ("q+k+v fused", 12288, 4096),
    ("gate+up fused", 22016, 4096),
]
SMOKE_SHAPES = [("tiny", 64, 128), ("tiny fused", 192, 128)]
TOKENS = [1, 2, 4, 8, 16, 32, 64]


def random_24(out_f: int, in_f: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) * 0.02
    return w * nm_mask(w.abs(), NMPattern(2, 4))


def bench_shape(layer: str, out_f: int, in_f: int, tokens_list: list[int], device: str, dtype: torch.dtype,
                repeats: int) -> list[dict]:
    w = random_24(out_f, in_f, device, dtype)
    packed = dk.pack(w)
    cslt = None
    if device == "cuda":
        from sparseforge_compile.lowering.kernels import DEFAULT_CHOICE, compress, sparse_linear_2d

        cslt = functools.partial(sparse_linear_2d, packed=compress(w), bias=None, choice=DEFAULT_CHOICE)
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        ref = x.float() @ w.float().t()
        fns = {"dense": functools.partial(F.linear, x, w)}
        for n, k, split in DECODE_TILES:  # split 0: the kernel's own choice (auto_split)
            fns[f"decode {n}x{k}/s{split}"] = functools.partial(dk.decode_linear, x, packed, None,
                                                                dk.DecodeTiles(n, k, split_k=split))
        if cslt is not None:
            fns["cusparselt"] = functools.partial(cslt, x)
        errors = {name: float((fn().float() - ref).norm() / ref.norm()) for name, fn in fns.items()}
        ms = time_variants(fns, repeats)
        best = min((name for name in ms if name.startswith("decode")), key=ms.__getitem__)
        row = {"bench": "kernel", "model": "smoke" if layer.startswith("tiny") else "llama-7b", "layer": layer,
               "shape": f"{out_f}x{in_f}", "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
               "kernel": f"decode (2:4 compressed only, tiles {best.split()[1]})",
               "dense_ms": round(ms["dense"], 5), "sparse_ms": round(ms[best], 5),
               "speedup": round(ms["dense"] / ms[best], 4),
               "decode_tiles_ms": {name.split()[1]: round(v, 5) for name, v in ms.items() if name.startswith("decode")},
               "cusparselt_ms": round(ms["cusparselt"], 5) if "cusparselt" in ms else None,
               "cusparselt_speedup": round(ms["dense"] / ms["cusparselt"], 4) if "cusparselt" in ms else None,
               "memory_ratio": round(packed.nbytes() / (w.numel() * w.element_size()), 4),
               "rel_err_vs_fp32": max(errors[n] for n in errors if n.startswith("decode")),
               "triton": dk.triton_available(x.device)}
        rows.append(row)
        print(f"{layer:14s} {out_f:>5d}x{in_f:<5d} tokens {tokens:>3d}: dense {row['dense_ms']:.4f} ms, decode "
              f"{row['sparse_ms']:.4f} ms ({row['speedup']:.2f}x, {best}), cuSPARSELt {row['cusparselt_ms']}, "
              f"err {row['rel_err_vs_fp32']:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few repeats, a temporary results file")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/decode_kernels.json)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("decode_table needs a CUDA GPU; --smoke checks it on the CPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes, repeats = (SMOKE_SHAPES, 3) if args.smoke else (SHAPES, args.repeats)
    tokens = [int(t) for t in args.tokens.split(",")][: 3 if args.smoke else None]
    out = results_path("decode_kernels", args.out, args.smoke)
    rows = []
    for layer, out_f, in_f in shapes:
        rows += bench_shape(layer, out_f, in_f, tokens, device, dtype, repeats)
        write_results("decode_kernels", rows, out, extra={"partial": True}, settings=vars(args))
    path = write_results("decode_kernels", rows, out, extra={"smoke": args.smoke}, settings=vars(args))
    print(f"\nwrote {path}; decode speedup over cuBLAS: min {min(r['speedup'] for r in rows):.3f}x, "
          f"max {max(r['speedup'] for r in rows):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
