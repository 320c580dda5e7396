"""``sparseforge-compile``: eval, report, prune, plan, recipe, generate.

Each subcommand parses its flags here and calls one function of the room that owns the work, so
the CLI and the Python API stay one code path. Errors users can act on (bad model name, missing
data, bad pattern) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tabulate import tabulate

from .errors import RecipeError, SparseForgeError, UsageError
from .inputs import check_at_least, check_generation_fits, check_output_file, check_seqlen_fits, pick_windows
from .models import SMOLLM2_NAME

USER_ERRORS: tuple[type[BaseException], ...] = (SparseForgeError, ValueError, FileNotFoundError)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but CUDA is not available here: use --device cpu")
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    return name


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ eval

def cmd_eval(args: argparse.Namespace) -> int:
    from .eval_tasks import parse_tasks
    from .models import load_model

    tasks = parse_tasks(args.tasks)
    if not tasks:
        raise UsageError("--tasks names no task: give e.g. wikitext2,piqa,arc_easy")
    check_at_least("--batch-size", args.batch_size)
    check_at_least("--max-windows", args.max_windows, hint="leave it out to score every window")
    if args.json:
        check_output_file(args.json, "--json")
    if [t for t in tasks if t != PPL_TASK]:
        from .eval_tasks import check_tasks

        check_tasks([t for t in tasks if t != PPL_TASK], args.limit)
    device = pick_device(args.device)
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise UsageError(f"{args.model} ships no tokenizer: evaluation needs one")
    payload: dict = {"model": args.model, "device": device, "dtype": args.dtype}
    if PPL_TASK in tasks:
        payload["wikitext2"] = _eval_perplexity(args, loaded, device)
    others = [t for t in tasks if t != PPL_TASK]
    if others:
        from .eval_tasks import evaluate_tasks

        scores = evaluate_tasks(loaded.model, loaded.tokenizer, others, data_dir=args.data_dir, limit=args.limit,
                                batch_size=args.batch_size, progress=not args.quiet)
        print(scores["table"])
        payload["tasks"] = scores["results"]
        payload["tasks_limit"] = args.limit
    if args.json:
        write_json(args.json, payload)
    return 0


PPL_TASK = "wikitext2"  # the SparseGPT-protocol perplexity (lm-eval's "wikitext" is a word-level protocol)


def _eval_perplexity(args: argparse.Namespace, loaded, device: str) -> dict:
    from .data import eval_windows, load_wikitext2, tokenize
    from .evaluate import perplexity, perplexity_unsupported

    problem = perplexity_unsupported(loaded.model, args.seqlen)
    if problem:
        raise UsageError(f"{args.model}: {problem}")
    tokens = tokenize(loaded.tokenizer, load_wikitext2(args.split, args.data_dir))
    all_windows = eval_windows(tokens, args.seqlen)
    windows = all_windows[: pick_windows("--max-windows", args.max_windows, all_windows.shape[0])]
    result = perplexity(loaded.model, windows, batch_size=args.batch_size, total_windows=all_windows.shape[0],
                        progress=not args.quiet)
    scope = f"{result.windows} of {result.total_windows} windows" + (" (SUBSET)" if result.subset else "")
    rows = [["model", args.model], ["dataset", f"wikitext2 {args.split}"], ["seqlen", result.seqlen],
            ["windows", scope], ["tokens scored", result.tokens], ["device / dtype", f"{device} / {args.dtype}"],
            ["seconds", f"{result.seconds:.1f}"]]
    print(tabulate(rows, tablefmt="simple"))
    subset_note = f" on a subset ({result.windows}/{result.total_windows} windows)" if result.subset else ""
    print(f"WikiText-2 {args.split} perplexity{subset_note}: {result.ppl:.4f}")
    return {"dataset": "wikitext2", "split": args.split, **result.as_dict()}


# -------------------------------------------------------------------------------------- generate

def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import not_a_causal_lm
    from .models import load_model
    from .serving import Generator

    if not args.prompt.strip():
        raise UsageError("--prompt is empty: give the text to continue, e.g. --prompt 'The capital of France is'")
    check_at_least("--max-new-tokens", args.max_new_tokens)
    device = pick_device(args.device)
    path = Path(args.model).expanduser()
    if args.layout and not (path / "sparseforge.json").is_file():
        raise UsageError(f"--layout {args.layout} applies to sparse checkpoints; {args.model} is not one (drop it)")
    if args.layout:  # a sparse checkpoint lowered to the layout asked for
        from .checkpoint import load
        from .loaded import DTYPES
        from .lowering.dispatch import DispatchConfig

        loaded = load(path, device=device, dtype=DTYPES[args.dtype], dispatch=DispatchConfig(layout=args.layout))
    else:
        loaded = load_model(args.model, device=device, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.model} ships no tokenizer: generation needs one")
    problem = not_a_causal_lm(loaded.model)
    if problem:
        raise UsageError(f"{args.model}: {problem}, so it does not generate text")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"the tokenizer of {args.model} has no chat template: drop --chat")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                add_generation_prompt=True, return_tensors="pt")
    else:
        encoded = tokenizer(args.prompt, return_tensors="pt")
    input_ids = (encoded["input_ids"] if hasattr(encoded, "keys") else encoded).to(device)
    check_generation_fits(loaded.model, input_ids.shape[1], args.max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    compile_step = {"auto": None, "on": True, "off": False}[args.compile]
    gen = Generator(loaded.model, input_ids.shape[1] + args.max_new_tokens, compile=compile_step)
    with torch.no_grad():
        result = gen.generate(input_ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    new_tokens = result.sequences[0, input_ids.shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(text if args.chat else args.prompt + text)
    lowered = [m for m in loaded.model.modules() if hasattr(m, "state") and hasattr(m, "materialize_weight")]
    kernels = ",".join(sorted({m.state.kernel for m in lowered})) or "dense"
    print(f"{result.new_tokens} new tokens (greedy, static cache{', compiled' if result.compiled else ''}, "
          f"{device} / {args.dtype}, {len(lowered)} sparse layers: {kernels}): prefill "
          f"{result.prefill_tokens_per_s:.1f} tokens/s, decode {result.decode_tokens_per_s:.1f} tokens/s")
    return 0


# ----------------------------------------------------------------------------------------- prune

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
               "batch_size", "seqlen", "warm_start", "compile", "autocast")


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
    loaded = load_model(args.model, device=device, dtype="fp32")
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
        print(f"trained on {ranks.world} processes, {cfg.anneal.runtime.batch_size} sequences each per step")
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


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from .memory_plan import GIB, choose, format_plan, model_shape, plan_modes

    if args.gpu_memory_gib is not None:
        gpu_bytes = int(args.gpu_memory_gib * GIB)
    elif torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_bytes = 80 * GIB
    plans = plan_modes(model_shape(args.model), args.gpus, args.batch_size, args.seqlen,
                       autocast=args.autocast == "bf16")
    print(f"{args.model}: {args.gpus} GPU(s), {args.batch_size} x {args.seqlen} tokens per GPU")
    try:
        chosen = choose(plans, gpu_bytes)
    except ValueError as exc:
        print(format_plan(plans, None, gpu_bytes))
        raise UsageError(str(exc)) from exc
    print(format_plan(plans, chosen, gpu_bytes))
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


def cmd_recipe(args: argparse.Namespace) -> int:
    from .pipeline import SparsifyConfig
    from .recipe import render_recipe

    if args.out:
        check_output_file(args.out, "--out")
    text = render_recipe(SparsifyConfig(method=args.method))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


# ---------------------------------------------------------------------------------------- report

def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from .errors import CaptureError
    from .models import load_model
    from .report import inspect

    if args.json:
        check_output_file(args.json, "--json")
    loaded = load_model(args.model, device=pick_device(args.device), dtype=args.dtype)
    kernel = None if args.kernel == "none" else args.kernel
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.target_dtype]
    try:
        report = inspect(loaded.model, pattern=args.pattern, exclude=tuple(args.exclude), dtype=target,
                         kernel_constraints=kernel)
    except CaptureError as exc:
        raise UsageError(str(exc)) from exc
    print(report)
    if args.json:
        write_json(args.json, {"model": args.model, **report.as_dict()})
    if args.graph:
        print("graph written to " + ", ".join(str(p) for p in report.write_graph(args.graph)))
    return 0


# ----------------------------------------------------------------------------------- the parser

def build_parser() -> argparse.ArgumentParser:
    from .anneal.config import flat_fields
    from .pipeline import METHODS
    from .recipe import setting_docs, top_fields

    parser = argparse.ArgumentParser(prog="sparseforge-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=SMOLLM2_NAME,
                       help=f"'{SMOLLM2_NAME}' (default), tiny-llama|tiny-qwen2|tiny-gpt2|tiny-opt|tiny-bert, "
                            f"a local HF folder, a sparse checkpoint folder, a .gguf file or a hub id")
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
        p.add_argument("--data-dir", default=None, help="data folder (default $SPARSEFORGE_DATA or ../shared/data)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="WikiText-2 perplexity by the standard protocol")
    common(p)
    p.add_argument("--tasks", default="wikitext2", metavar="T1,T2",
                   help="wikitext2 (perplexity by the SparseGPT protocol) and/or lm-eval tasks, e.g. piqa,arc_easy "
                        "(PIQA and ARC-Easy read the data folder; others need a datasets cache or hub access)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each lm-eval task")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a subset)")
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy text generation and its speed (sparse checkpoints lowered)")
    p.add_argument("--model", default=SMOLLM2_NAME, help="a sparse checkpoint folder, or any --model of eval")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the decode step (auto: on CUDA, with CUDA graphs; off on the CPU)")
    p.add_argument("--layout", default=None, choices=["cusparselt", "compact", "both", "fp8"],
                   help="what a sparse checkpoint's layers store and run (DispatchConfig.layout; default cusparselt)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("prune", help="prune a model to N:M (or unstructured) sparsity and save it",
                       description="Common settings are flags; every other one comes from --recipe FILE "
                                   "(sparseforge-compile recipe prints the defaults). Flags override the recipe.")
    docs = setting_docs()
    p.add_argument("--model", default=SMOLLM2_NAME)
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="recipe file (TOML, or YAML where PyYAML is installed): any setting, laid out as "
                        "'sparseforge-compile recipe' prints them")
    p.add_argument("--method", default=None, choices=METHODS, help=docs["method"] + " Default: sparseforge.")
    p.add_argument("--pattern", default=None, help="N:M (default 2:4), or 'none' for unstructured (with --sparsity)")
    p.add_argument("--sparsity", type=float, default=None, help=docs["sparsity"])
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB", help=docs["exclude"])
    p.add_argument("--budget-minutes", type=float, default=None, help="wall budget of the whole prune (minutes)")
    p.add_argument("--out", required=True, help="output folder (model, metrics, report, curves)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a sparse checkpoint already in --out")
    p.add_argument("--keep-training-state", action="store_true",
                   help="keep the optimizer state and teacher samples after the run finishes (for inspection)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eval-windows", type=int, default=4,
                   help="WikiText-2 test windows scored before and after (0: none, -1: all 148)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--calib-data", default=None, metavar="FILE[,FILE|c4]",
                   help=docs["calib_data"] + " Comma-separated.")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks scored on the pruned model (e.g. piqa,arc_easy; needs the [eval] extra)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel over N processes per node (GPUs; gloo processes on the CPU): reruns "
                        "this command under torchrun. --batch-size is per process")
    p.add_argument("--nnodes", default=None, help="with --nproc: torchrun's --nnodes (e.g. 2, or 1:4)")
    p.add_argument("--node-rank", type=int, default=None, help="with --nproc: this node's rank")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nproc on several nodes: the rendezvous host:port (torchrun's c10d rendezvous)")
    kinds = {**{n: f.type for n, f in top_fields().items()}, **{n: f.type for n, f in flat_fields().items()}}
    for name in PRUNE_FLAGS[4:]:  # method, pattern, sparsity and exclude have their own above
        kind = str(kinds[name])
        conv = int if ("int" in kind and "float" not in kind) else float if "float" in kind else str
        p.add_argument(_flag(name), dest=name, type=conv, default=None, help=docs[name])
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plan", help="GPU memory per part for annealing a model under DDP and FSDP2, and the mode")
    p.add_argument("--model", default=SMOLLM2_NAME,
                   help="any --model of prune (Hugging Face models read on the meta device) or a named shape: "
                        "llama-7b-shape")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=GPU_DEFAULTS["batch_size"], help="sequences per GPU")
    p.add_argument("--seqlen", type=int, default=GPU_DEFAULTS["seqlen"])
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU (default: this machine's first GPU, else 80)")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "off"], help="the loop's precision")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("recipe", help="print the default settings of a method as a recipe file for prune --recipe")
    p.add_argument("--method", default="sparseforge", choices=METHODS)
    p.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead of printing it")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("report", help="per-layer N:M eligibility, mask state, density and estimated savings")
    p.add_argument("--model", default=SMOLLM2_NAME, help="any --model of eval (a pruned checkpoint shows density)")
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="module names to keep dense (fnmatch, or re:REGEX)")
    p.add_argument("--kernel", default="cusparselt", choices=["cusparselt", "cutlass", "none"],
                   help="sparse-kernel shape rule to apply (none: only N:M divisibility)")
    p.add_argument("--target-dtype", default="bf16", choices=["bf16", "fp16"], help="dtype the sparse kernel runs in")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype to load the model in")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--graph", default=None, metavar="PATH", help="write the graph: .dot, .svg or .png")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"sparseforge-compile {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
