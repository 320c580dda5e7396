"""GEMM benchmark: y = x W^T with W 2:4, LLaMA-7B and -70B layer shapes, bf16, on one GPU.

Compares dense cuBLAS (``F.linear`` on the masked weight) with the lowered layer as users get it
(``SparseLinear``: cuSPARSELt with the measured algorithm, or dense where dispatch chose dense) and
with the best sparse kernel forced (no dispatch). Times are medians of CUDA-graph replays, the
variants' replays interleaved (so clock drift does not enter their ratio), with the inputs (and, for
weights that fit in L2, the weights) rotated among copies; dense is timed twice, and the two timings'
ratio (``dense_vs_dense_again``) shows the harness's own noise at each size. Also checks each shape's
output against the dense result and reports the weight bytes of the compressed form.

    python -m benchmarks.kernel_table            # writes benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_results
from sparseforge_compile.lowering.dispatch import (
    DispatchConfig,
    algorithm_cache,
    graph_times_ms,
    rotation_copies,
    shape_key,
)
from sparseforge_compile.lowering.kernels import _cslt_linear_2d, device_name
from sparseforge_compile.lowering.sparse_linear import SparseLinear
from sparseforge_compile.masks import NMPattern, nm_mask

# (model, layer, out_features, in_features)
SHAPES = [
    ("llama-7b", "q/k/v/o", 4096, 4096),
    ("llama-7b", "gate/up", 11008, 4096),
    ("llama-7b", "down", 4096, 11008),
    ("llama-70b", "q/o", 8192, 8192),
    ("llama-70b", "k/v", 1024, 8192),
    ("llama-70b", "gate/up", 28672, 8192),
    ("llama-70b", "down", 8192, 28672),
    # what torch.compile(backend="sparseforge") runs after fusing sibling Linears that read one input
    ("llama-7b", "q+k+v fused", 12288, 4096),
    ("llama-7b", "gate+up fused", 22016, 4096),
    ("llama-70b", "q+k+v fused", 10240, 8192),
    ("llama-70b", "gate+up fused", 57344, 8192),
]
TOKENS = [1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384]


def random_24(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    return w * nm_mask(w.abs(), NMPattern(2, 4))


def bench_shape(model: str, layer: str, out_f: int, in_f: int, tokens_list: list[int],
                config: DispatchConfig) -> list[dict]:
    w = random_24(out_f, in_f, seed=out_f * 7 + in_f)
    start = time.perf_counter()
    lowered = SparseLinear.from_dense(w, None, "2:4", layer=f"{model}.{layer}", config=config)
    calib_s = time.perf_counter() - start
    n_w = rotation_copies(w.numel() * w.element_size(), w.device)
    weights = [w] + [w.clone() for _ in range(n_w - 1)]
    # Same calibration (cache hit), separate compressed copies for rotation.
    layers = [lowered] + [SparseLinear.from_dense(wc, None, "2:4", config=config) for wc in weights[1:]]
    held = lowered.weight_bytes()
    skey = shape_key(device_name(w.device), out_f, in_f, w.dtype)
    rows = [{"bench": "memory", "model": model, "layer": layer, "shape": f"{out_f}x{in_f}",
             "dense_bytes": held["dense_reference"], "compressed_bytes": held["compressed"],
             "ratio": held["compressed"] / held["dense_reference"],
             "dense_copy_kept_for_dispatch": held["dense_copy"] > 0, "calibration_s": round(calib_s, 2)}]
    for tokens in tokens_list:
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        n_x = rotation_copies(tokens * in_f * 2, w.device)
        n = max(n_x, n_w)
        xs = [torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n_x)]
        with torch.no_grad():
            rel_err = None
            if tokens <= 4096:  # fp32 reference (no TF32)
                ref = F.linear(xs[0].float(), w.float())
                rel_err = float((lowered(xs[0]).float() - ref).norm() / ref.norm())
            choice = algorithm_cache().lookup(skey, tokens)
            # Interleaved replays: dense, ours (dispatch included), the chosen sparse kernel forced, and
            # dense again: the two dense timings' ratio is the harness's own noise at this size (the
            # same cuSPARSELt kernel timed twice differed by 5 % at ~70 us a call).
            dense = [functools.partial(F.linear, xs[i % n_x], weights[i % n_w]) for i in range(n)]
            dense_ms, sparse_ms, forced_ms, dense_again_ms = graph_times_ms([
                dense,
                [functools.partial(layers[i % n_w], xs[i % n_x]) for i in range(n)],
                [functools.partial(_cslt_linear_2d, xs[i % n_x], layers[i % n_w].packed, None, choice)
                 for i in range(n)],
                dense,
            ], replays=31)  # 11 left a 0.92x between two identical cuBLAS calls (8192x8192, 256 tokens)
        kernel = "dense (dispatch)" if choice.use_dense and lowered.dense_weight is not None else (
            f"cusparselt alg {choice.alg_id} split_k {choice.split_k}")
        rows.append({"bench": "kernel", "model": model, "layer": layer, "shape": f"{out_f}x{in_f}",
                     "tokens": tokens, "dtype": "bf16", "dense_ms": round(dense_ms, 5),
                     "sparse_ms": round(sparse_ms, 5), "speedup": round(dense_ms / sparse_ms, 4),
                     "kernel": kernel, "sparse_kernel_only_ms": round(forced_ms, 5),
                     "sparse_kernel_only_speedup": round(dense_ms / forced_ms, 4),
                     "dense_vs_dense_again": round(dense_ms / dense_again_ms, 4),
                     # what dispatch's own timing of its chosen config said (for buckets it measured)
                     "dispatch_measured_speedup": round(choice.speedup, 4) if choice.speedup else None,
                     "rel_err_vs_fp64": rel_err})
        print(f"{model:9s} {layer:8s} {out_f:>5d}x{in_f:<5d} tokens {tokens:>5d}: dense {dense_ms:.4f} ms, "
              f"ours {sparse_ms:.4f} ms ({dense_ms / sparse_ms:.2f}x, {kernel}), sparse only {forced_ms:.4f} ms, "
              f"dense/dense again {dense_ms / dense_again_ms:.3f}, err {rel_err}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts (comma separated)")
    parser.add_argument("--models", default="llama-7b,llama-70b")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused sibling shapes (q+k+v, gate+up)")
    parser.add_argument("--max-bucket", type=int, default=16384, help="largest token bucket measured")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/kernels.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_table needs a CUDA GPU (cuSPARSELt); the CPU path is covered by the tests")
    tokens = [int(t) for t in args.tokens.split(",")]
    models = args.models.split(",")
    config = DispatchConfig(max_bucket=args.max_bucket)
    rows = []
    for model, layer, out_f, in_f in SHAPES:
        if model in models and not (args.no_fused and "fused" in layer):
            rows += bench_shape(model, layer, out_f, in_f, tokens, config)
            torch.cuda.empty_cache()
            write_results("kernels", rows, args.out, extra={"partial": True}, settings=vars(args))  # survives a cut-short run
    path = write_results("kernels", rows, args.out, extra={"cusparselt": torch.backends.cusparselt.version()}, settings=vars(args))
    kernel_rows = [r for r in rows if r["bench"] == "kernel"]
    big = [r["speedup"] for r in kernel_rows if r["tokens"] >= 4096]
    print(f"\nwrote {path}\nmin speedup at >= 4096 tokens: {min(big):.3f}x; min over all token counts: "
          f"{min(r['speedup'] for r in kernel_rows):.3f}x; compressed/dense bytes: "
          f"{max(r['ratio'] for r in rows if r['bench'] == 'memory'):.4f}")


if __name__ == "__main__":
    main()
