"""The ``prune`` command: its settings (the device's sizing, the recipe file, the flags), the run (one
process or a rank of several), and what it writes (the model, report, curves, summary)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from .errors import RecipeError, UsageError
from .inputs import (
    check_seqlen_fits,
    pick_device,
    pick_windows,
    write_json,
)

# Smaller defaults where a flag is left out on the CPU: a real prune of SmolLM2 in minutes on 2 cores.
# SparseGPT's column-by-column updates take minutes per model on 2 cores: Wanda warm-starts there. A CPU
# budget buys tens of steps, so the schedule gives the soft phase 40 % of them (hardened by 60 %), the
# evidence counts after 2 probes and every row is logged: the run shows the masks anneal into N:M.
CPU_DEFAULTS = {"calib_samples": 16, "calib_seqlen": 512, "batch_size": 4, "seqlen": 128,
                "teacher_sample_batch": 16, "warm_start": "wanda", "anneal_end": 0.4, "harden_end": 0.6,
                "evidence_probes": 2, "importance_every": 2, "prior_margin": 100.0, "log_every": 1}
FULL_FIGURES = "docs/results.md"  # where the full-budget GPU figures are, with their commands
GPU_DEFAULTS = {"calib_samples": 128, "calib_seqlen": 2048, "batch_size": 32, "seqlen": 512}


# The settings prune takes as flags; every other one comes from --recipe (defaults < recipe < flags).
PRUNE_FLAGS = ("method", "pattern", "sparsity", "exclude", "calib_samples", "calib_seqlen", "steps", "lr", "seed",
               "batch_size", "seqlen", "warm_start", "compile", "autocast", "parallel")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def prune_config(args: argparse.Namespace, device: str):
    """The SparsifyConfig of a prune: the defaults, the device's sizing (CPU_DEFAULTS / GPU_DEFAULTS),
    the recipe file, then the flags given; a bad setting is one line naming the recipe or the flag."""
    from .recipe import build_config, read_recipe

    base = {"budget_s": None, **(GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS)}
    recipe = read_recipe(args.recipe) if args.recipe else {}
    flags = {name: getattr(args, name) for name in PRUNE_FLAGS if getattr(args, name) is not None}
    if "pattern" in flags and flags["pattern"].lower() in ("none", "unstructured"):
        flags["pattern"] = None
    if "exclude" in flags:
        flags["exclude"] = tuple(flags["exclude"])
    if getattr(args, "calib_data", None):
        flags["calib_data"] = tuple(part.strip() for part in args.calib_data.split(",") if part.strip())
    if args.budget_minutes is not None:
        flags["budget_s"] = args.budget_minutes * 60
    if getattr(args, "keep_training_state", False):
        flags["keep_training_state"] = True
    try:
        return build_config({**base, **recipe, **flags}, source="prune flags")
    except RecipeError:
        if recipe:
            build_config({**base, **recipe}, source=str(args.recipe))  # a bad recipe is named as such
        raise


def _save_pruned(model, tokenizer, out: Path, pattern: str | None, provenance: dict, overwrite: bool) -> dict:
    """Both checkpoint formats for N:M; the Hugging Face layout alone for unstructured sparsity (the
    compact format and the sparse kernels are N:M-only)."""
    from . import save

    if pattern is not None:
        report = save(model, out, tokenizer=tokenizer, provenance=provenance, overwrite=overwrite)
        return report.as_dict() if hasattr(report, "as_dict") else {"saved": str(report)}
    hf_dir = out / "hf-unstructured"
    model.save_pretrained(hf_dir)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(hf_dir)
    write_json(hf_dir / "unstructured_sparsity.json", {**provenance, "layers": getattr(model, "_sparseforge_layers", {})})
    return {"formats": ["hf"], "path": str(hf_dir)}


def cmd_prune(args: argparse.Namespace) -> int:
    from . import distributed

    if args.nproc and not distributed.launched():  # rerun under torchrun: one process per GPU
        import subprocess

        argv = distributed.strip_launch_flags(sys.argv[1:])
        cmd = distributed.torchrun_command(argv, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
        return subprocess.call(cmd)
    if not distributed.launched():
        return _prune(args, None, pick_device(args.device))
    ranks, device = distributed.init_from_env(args.device)
    try:
        return _prune(args, ranks, device)
    finally:
        distributed.shutdown()


def _prune(args: argparse.Namespace, ranks, device: str) -> int:
    """One process's prune; under torchrun (``ranks``) every rank trains and rank 0 alone evaluates,
    saves and reports."""
    from .checkpoint import check_output_dir
    from .data import eval_windows, load_wikitext2, tokenize
    from .evaluate import perplexity, perplexity_unsupported
    from .models import load_model
    from .pipeline import ONE_SHOT, sparsify
    from .report import plot_curves

    cfg = prune_config(args, device)
    pattern = cfg.pattern
    main = ranks is None or ranks.main
    if cfg.method not in ONE_SHOT and not cfg.budget_s and not cfg.anneal.schedule.steps:
        raise UsageError(f"--method {cfg.method} trains: give --budget-minutes or --steps (or budget_s / "
                         f"[schedule] steps in the recipe)")
    if args.tasks:
        from .eval_tasks import check_tasks, parse_tasks

        check_tasks(parse_tasks(args.tasks), args.limit)  # before the prune, not after it
    if args.eval_windows < -1:
        raise UsageError(f"--eval-windows {args.eval_windows}: give 0 (none), -1 (all) or a count")
    out = check_output_dir(args.out, overwrite=args.overwrite or not main)  # before any training
    # Sharded, each rank trains shards on its GPU: the model itself, possibly larger than one, waits on the CPU.
    sharded = ranks is not None and cfg.anneal.runtime.parallel == "fsdp2" and cfg.method not in ONE_SHOT
    loaded = load_model(args.model, device="cpu" if sharded else device, dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    _check_prune_model(args, cfg, model, tok)
    windows = None
    if args.eval_windows and tok is not None and main:
        seqlen = 2048  # the evaluation protocol's window
        problem = perplexity_unsupported(model, seqlen)
        if problem:
            print(f"WikiText-2 perplexity skipped: {problem}")
        else:
            all_windows = eval_windows(tokenize(tok, load_wikitext2("test", args.data_dir)), seqlen)
            windows = all_windows[: pick_windows("--eval-windows", args.eval_windows, all_windows.shape[0], -1)]
    before = perplexity(model, windows, progress=not args.quiet, desc="dense ppl") if windows is not None else None
    result = sparsify(model, cfg, tokenizer=tok, data_dir=args.data_dir, out_dir=out, resume=args.resume,
                      progress=not args.quiet)
    if not main:
        return 0
    if ranks is not None:
        print(f"trained on {ranks.world} processes, {result.batch_size} sequences each per step")
    provenance = {"method": cfg.method, "model": args.model, "config": cfg.to_json(), **result.summary()}
    saved = _save_pruned(model, tok, out, pattern, provenance, args.overwrite)  # before anything else can fail
    after = perplexity(model, windows, progress=not args.quiet, desc="pruned ppl") if windows is not None else None

    from .report import inspect

    report = inspect(model, pattern=pattern or "2:4")
    (out / "report.txt").write_text(str(report) + "\n")
    write_json(out / "report.json", report.as_dict())
    if result.anneal and result.anneal.history:
        density = {r["name"]: r["density"] for r in report.as_dict()["layers"] if r.get("eligible")}
        plot_curves(result.anneal.history, density, out / "anneal_curves.png")
    summary = {**result.summary(), "model": args.model, "device": device, "out": str(out),
               "config": cfg.to_json(), "saved": saved}
    rows = [["model", args.model], ["method", f"{cfg.method} ({pattern or f'unstructured {cfg.sparsity}'})"],
            ["pruned layers", f"{len(result.layers)} ({len(result.skipped)} left dense)"],
            ["wall time", f"{result.seconds:.1f} s " + ", ".join(f"{k} {v:.0f}s" for k, v in result.phases.items())]]
    if result.anneal:
        rows.append(["training", f"{result.anneal.steps} steps, {result.anneal.tokens} tokens, "
                                 f"{result.anneal.flips_vs_warm_start} weights flipped vs warm start"])
    if before and after:
        summary.update(dense_ppl=before.ppl, pruned_ppl=after.ppl, eval_windows=after.windows)
        rows.append(["WikiText-2 test ppl", f"dense {before.ppl:.2f} -> pruned {after.ppl:.2f} "
                                            f"({after.windows} windows of 2048)"])
    if args.tasks:
        from .eval_tasks import evaluate_tasks, parse_tasks

        scores = evaluate_tasks(model, tok, parse_tasks(args.tasks), data_dir=args.data_dir, limit=args.limit,
                                progress=not args.quiet)
        summary["tasks"] = scores["results"]
        print(scores["table"])
    rows.append(["written to", str(out)])
    write_json(out / "summary.json", summary)
    print(tabulate(rows, tablefmt="simple"))
    if before and after:
        print(f"WikiText-2 test perplexity ({after.windows}/{after.total_windows} windows): {after.ppl:.4f}")
    if not device.startswith("cuda") and result.anneal:
        print(f"A CPU-sized run ({result.anneal.steps} steps). The full-budget GPU figures and the commands "
              f"that make them: {FULL_FIGURES} (SmolLM2-135M 2:4, 10 minutes on an H200: 31.9 test ppl, dense 21.6).")
    return 0


def _check_prune_model(args: argparse.Namespace, cfg, model, tok) -> None:
    """What the loaded model must offer the prune asked for: a tokenizer for text, room for the sequences."""
    from .pipeline import ONE_SHOT

    trains = cfg.method not in ONE_SHOT
    calibrates = cfg.method in ("wanda", "sparsegpt") or (trains and cfg.anneal.evidence.warm_start in ("wanda", "sparsegpt"))
    if tok is None and (trains or calibrates):
        raise UsageError(f"{args.model} ships no tokenizer: --method {cfg.method} needs one for its text "
                         f"(add the tokenizer files to the folder, or use --method magnitude)")
    if trains:
        check_seqlen_fits(model, cfg.anneal.runtime.seqlen, "--seqlen")
    if calibrates:
        check_seqlen_fits(model, cfg.calib_seqlen, "--calib-seqlen")
