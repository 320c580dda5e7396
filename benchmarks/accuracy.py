"""Side-by-side accuracy of every method on one model, same data and budget.

    python -m benchmarks.accuracy --model smollm2-135m --methods dense,magnitude,wanda,sparsegpt,sparsegpt+kd,sparseforge \
        --budget-minutes 5 --tasks piqa,arc_easy

A method may carry its own annealing settings in brackets, e.g. ``sparsegpt+kd[hidden_weight=3]``
(the peer with layer-wise distillation, an ablation), and its own ``teacher_sample_share`` or
``calib_samples``; ``--anneal`` applies to every trained method.
Each method starts from a fresh copy of the dense model. Writes a table (stdout), JSON
(``benchmarks/results/accuracy_<model>.json`` unless --out), and a bar chart PNG beside it:
WikiText-2 perplexity, PIQA / ARC-Easy acc and acc_norm, wall time, peak GPU memory.

``--gpus N`` runs the methods N at a time, each in its own process on a GPU of its own, and merges
their rows into one results file: a 10-minute budget is then 10 minutes of one whole GPU for each
method, as when they run one after another. On one GPU, two or more trained methods also run each in
a fresh process, one after another (``--isolate``, the default there): a method run after another in the
same process inherited its allocator and compile state (its teacher sampling took 43 % longer).

``--nproc N`` instead trains each method data-parallel over N processes (one per GPU; gloo processes on
the CPU) under torchrun, one method after another: ``--batch-size`` is per process, ``--anneal
parallel=fsdp2`` shards the model, and rank 0 evaluates and writes the rows (``nproc`` in each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks import curves
from benchmarks.common import RESULTS_DIR, ROOT, write_results
from sparseforge_compile import distributed
from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.anneal.config import flat_fields
from sparseforge_compile.data import calibration_windows, eval_windows, load_wikitext2, tokenize
from sparseforge_compile.distill import TEACHER_DECODES
from sparseforge_compile.evaluate import perplexity
from sparseforge_compile.models import load_model
from sparseforge_compile.pipeline import METHODS, SparsifyConfig, sparsify


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt,sparsegpt+kd,sparseforge")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="wall budget of each trained method")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--also-valid", action="store_true",
                   help="also score the WikiText-2 valid split (wikitext2_valid_ppl): tune on it, report test")
    p.add_argument("--tasks", default="", help="lm-eval tasks scored on every model, e.g. piqa,arc_easy (empty: none)")
    p.add_argument("--task-limit", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (sequences)")
    p.add_argument("--train-seqlen", type=int, default=512)
    p.add_argument("--anneal", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an AnnealConfig field for the trained methods, e.g. --anneal lr=2e-4")
    p.add_argument("--teacher-sample-share", type=float, default=0.2)
    p.add_argument("--teacher-sample-rows", type=int, default=None,
                   help="sample exactly this many teacher sequences (no time share): fixed data for step sweeps")
    p.add_argument("--teacher-sample-batch", type=int, default=None,
                   help="rows sampled at once (default: as many as fit in 40%% of the free memory on a GPU, at "
                        "most 4096; 16 on the CPU, as the CLI: one 1024-row batch takes minutes on a CPU)")
    p.add_argument("--warm-compile-caches", action="store_true",
                   help="let a trained method reuse what an earlier one compiled (default: each compiles cold)")
    p.add_argument("--teacher-decode", default="auto", choices=TEACHER_DECODES)
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--gpus", type=int, default=1,
                   help="run the methods in parallel, one process each, at most one per GPU, on this many GPUs")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each method in a fresh process, one after another (default: on a GPU when two or "
                        "more trained methods share the run, so none inherits another's state)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train each method data-parallel over N processes under torchrun (GPUs; gloo on the CPU)")
    p.add_argument("--runs-prefix", default=None, help=argparse.SUPPRESS)  # --gpus workers: the parent's run dirs
    return p.parse_args(argv)


def anneal_overrides(pairs: list[str]) -> dict:
    types = {name: f.type for name, f in flat_fields().items()}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--anneal {pair}: unknown field {key!r}")
        kind = str(types[key])
        if "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        elif "int" in kind and "float" not in kind:
            out[key] = int(value)
        elif "float" in kind:
            out[key] = float(value)
        else:
            out[key] = value
    return out


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs; commas inside brackets belong to the spec."""
    specs, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += ch
    specs.append(current.strip())
    return [s for s in specs if s]


