"""Annealing settings on a small proxy, CPU, seconds to minutes per run: held-out KL against the fixed-mask peer.

    python -m benchmarks.anneal_tiny --seeds 1,2 --steps 60
    python -m benchmarks.anneal_tiny --methods 'sparsegpt+kd[hidden_weight=0],sparseforge[hidden_weight=0]'
    python -m benchmarks.anneal_tiny --model smollm2-135m --layers 4 --seeds 1 --steps 120 --methods ...

Two proxies. ``tiny-llama-x8`` (default, ~10 s a run):
The tiny model's matrices are scaled up 8x so that 2:4 pruning costs ~1 nat of KL and masks matter
(random-init logits are near-uniform otherwise). Every run starts from the same SparseGPT warm start,
trains ``--steps`` steps with layer-wise distillation (hidden_weight 3 unless a method's brackets say
otherwise, as in ``accuracy.py``) on C4 windows, and is scored by
KL to the dense model on 16 C4 windows the training never sampled. This is where the defaults of the
annealing margin and the evidence ramp were chosen. ``smollm2-135m --layers 4`` (~1.5 s a step, the
vocabulary-sized head dominates): the real model cut to its first blocks, real weights for the questions a
random model cannot answer (does a mask change help where SparseGPT's mask has real structure to miss),
SparseGPT on 16 x 512 windows, training on 4 x 128, held-out KL on 16 x 128. GPU figures (the whole
SmolLM2) come from accuracy.py. ``--valid-windows N`` also scores WikiText-2 valid perplexity; each row carries
seconds per step on the masked graph and on the plain model, whose ratio prices a run at equal wall time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch
from tabulate import tabulate

from benchmarks.accuracy import anneal_overrides, method_of, spec_overrides, split_methods
from benchmarks.common import write_results
from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.data import calibration_windows, eval_windows, load_wikitext2, tokenize
from sparseforge_compile.distill import kd_loss
from sparseforge_compile.evaluate import logits_of, perplexity
from sparseforge_compile.models import load_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify

# Where the annealing margin and the evidence ramp were chosen (the default --methods).
MARGIN_SWEEP = ("sparsegpt+kd,sparseforge[prior_margin=3,evidence_probes=1],sparseforge[prior_margin=3],"
                "sparseforge[prior_margin=4.5],sparseforge[prior_margin=6],sparseforge[prior_margin=10]")


def sharpened_tiny_llama(scale: float = 8.0, device: str = "cpu"):
    loaded = load_model("tiny-llama", device=device)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return loaded


def first_layers(loaded, layers: int):
    """The model cut to its first ``layers`` decoder blocks (then its final norm and head): real weights
    at a fraction of the cost, for mask questions a random model cannot answer."""
    blocks = loaded.model.model.layers
    if not 0 < layers <= len(blocks):
        raise SystemExit(f"--layers {layers}: the model has {len(blocks)} decoder layers")
    loaded.model.model.layers = blocks[:layers]
    loaded.model.config.num_hidden_layers = layers
    if getattr(loaded.model.config, "layer_types", None):
        loaded.model.config.layer_types = loaded.model.config.layer_types[:layers]
    return loaded


# Per proxy: (training settings, SparseGPT calibration windows x length, held-out windows x length).
PROXIES = {
    "tiny-llama-x8": (dict(batch_size=4, seqlen=64, lr=3e-3), (4, 64), (16, 64)),
    "smollm2-135m": (dict(batch_size=4, seqlen=128, lr=3e-4), (16, 512), (16, 128)),
}


@dataclass
class Proxy:
    """A proxy model with its data: the dense teacher, SparseGPT's calibration windows and the held-out
    windows with the teacher's logits on them."""

    name: str
    base: object  # LoadedModel
    teacher: torch.nn.Module
    train: dict  # AnnealConfig fields of the proxy's training
    calib: torch.Tensor
    heldout: torch.Tensor
    t_logits: torch.Tensor


