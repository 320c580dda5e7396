"""Greedy generation tokens/s, dense against lowered, through the static-cache serving loop
(:mod:`sparseforge_compile.serving`: the decode step compiled with CUDA graphs on a GPU), for SmolLM2-135M
(magnitude 2:4) and the LLaMA-7B-shaped stack of ``e2e.py`` (random 2:4 weights). Each model generates
``--repeats`` times after a warm-up run (which compiles); rows hold the medians of prefill and decode
time per token, and the lowered layers' weight bytes over dense (``memory_ratio``). Also checks that the
lowered model's tokens equal the dense model's (exact on the CPU; bf16 kernels may diverge on a GPU).

    python -m benchmarks.generate                          # writes benchmarks/results/generate.json
    python -m benchmarks.generate --smoke                  # tiny-llama on the CPU, a temporary results file
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from benchmarks.common import results_path, write_results
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.serving import Generator


def build(name: str, device: str, dtype: torch.dtype):
    """A hardened model by name: "smollm2-135m", "llama-7b-shaped" (4 layers) or a tiny model."""
    if name == "llama-7b-shaped":
        from benchmarks.e2e import build_model

        return build_model(4, device, dtype, tiny=False)
    from sparseforge_compile.models import load_model
    from sparseforge_compile.pipeline import SparsifyConfig, sparsify

    model = load_model(name, device=device).model
    sparsify(model, SparsifyConfig(method="magnitude"), progress=False)
    return model.to(dtype).eval()


def timed_runs(model, ids: torch.Tensor, new_tokens: int, repeats: int, compile_step: bool | None):
    gen = Generator(model, ids.shape[1] + new_tokens, compile=compile_step)
    first = gen.generate(ids, new_tokens, eos_token_id=[])  # compiles; no end token: every run is as long
    runs = [gen.generate(ids, new_tokens, eos_token_id=[]) for _ in range(repeats)]
    return first, runs


def per_token_ms(runs: list, phase: str) -> float:
    """Median milliseconds per generated (decode) or prompt (prefill) token over the whole batch."""
    if phase == "prefill":
        return statistics.median(1e3 * r.prefill_s / (r.batch * r.prompt_tokens) for r in runs)
    return statistics.median(1e3 * r.decode_s / (r.batch * (r.new_tokens - 1)) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,llama-7b-shaped")
    parser.add_argument("--layouts", default="cusparselt,compact", help="DispatchConfig.layout of each lowered copy")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--smoke", action="store_true", help="tiny-llama on the CPU, a temporary results file")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/generate.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.prompt, args.new_tokens, args.repeats = "tiny-llama", "1,2", 8, 6, 2
    elif not torch.cuda.is_available():
        sys.exit("generate.py needs a CUDA GPU; --smoke checks it on the CPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_step = {"auto": None, "on": True, "off": False}[args.compile]
    out = results_path("generate", args.out, args.smoke)
    rows = []
    for name in args.models.split(","):
        dense = build(name, device, dtype)
        vocab = dense.config.vocab_size
        models = {"dense": dense}
        reports = {}
        for layout in args.layouts.split(","):
            models[layout] = copy.deepcopy(dense)
            reports[layout] = lower_model(models[layout], config=DispatchConfig(layout=layout))
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch)).to(device)
            results = {key: timed_runs(m, ids, args.new_tokens, args.repeats, compile_step) for key, m in models.items()}
            want = results["dense"][1][0].sequences
            for layout, report in reports.items():
                for phase in ("prefill", "decode"):
                    dense_ms, sparse_ms = (per_token_ms(results[key][1], phase) for key in ("dense", layout))
                    got = results[layout][1][0].sequences
                    rows.append({"bench": "generate", "config": f"{name} lowered {layout}", "model": name,
                                 "layout": layout, "phase": phase, "batch": batch,
                                 "seq": args.prompt if phase == "prefill" else args.new_tokens,
                                 "dense_ms": round(dense_ms, 5), "sparse_ms": round(sparse_ms, 5),
                                 "speedup": round(dense_ms / sparse_ms, 4), "unit": "ms per token",
                                 "dense_tokens_per_s": round(1e3 / dense_ms, 1),
                                 "sparse_tokens_per_s": round(1e3 / sparse_ms, 1),
                                 "memory_ratio": round(report.memory_ratio, 4),
                                 "kernels": sorted({layer.kernel for layer in report.layers}),
                                 "compiled": results[layout][0].compiled,
                                 "tokens_equal_dense": bool(torch.equal(got, want)),
                                 "first_run_s": round(results[layout][0].prefill_s + results[layout][0].decode_s, 2)})
                    print(rows[-1], flush=True)
            write_results("generate", rows, out, extra={"partial": True}, settings=vars(args))
        del models, dense
        if device == "cuda":
            torch.cuda.empty_cache()
    path = write_results("generate", rows, out, extra={"smoke": args.smoke}, settings=vars(args))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