@contextlib.contextmanager
def cold_compile_caches(cold: bool):
    """Each trained method compiles from scratch, as a first run on a fresh machine does: a method run
    after another would otherwise find the teacher's blocks (same model, same code) compiled already."""
    if not cold:
        yield
        return
    import torch._dynamo
    import torch._inductor.utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    torch._dynamo.reset()
    with fresh():
        yield
    torch._dynamo.reset()


# Where compilation spent its time (torch._dynamo.utils.compile_times' phases, seconds summed over every
# compiled frame): tracing, AOTAutograd, Inductor's lowering and codegen, and the wait for the kernel
# compile workers (Triton on a GPU). A trained method's first steps are mostly this.
COMPILE_PHASES = {"compile_dynamo_s": "_compile.compile_inner", "compile_aot_s": "create_aot_dispatcher_function",
                  "compile_inductor_s": "compile_fx_inner", "compile_kernels_wait_s": "async_compile.wait"}


def compile_seconds(reset: bool = False) -> dict[str, float]:
    """COMPILE_PHASES' totals since the last reset (``reset=True`` clears them and returns {})."""
    from torch._dynamo import utils as dynamo_utils

    metrics = dynamo_utils.compilation_time_metrics
    if reset:
        metrics.clear()
        dynamo_utils.clear_compilation_metrics()
        return {}
    return {key: round(sum(metrics.get(phase, [])), 1) for key, phase in COMPILE_PHASES.items()}


def compile_frames(top: int = 6) -> str:
    """Which compiled frames the compile time went to since ``compile_seconds(reset=True)``, the
    costliest first: ``name (file:line) xN S s``, summed over the frame's compiles (a recompile, say for
    grad mode, counts again). Where a method's extra compile time goes, graph by graph."""
    from torch._dynamo import utils as dynamo_utils

    frames: dict[str, list[float]] = {}
    for m in dynamo_utils.get_compilation_metrics():
        key = f"{m.co_name} ({Path(str(m.co_filename)).name}:{m.co_firstlineno})"
        frames.setdefault(key, []).append(getattr(m, "entire_frame_compile_time_s", None) or 0.0)
    ranked = sorted(frames.items(), key=lambda kv: -sum(kv[1]))[:top]
    return "; ".join(f"{key} x{len(times)} {sum(times):.1f} s" for key, times in ranked)


# Settings of the prune around the loop that a method's brackets may also set (budget trade-offs:
# sampling share against training time, calibration windows against warm-start time).
RUN_FIELDS = {"teacher_sample_share": float, "calib_samples": int}


def run_settings(args: argparse.Namespace, spec: str) -> dict:
    """``teacher_sample_share`` and ``calib_samples``: the flags', or the method's brackets'."""
    out = {name: getattr(args, name) for name in RUN_FIELDS}
    for pair in spec_overrides(spec):
        key, _, value = pair.partition("=")
        if key in RUN_FIELDS:
            out[key] = RUN_FIELDS[key](value)
    return out


def anneal_config(args: argparse.Namespace, overrides: dict, spec: str) -> AnnealConfig:
    """The flags' batch size and seqlen, then --anneal, then the method's own brackets: later wins
    (``sparseforge[batch_size=64]`` overrides ``--batch-size``)."""
    own = [pair for pair in spec_overrides(spec) if pair.partition("=")[0] not in RUN_FIELDS]
    fields = {"batch_size": args.batch_size, "seqlen": args.train_seqlen, **overrides, **anneal_overrides(own)}
    return AnnealConfig.from_flat(fields)


def method_of(spec: str) -> str:
    return spec.split("[", 1)[0]


