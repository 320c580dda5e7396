"""Host overhead of a training step, measurable on a CPU: SmolLM2's depth and layer count, tiny width.

A 30-layer LLaMA with hidden 64 (210 Linears, like SmolLM2-135M) at 2 x 32 tokens: its kernels are
so small that a step's wall time is mostly dispatch, Python and launch overhead, the part that makes
the compiled steps host-bound on an H200 (benchmarks/results/profile/: about half of a SmolLM2 step
is kernel time). Times plain KD and SparseForge soft-phase steps (same loss, layer-wise term on),
eager and compiled, flat and regional.

    python -m benchmarks.host_overhead          # writes benchmarks/results/host_overhead_cpu.json

Also SparseForge's hard-phase step (``anneal_final_ms``).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

from benchmarks.common import interleaved_median_ms, write_results
from benchmarks.step_time import build
from sparseforge_compile.data import calibration_windows
from sparseforge_compile.models import load_model


def deep_narrow_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.name_or_path = "tiny-deep"  # step_time.build: no kernel-shape rules for tiny layers
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--configs", default="off/off,on/off,on/regional", help="compile/outline pairs")
    p.add_argument("--hidden-weights", default="3", help="comma list: layer-wise distillation weights")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    base = deep_narrow_llama(args.layers)
    tok = load_model("tiny-llama").tokenizer
    calib = calibration_windows(tok, 4, 64, seed=0)
    rows = []
    for pair in args.configs.split(","):
        compile, outline = pair.split("/")
        weights = [float(w) for w in args.hidden_weights.split(",")]
        # Every loop of this setting timed round by round (interleaved), so drift lands on all alike.
        loops = {}
        for hidden_weight in weights:
            for fixed in (True, False):
                loops[hidden_weight, fixed] = build(base, tok, calib, 2, 32, fixed=fixed, hidden_weight=hidden_weight,
                                                    compile=compile, outline=outline)[1]
            final = build(base, tok, calib, 2, 32, fixed=False, hidden_weight=hidden_weight, compile=compile,
                          outline=outline)[1]
            final.step = int(0.6 * final.total_steps)  # SparseForge's hard phase (the plain model where regional)
            loops[hidden_weight, "final"] = final
        times = interleaved_median_ms({key: loop.train_step for key, loop in loops.items()}, args.repeats, warmup=3)
        for hidden_weight in weights:
            kd, soft = times[hidden_weight, True], times[hidden_weight, False]
            rows.append({"bench": "host_overhead", "config": f"llama {args.layers}x64 b2x32 hidden_weight={hidden_weight:g} "
                         f"compile={compile} outline={outline}", "batch": 2, "seq": 32,
                         "plain_kd_ms": round(kd, 2), "anneal_soft_ms": round(soft, 2),
                         "soft_over_kd": round(soft / kd, 3), "anneal_final_ms": round(times[hidden_weight, "final"], 2)})
            print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    write_results("host_overhead_cpu", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