def load_proxy(model: str, layers: int | None, device: str = "cpu") -> Proxy:
    train, (calib_n, calib_len), (held_n, held_len) = PROXIES[model]
    base = (sharpened_tiny_llama(device=device) if model == "tiny-llama-x8"
            else load_model(model, device=device))
    if layers:
        base = first_layers(base, layers)
    teacher = base.model.eval()
    heldout = calibration_windows(base.tokenizer, held_n, held_len, seed=99).to(device)
    calib = calibration_windows(base.tokenizer, calib_n, calib_len, seed=0)
    with torch.no_grad():
        t_logits = logits_of(teacher, heldout)
    return Proxy(model + (f" first {layers} layers" if layers else ""), base, teacher, train, calib, heldout, t_logits)


def phase_seconds(history: list[dict]) -> dict:
    """Seconds per step on the masked graph (blend < 1) and on the plain model, from the logged rows: their
    ratio within one run prices a masked step in plain steps, whatever else loads the CPU meanwhile."""
    spans: dict[str, list[float]] = {"masked": [0.0, 0], "plain": [0.0, 0]}
    for before, row in zip(history, history[1:]):
        span = spans["plain" if before["blend"] >= 1.0 else "masked"]
        span[0] += row["elapsed_s"] - before["elapsed_s"]
        span[1] += row["step"] - before["step"]
    return {f"{k}_s_per_step": round(t / n, 3) if n else None for k, (t, n) in spans.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama-x8", choices=sorted(PROXIES))
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--methods", default=MARGIN_SWEEP,
                   help="method specs, AnnealConfig fields in brackets: sparseforge[prior_margin=3]")
    p.add_argument("--valid-windows", type=int, default=0,
                   help="also score WikiText-2 valid perplexity on this many windows of 512 tokens (0: none)")
    p.add_argument("--device", default="cpu",
                   help="cuda runs the proxy in the GPU loop's mode (compiled, bf16 autocast, fused KD)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    proxy = load_proxy(args.model, args.layers, args.device)
    base, teacher, name, train = proxy.base, proxy.teacher, proxy.name, proxy.train
    heldout, calib, t_logits = proxy.heldout, proxy.calib, proxy.t_logits
    calib_n, calib_len = calib.shape
    valid = (eval_windows(tokenize(base.tokenizer, load_wikitext2("valid")), 512, args.valid_windows)
             if args.valid_windows else None)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for spec in split_methods(args.methods):
            method, settings = method_of(spec), anneal_overrides(spec_overrides(spec))
            student = copy.deepcopy(teacher)
            acfg = AnnealConfig.from_flat(dict(steps=args.steps, teacher_data_ratio=0.0, warm_start="sparsegpt",
                                               seed=seed, **{"hidden_weight": 3.0, **train, **settings}))
            cfg = SparsifyConfig(method=method, kernel_constraints=None, calib_samples=calib_n,
                                 calib_seqlen=calib_len, budget_s=None, anneal=acfg)
            t0 = time.perf_counter()
            result = sparsify(student, cfg, tokenizer=base.tokenizer, calib=calib, progress=False)
            with torch.no_grad():
                kl = float(kd_loss(logits_of(student.eval(), heldout), t_logits, heldout, ce_weight=0.0)[0])
            ppl = round(perplexity(student, valid, progress=False).ppl, 3) if valid is not None else None
            trained = result.anneal
            rows.append({"model": name, "method": method, "pattern": "2:4",
                         "settings": ",".join(f"{k}={v}" for k, v in settings.items()), "seed": seed,
                         "kl_weight": acfg.loss.kl_weight, "hidden_weight": acfg.loss.hidden_weight,
                         "steps": args.steps, "heldout_kl": round(kl, 4),
                         "flips_vs_warm_start": result.anneal.flips_vs_warm_start,
                         "wall_s": round(time.perf_counter() - t0, 1), "train_s": round(trained.seconds, 1),
                         "s_per_step": round(trained.seconds / max(trained.steps, 1), 3),
                         **phase_seconds(trained.history), "wikitext2_valid_ppl": ppl, "valid_windows": args.valid_windows, "budget_s": None})
            print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
            write_results("anneal_tiny", rows, out=args.out, settings=vars(args))  # each row kept as it lands
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