def spec_overrides(spec: str) -> list[str]:
    inner = spec.partition("[")[2].rstrip("]")
    return [pair.strip() for pair in inner.split(",") if pair.strip()]


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options (``--name VALUE`` and ``--name=VALUE`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            out.append(arg)
    return out


TRAINED = ("sparsegpt+kd", "sparseforge")


def isolates(args: argparse.Namespace, methods: list[str]) -> bool:
    """Whether each method runs in a process of its own. Auto: on a GPU, when two or more trained methods
    share a run: in one process the second inherits the first's allocator and compile state (warm caches
    included; accuracy_*_trained_10min_kd_t1.json)."""
    if args.isolate is not None:
        return args.isolate
    trained = [spec for spec in methods if method_of(spec) in TRAINED]
    return args.device.startswith("cuda") and len(trained) > 1


def run_in_processes(args: argparse.Namespace, argv: list[str], methods: list[str], stem: str,
                     runs_prefix: str) -> list[dict]:
    """Each method in a process of its own, at most ``--gpus`` at once, each on a GPU no other running
    worker holds; rows in the order of ``methods``, each with its GPU. A failed worker stops the run with
    its log's tail (after the others finish, so that no finished 10-minute run is lost)."""
    on_gpus = args.device.startswith("cuda") or args.gpus > 1
    if on_gpus:
        available = torch.cuda.device_count()
        if available < args.gpus:
            raise SystemExit(f"--gpus {args.gpus}: only {available} CUDA device(s) visible")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (visible.split(",") if visible else [str(i) for i in range(available)])[: max(1, args.gpus)]
    else:  # --isolate on the CPU: one worker at a time
        ids = ["cpu"]
    slots = min(len(ids), len(methods))
    out = Path(args.out) if args.out else RESULTS_DIR / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}_workers_", dir=out.parent))
    base = [a for a in _without_options(argv, ("--methods", "--out", "--gpus", "--runs-prefix"))
            if a not in ("--isolate", "--no-isolate")]
    # Each worker compiles with its share of the host's cores, as on a machine of its own per GPU (the
    # 1-GPU H200 machines have 16 cores, the 2-GPU ones 32), not with all of them at once.
    env = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or slots) // slots)), **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # finds benchmarks/
    pending, running, finished, failed = list(enumerate(methods)), {}, {}, []
    while pending or running:
        while pending and len(running) < slots:
            gpu = next(g for g in ids if g not in running.values())
            i, spec = pending.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.accuracy", *base, "--no-isolate", "--methods", spec,
                   "--out", str(work / f"m{i}.json"), "--runs-prefix", runs_prefix]
            log = open(work / f"m{i}.log", "w")  # noqa: SIM115 (closed when the worker ends)
            proc = subprocess.Popen(cmd, env={**env, "CUDA_VISIBLE_DEVICES": gpu} if on_gpus else env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[(i, spec, proc, log)] = gpu
            print(f"GPU {gpu}: {spec} (log {work / f'm{i}.log'})", flush=True)
        time.sleep(0.2)
        for key in [k for k in running if k[2].poll() is not None]:
            i, spec, proc, log = key
            log.close()
            gpu = running.pop(key)
            path = work / f"m{i}.json"
            if proc.returncode != 0 or not path.exists():
                failed.append((i, spec, gpu))
                continue
            finished[i] = {**json.loads(path.read_text())["rows"][0], "gpu": gpu, "parallel_gpus": slots}
            if pending or running:  # a run cut off keeps what it finished
                write_results(stem, [finished[k] for k in sorted(finished)], out=args.out, extra={"partial": True}, settings=vars(args))
    rows = [finished[i] for i in sorted(finished)]
    if failed:
        if rows:
            write_results(stem, rows, out=args.out, extra={"partial": True}, settings=vars(args))
        tails = "\n".join(f"--- GPU {gpu} ({spec}):\n" + (work / f"m{i}.log").read_text()[-2000:]
                          for i, spec, gpu in sorted(failed))
        raise SystemExit(f"{len(failed)} of {len(methods)} workers failed (their files are in {work}; the "
                         f"{len(rows)} finished rows are in {out}):\n{tails}")
    shutil.rmtree(work)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc and not distributed.launched():  # rerun under torchrun, one process per GPU
        if args.gpus > 1:
            raise SystemExit("--nproc trains one method on several GPUs, --gpus runs several methods side by side: "
                             "give one of them")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "benchmarks.accuracy", *distributed.strip_launch_flags(argv)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        return subprocess.call(cmd, env=env)
    if not distributed.launched():
        return _main(args, argv, None)
    ranks, args.device = distributed.init_from_env(args.device)
    try:
        return _main(args, argv, ranks)
    finally:
        distributed.shutdown()


def _main(args: argparse.Namespace, argv: list[str], ranks) -> int:
    """The run, in this process; under torchrun (``ranks``) every rank trains, rank 0 evaluates and writes."""
    writes = ranks is None or ranks.main
    methods = split_methods(args.methods)
    overrides = anneal_overrides(args.anneal)
    for spec in methods:
        m = method_of(spec)
        if m != "dense" and m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from dense, {', '.join(METHODS)}")
        if m != "dense":
            try:  # every method's settings, checked before the model loads and the first method runs
                SparsifyConfig(method=m, anneal=anneal_config(args, overrides, spec), **run_settings(args, spec))
            except (TypeError, ValueError) as exc:
                raise SystemExit(f"{spec}: {exc}") from None
    tasks = [t for t in args.tasks.split(",") if t]
    # Run dirs are named after the results file: two result files (a 10-minute run and a sweep) with
    # one method spec must not share a run dir (the second overwrote the first's curve).
    stem = Path(args.out).stem if args.out else f"accuracy_{Path(args.model).name.replace('.', '_')}"
    runs_prefix = args.runs_prefix or str((Path(args.out).parent if args.out else RESULTS_DIR) / "runs" / stem)
    if ranks is None and len(methods) > 1 and (args.gpus > 1 or isolates(args, methods)):
        rows = run_in_processes(args, argv, methods, stem, runs_prefix)
        path = write_results(stem, rows, out=args.out, settings=vars(args))
        _bar_chart(rows, tasks, path.with_suffix(".png"))
        print(tabulate(rows, headers="keys", tablefmt="github"))
        return 0
    base = load_model(args.model, device=args.device)
    tok = base.tokenizer
    all_windows = eval_windows(tokenize(tok, load_wikitext2(args.split)), args.seqlen)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    calib: dict[int, torch.Tensor] = {}  # by window count
    for spec in methods:
        if method_of(spec) in ("wanda", "sparsegpt", "sparsegpt+kd", "sparseforge"):
            n = run_settings(args, spec)["calib_samples"]
            if n not in calib:
                calib[n] = calibration_windows(tok, n, args.calib_seqlen, seed=0)
    rows = []
    for spec in methods:
        method = method_of(spec)
        model = copy.deepcopy(base.model)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        info: dict = {}
        budget_s = 0.0
        out_dir = None
        if method != "dense":
            acfg = anneal_config(args, overrides, spec)
            settings = run_settings(args, spec)
            budget_s = args.budget_minutes * 60 if method in ("sparsegpt+kd", "sparseforge") else 0.0
            cfg = SparsifyConfig(method=method, pattern=args.pattern, calib_seqlen=args.calib_seqlen,
                                 budget_s=budget_s or None, **settings,
                                 teacher_sample_batch=args.teacher_sample_batch,
                                 teacher_sample_rows=args.teacher_sample_rows,
                                 teacher_decode=args.teacher_decode, anneal=acfg)
            run_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
            out_dir = Path(f"{runs_prefix}_{run_name}") if budget_s else None
            compile_seconds(reset=True)
            with cold_compile_caches(not args.warm_compile_caches):
                result = sparsify(model, cfg, tokenizer=tok, calib=calib.get(cfg.calib_samples), out_dir=out_dir,
                                  progress=not args.quiet)
                compiling = {**compile_seconds(), "compile_frames": compile_frames()}  # inside: leaving the cold caches resets Dynamo, and its timings
            info = {**result.summary(), **compiling}
            if result.anneal and result.anneal.history:
                speeds = [r["tokens_per_s"] for r in result.anneal.history[1:]] or [0.0]
                info["tokens_per_s_median"] = statistics.median(speeds)
                # Seconds into the training loop at its first log row: compilation (and the budget
                # probe's two steps) dominate it.
                first = result.anneal.history[0]
                info["first_log_step"], info["first_log_elapsed_s"] = first["step"], round(first["elapsed_s"], 1)
        wall = time.perf_counter() - t0
        if not writes:  # rank 0 evaluates; the others wait for it at the barrier that ends each method
            del model
            ranks.barrier()
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        ppl = perplexity(model, windows, total_windows=all_windows.shape[0], progress=not args.quiet)
        row = {"model": args.model, "method": spec, "pattern": args.pattern if method != "dense" else "dense",
               "wikitext2_ppl": round(ppl.ppl, 3), "split": args.split, "eval_windows": ppl.windows,
               "eval_seqlen": args.seqlen, "budget_s": budget_s, "wall_s": round(wall, 1),
               "peak_gpu_gb": round(peak, 2) if peak is not None else None,
               **({"nproc": ranks.world} if ranks is not None else {})}
        if 0 < args.train_seqlen < args.seqlen:
            # Where in the 2048-token window each model loses, split at --train-seqlen for every row
            # (dense too): trained methods saw windows that long (train_seqlen says if one differed).
            row["position_split"] = args.train_seqlen
            row["wikitext2_ppl_within_train_len"] = round(ppl.ppl_between(0, args.train_seqlen - 1), 3)
            row["wikitext2_ppl_beyond_train_len"] = round(ppl.ppl_between(args.train_seqlen - 1, args.seqlen), 3)
        if method != "dense" and budget_s:
            row["train_seqlen"], row["hidden_weight"] = cfg.anneal.runtime.seqlen, cfg.anneal.loss.hidden_weight
            row["teacher_sample_share"], row["calib_samples"] = cfg.teacher_sample_share, cfg.calib_samples
        if args.also_valid and args.split != "valid":
            valid = eval_windows(tokenize(tok, load_wikitext2("valid")), args.seqlen)
            row["wikitext2_valid_ppl"] = round(perplexity(model, valid, progress=not args.quiet).ppl, 3)
        for key in ("steps", "train_tokens", "teacher_tokens", "teacher_sample_batch", "flips_vs_warm_start",
                    "tokens_per_s_median", "first_log_step", "first_log_elapsed_s", "compiled", "attention_masks", *COMPILE_PHASES, "compile_frames"):
            if key in info:
                row[key] = info[key]
        sampling_s = info.get("phases", {}).get("teacher_sampling", 0.0)
        if info.get("teacher_tokens") and sampling_s > 0:
            row["teacher_tokens_per_s"] = round(info["teacher_tokens"] / sampling_s)
        if method != "dense" and budget_s and out_dir is not None and (out_dir / "metrics.jsonl").exists():
            # The curve's end, by data source (curves.py): C4 rows fitted far below the fresh teacher
            # text's KL, or a student CE under the teacher's own, mean the repeated C4 is being memorized.
            end = curves.summarize(out_dir / "metrics.jsonl")[-1]
            for term in ("kl_real", "kl_sampled", "ce_real", "teacher_ce_real"):
                if term in end:
                    row[f"train_{term}_last_tenth"] = end[term]
        for phase, seconds in info.get("phases", {}).items():  # where the budget went (flat keys)
            row[f"phase_{phase}_s"] = round(seconds, 1)
        if tasks:  # lm-evaluation-harness's own task definitions and metrics
            from sparseforge_compile.eval_tasks import evaluate_tasks

            scores = evaluate_tasks(model, tok, tasks, limit=args.task_limit, progress=not args.quiet)["results"]
            for task, metrics in scores.items():
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                        row[f"{task}_{metric}"] = round(float(value), 4)
        rows.append(row)
        print(tabulate([row], headers="keys", tablefmt="github"), flush=True)
        write_results(stem, rows, out=args.out, settings=vars(args))  # a cut-off run keeps what it finished
        del model
        if ranks is not None:
            ranks.barrier()
    if not writes:
        return 0
    path = write_results(stem, rows, out=args.out, settings=vars(args))
    _bar_chart(rows, tasks, path.with_suffix(".png"))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


def _bar_chart(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["wikitext2_ppl"] + [f"{t}_acc_norm" for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    names = [r["method"] for r in rows]
    for ax, key in zip(axes[0], panels):
        values = [r.get(key) or 0 for r in rows]
        ax.bar(names, values, color=["#888" if n == "dense" else "#3a7" if n == "sparseforge" else "#48c"
                                     for n in names])
        ax.set_title(key + (" (log)" if key == "wikitext2_ppl" else ""))
        if key == "wikitext2_ppl":
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
