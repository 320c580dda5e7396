"""Annealing settings on a sharpened tiny LLaMA, CPU, seconds per run: held-out KL against the fixed-mask peer.

    python benchmarks/anneal_tiny.py --seeds 1,2 --steps 60
    python benchmarks/anneal_tiny.py --methods 'sparsegpt+kd[hidden_weight=0],sparseforge[hidden_weight=0]'

The tiny model's matrices are scaled up 8x so that 2:4 pruning costs ~1 nat of KL and masks matter
(random-init logits are near-uniform otherwise). Every run starts from the same SparseGPT warm start,
trains ``--steps`` steps with layer-wise distillation (hidden_weight 3 unless a method's brackets say
otherwise, as in ``accuracy.py``) on C4 windows, and is scored by
KL to the dense model on 16 C4 windows the training never sampled. This is where the defaults of the
annealing margin and the evidence ramp were chosen; GPU figures (SmolLM2) come from accuracy.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import anneal_overrides, method_of, spec_overrides, split_methods
from common import write_results

from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.data import calibration_windows
from sparseforge_compile.distill import kd_loss
from sparseforge_compile.evaluate import logits_of
from sparseforge_compile.models import ByteTokenizer, load_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify

# Where the annealing margin and the evidence ramp were chosen (the default --methods).
MARGIN_SWEEP = ("sparsegpt+kd,sparseforge[prior_margin=3,evidence_probes=1],sparseforge[prior_margin=3],"
                "sparseforge[prior_margin=4.5],sparseforge[prior_margin=6],sparseforge[prior_margin=10]")


def sharpened_tiny_llama(scale: float = 8.0):
    loaded = load_model("tiny-llama")
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--methods", default=MARGIN_SWEEP,
                   help="method specs, AnnealConfig fields in brackets: sparseforge[prior_margin=3]")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    teacher = sharpened_tiny_llama().model
    heldout = calibration_windows(ByteTokenizer(), 16, 64, seed=99)
    with torch.no_grad():
        t_logits = logits_of(teacher, heldout)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for spec in split_methods(args.methods):
            method, settings = method_of(spec), anneal_overrides(spec_overrides(spec))
            loaded = sharpened_tiny_llama()
            acfg = AnnealConfig(steps=args.steps, batch_size=4, seqlen=64, lr=3e-3, teacher_data_ratio=0.0,
                                warm_start="sparsegpt", seed=seed, **{"hidden_weight": 3.0, **settings})
            cfg = SparsifyConfig(method=method, kernel_constraints=None, calib_samples=4, calib_seqlen=64,
                                 budget_s=None, anneal=acfg)
            result = sparsify(loaded.model, cfg, tokenizer=loaded.tokenizer, progress=False)
            with torch.no_grad():
                kl = float(kd_loss(logits_of(loaded.model, heldout), t_logits, heldout, ce_weight=0.0)[0])
            rows.append({"model": "tiny-llama x8", "method": method, "pattern": "2:4",
                         "settings": ",".join(f"{k}={v}" for k, v in settings.items()), "seed": seed,
                         "kl_weight": acfg.kl_weight, "hidden_weight": acfg.hidden_weight,
                         "steps": args.steps, "heldout_kl": round(kl, 4),
                         "flips_vs_warm_start": result.anneal.flips_vs_warm_start,
                         "wikitext2_ppl": None, "budget_s": None})
            print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    write_results("anneal_tiny", rows, out=args.out)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
