"""Annealing step time against a plain KD fine-tuning step at the same batch, plus where the time goes.

    python -m benchmarks.step_time --model smollm2-135m --batch-sizes 32,64 --hidden-weights 0,3

Rows: ``bench=train_step``: median ms of a plain KD step (SparseGPT-style fixed mask, eager model) and
of SparseForge steps in the soft phase (Fisher collection + learned scores) and the hardening phase,
with the ratio; ``bench=component``: teacher forward, student forward, forward+backward, KD loss;
``bench=teacher_sampling``: ms per decode step and tokens/s at several sampling batches.
Timing: CUDA events around each region after warm-up, medians over --repeats; ``*_loop_ms``: the pace of
20 back-to-back steps (no sync between them, as the training loop runs), median of 3 runs.
``--timing interleaved`` (``bench=train_loop``): the peer's plain KD loop, plain KD with SparseForge's loss and
SparseForge's soft and hard loops, timed round by round, so that host or clock drift during the run lands
on every loop alike (loops timed one after another minutes apart spread by 20 % on a shared GPU host).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import interleaved_median_ms, median_ms, write_results
from sparseforge_compile.anneal import AnnealConfig, schedule
from sparseforge_compile.capture import capture
from sparseforge_compile.config import SparsifyConfig
from sparseforge_compile.data import calibration_windows
from sparseforge_compile.distill import kd_loss, sample_from_teacher
from sparseforge_compile.evaluate import logits_of
from sparseforge_compile.models import load_model
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.training import prepare_training


def build(base, tok, calib, batch: int, seqlen: int, fixed: bool, hidden_weight: float = 0.0, compile: str = "off",
          outline: str = "off", steps: int = 4000, **anneal):
    """A plain KD (``fixed``) or SparseForge annealer on a copy of ``base``, for a ``steps``-step schedule
    (long enough that every timed soft-phase step falls inside the soft phase: 200 steps at the default
    ``anneal_end``)."""
    model = copy.deepcopy(base)
    method = "sparsegpt+kd" if fixed else "sparseforge"
    acfg = AnnealConfig.from_flat(dict(batch_size=batch, seqlen=seqlen, warm_start="magnitude", steps=steps,
                                       teacher_data_ratio=0.0, fixed_mask=fixed, hidden_weight=hidden_weight,
                                       compile=compile, outline_blocks=outline, **anneal))
    cfg = SparsifyConfig(method=method, budget_s=None, anneal=acfg)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=next(model.parameters()).device)
    captured = capture(model, (ids,))
    # The tiny test models are below the sparse kernels' minimum shapes: check the N:M math only.
    rules = None if getattr(base, "name_or_path", "").startswith("tiny") else "cusparselt"
    report = analyze_eligibility(captured, "2:4", kernel_constraints=rules)
    layers = [i.name for i in report.layers if i.eligible]
    transposed = {i.name: i.transposed for i in report.layers if i.eligible}
    setup = prepare_training(model, cfg, captured, report, layers, transposed, calib, tok, progress=False)
    model.train()
    return model, setup.annealer


def profile_steps(step, path: str, device: str, steps: int = 8, trace: bool = False) -> float | None:
    """torch.profiler over ``steps`` steps (one Fisher probe among 8): the ops by device time, to a
    text file, so that where a step's time goes is on record. Returns the device-busy milliseconds per
    step (sum of kernel self times; None on the CPU): far below the step's wall time means the step
    is host-bound (launches, dispatch), not compute-bound."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    tables = averages.table(sort_by=key, row_limit=40)
    if device == "cuda":  # and where the host's time goes, which bounds a step that out-waits its kernels
        tables += "\n\nBy host (self CPU) time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40)
    Path(path).write_text(tables)
    if trace:  # the timeline of two more steps: where the host waits, launches, syncs (chrome://tracing)
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        trace_path = Path(path).with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace_path))
        with open(trace_path, "rb") as f, gzip.open(f"{trace_path}.gz", "wb") as gz:
            shutil.copyfileobj(f, gz)
        trace_path.unlink()
    if device != "cuda":
        return None
    busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages)
    return busy_us / 1e3 / steps


LOOP_STEPS, LOOP_ROUNDS = 20, 3


def loop_ms(step, steps: int = LOOP_STEPS, rounds: int = LOOP_ROUNDS) -> float:
    """Milliseconds a step takes in a run of ``steps`` back-to-back steps (one sync at each end), the
    median over ``rounds`` runs: the training loop's own pace. It never syncs between steps, so the
    host launches step k+1 while the GPU still runs step k, which a per-step timing (``median_ms``,
    one sync per step) does not let it do; on a host-bound step the two differ."""
    def run() -> None:
        for _ in range(steps):
            step()
    return median_ms(run, rounds, warmup=0) / steps


@contextlib.contextmanager
def synchronizing_call_sites(debug_mode: bool) -> Iterator[dict[str, int]]:
    """Counts, by call site, the warnings torch's sync debug mode raises for each synchronizing CUDA
    call made inside the block (``debug_mode``: switch that mode on; CUDA only). Other warnings, such
    as the mode's own "prototype feature" notice, are not syncs and are not counted."""
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        site = "".join(traceback.format_stack(limit=9)[:-2]) + f"  -> {message}"
        sites[site] = sites.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if debug_mode:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if debug_mode:
                torch.cuda.set_sync_debug_mode("default")


def host_report(step, path: str, steps: int = 20) -> None:
    """Where the host waits: the call sites of every synchronizing CUDA call in 3 steps
    (``torch.cuda.set_sync_debug_mode``), then cProfile over ``steps`` steps by own time, to ``path``.
    A wait on the device is invisible to torch.profiler's op table (its overhead lets the device
    catch up), but it sets a host-bound step's pace."""
    import cProfile
    import io
    import pstats

    with synchronizing_call_sites(torch.cuda.is_available()) as sites:
        for _ in range(3):
            step()
    text = f"synchronizing calls in 3 steps: {sum(sites.values())}\n"
    text += "".join(f"--- x{n}\n{site}\n" for site, n in sorted(sites.items(), key=lambda x: -x[1]))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n" + out.getvalue())


def first_and_median(annealer, repeats: int) -> tuple[float, float]:
    """Seconds of the first step (with compile on, it compiles), then the median ms of the next ones."""
    t0 = time.perf_counter()
    annealer.train_step()
    first_s = time.perf_counter() - t0
    return first_s, median_ms(annealer.train_step, repeats, warmup=2)


def measure_batch(base, tok, calib, batch: int, args: argparse.Namespace, device: str,
                  hidden_weight: float = 0.0, compile: str = "off") -> list[dict]:
    autocast = {"device_type": device, "dtype": torch.bfloat16, "enabled": device == "cuda"}
    kd_model, kd = build(base, tok, calib, batch, args.seqlen, fixed=True, hidden_weight=hidden_weight,
                         compile=compile)
    kd_first_s, kd_ms = first_and_median(kd, args.repeats)
    kd_loop = loop_ms(kd.train_step)
    if args.host_report:
        host_report(kd.train_step, f"{args.host_report}.plain_kd_{compile}_hw{hidden_weight:g}.txt")
    busy: dict[str, float | None] = {}  # device-busy ms per step, from the profiles
    compiled = kd.compiled
    if args.profile:
        busy["plain_kd_gpu_busy_ms"] = profile_steps(
            kd.train_step, f"{args.profile}.plain_kd_{compile}_hw{hidden_weight:g}.txt", device, trace=args.trace)
    ids = kd.batches.batch(0).to(device)
    with torch.autocast(**autocast), torch.no_grad():
        teacher_ms = median_ms(lambda: kd.teacher(ids), args.repeats, warmup=2)
        fwd_ms = median_ms(lambda: logits_of(kd_model, ids), args.repeats, warmup=2)
        t_logits = kd.teacher(ids)
    with torch.autocast(**autocast):
        s_logits = logits_of(kd_model, ids).detach().requires_grad_()
    loss_ms = median_ms(lambda: kd_loss(s_logits, t_logits, ids)[0].backward(), args.repeats, warmup=2)

    def fwd_bwd() -> None:
        with torch.autocast(**autocast):
            logits_of(kd_model, ids).float().mean().backward()

    fwd_bwd_ms = median_ms(fwd_bwd, args.repeats, warmup=2)
    kd_model = kd = None  # free before building the next pair
    extra_cols: dict = {}
    # The soft loop is timed as users get it (outline_blocks="auto": regional where the loop compiles on
    # CUDA, flat on the CPU), and each other setting --outline lists that way too.
    auto_cfg = AnnealConfig.from_flat({"compile": compile, "outline_blocks": "auto"})
    auto = "regional" if auto_cfg.outlines(torch.device(device)) else "off"
    labels = {"off": "flat", "regional": "regional"}
    for other in [o for o in args.outline.split(",") if o and o != auto] if compile == "on" else []:
        _, alt = build(base, tok, calib, batch, args.seqlen, fixed=False, hidden_weight=hidden_weight,
                       compile=compile, outline=other)
        alt_first_s, alt_ms = first_and_median(alt, args.repeats)
        extra_cols.update({f"anneal_soft_{labels[other]}_ms": round(alt_ms, 2),
                           f"anneal_{labels[other]}_first_step_s": round(alt_first_s, 1)})
        alt = None
    _, sf = build(base, tok, calib, batch, args.seqlen, fixed=False, hidden_weight=hidden_weight, compile=compile,
                  outline="auto")
    sf_first_s, soft_ms = first_and_median(sf, args.repeats)
    soft_loop = loop_ms(sf.train_step)
    if args.host_report:
        host_report(sf.train_step, f"{args.host_report}.anneal_soft_{compile}_hw{hidden_weight:g}.txt", steps=10)
    extra_cols["soft_outlined"] = sf.compilation.outlined is not None  # False also where the outlined compile failed
    extra_cols["soft_auto_is"] = labels[auto]
    if args.profile:
        busy["anneal_soft_gpu_busy_ms"] = profile_steps(
            sf.train_step, f"{args.profile}.anneal_soft_{compile}_hw{hidden_weight:g}.txt", device, trace=args.trace)
    total = sf.total_steps
    sf.step = int(sf.cfg.schedule.anneal_end * total) + 1  # into the hardening phase
    assert schedule(sf.cfg, sf.step, total).blend > 0
    harden_ms = median_ms(sf.train_step, args.repeats, warmup=2)
    # the final phase (training with the hard mask), far enough from the end for every timed step
    sf.step = total - args.repeats - 2 - LOOP_STEPS * LOOP_ROUNDS - 4
    final_ms = median_ms(sf.train_step, args.repeats, warmup=2)
    final_loop = loop_ms(sf.train_step)
    tokens = batch * args.seqlen
    config = f"{args.model} b{batch}x{args.seqlen} hidden_weight={hidden_weight:g} compile={compile}"
    return [
        {"bench": "train_step", "config": config, "batch": batch, "seq": args.seqlen, "compile": compiled,
         "plain_kd_first_step_s": round(kd_first_s, 1), "anneal_first_step_s": round(sf_first_s, 1),
         "plain_kd_ms": round(kd_ms, 2), "anneal_soft_ms": round(soft_ms, 2), "anneal_harden_ms": round(harden_ms, 2),
         "anneal_final_ms": round(final_ms, 2), "soft_over_kd": round(soft_ms / kd_ms, 3),
         "harden_over_kd": round(harden_ms / kd_ms, 3), "kd_tokens_per_s": round(tokens / kd_ms * 1e3),
         "soft_tokens_per_s": round(tokens / soft_ms * 1e3),
         "plain_kd_loop_ms": round(kd_loop, 2), "anneal_soft_loop_ms": round(soft_loop, 2),
         "anneal_final_loop_ms": round(final_loop, 2), "soft_over_kd_loop": round(soft_loop / kd_loop, 3),
         **extra_cols,
         **{k: round(v, 2) for k, v in busy.items() if v is not None}},
        {"bench": "component", "config": config, "batch": batch, "seq": args.seqlen,
         "teacher_fwd_ms": round(teacher_ms, 2), "student_fwd_ms": round(fwd_ms, 2),
         "student_fwd_bwd_ms": round(fwd_bwd_ms, 2), "kd_loss_fwd_bwd_ms": round(loss_ms, 2)},
    ]


INTERLEAVED_STEPS = 24  # a multiple of importance_every (8): each round holds its share of probes and refreshes


def measure_interleaved(base, tok, calib, batch: int, args: argparse.Namespace, hidden_weight: float,
                        compile: str) -> dict:
    """The loops' own pace, side by side: the peer's plain KD step (logit KD, no layer-wise term), plain
    KD with SparseForge's loss, and SparseForge's soft-phase and hard-phase steps, each run for
    ``INTERLEAVED_STEPS`` back-to-back steps per round, round by round (interleaved: host or clock
    drift lands on all alike), medians over ``--rounds``. The soft and hard loops restart each round
    at the same step of their schedule, so every round times the same phase."""
    loops = {"peer": build(base, tok, calib, batch, args.seqlen, fixed=True, compile=compile)[1]}
    if hidden_weight:
        loops["same_loss"] = build(base, tok, calib, batch, args.seqlen, fixed=True, hidden_weight=hidden_weight,
                                   compile=compile)[1]
    for phase in ("soft", "final"):
        loops[phase] = build(base, tok, calib, batch, args.seqlen, fixed=False, hidden_weight=hidden_weight,
                             compile=compile, outline="auto")[1]
    soft, final = loops["soft"], loops["final"]
    starts = {"soft": soft.cfg.evidence.importance_every,  # past step 0, inside the soft phase for every timed step
              "final": final.total_steps - 2 * INTERLEAVED_STEPS}
    first_s = {}
    for name, ann in loops.items():  # the compiling first step, outside the timing
        ann.step = starts.get(name, 0)
        t = time.perf_counter()
        ann.train_step()
        first_s[name] = time.perf_counter() - t
    if not (schedule(soft.cfg, starts["soft"] + INTERLEAVED_STEPS, soft.total_steps).soft_phase
            and schedule(final.cfg, starts["final"], final.total_steps).blend >= 1.0):
        raise RuntimeError(f"a {soft.total_steps}-step schedule has no {INTERLEAVED_STEPS} soft steps after step "
                           f"{starts['soft']}: raise build()'s steps")

    def run(name: str):
        ann = loops[name]

        def steps() -> None:
            if name in starts:
                ann.step = starts[name]
            for _ in range(INTERLEAVED_STEPS):
                ann.train_step()
        return steps

    ms = interleaved_median_ms({name: run(name) for name in loops}, args.rounds, warmup=1)
    per_step = {name: value / INTERLEAVED_STEPS for name, value in ms.items()}
    row = {"bench": "train_loop", "config": f"{args.model} b{batch}x{args.seqlen} hidden_weight={hidden_weight:g} "
           f"compile={compile}", "batch": batch, "seq": args.seqlen, "hidden_weight": hidden_weight,
           "rounds": args.rounds, "steps_per_round": INTERLEAVED_STEPS, "soft_outlined": soft.compilation.outlined is not None,
           "plain_kd_ms": round(per_step["peer"], 2), "anneal_soft_ms": round(per_step["soft"], 2),
           "anneal_final_ms": round(per_step["final"], 2),
           "soft_over_plain_kd": round(per_step["soft"] / per_step["peer"], 3),
           "final_over_plain_kd": round(per_step["final"] / per_step["peer"], 3)}
    if "same_loss" in per_step:
        row.update(plain_kd_same_loss_ms=round(per_step["same_loss"], 2),
                   soft_over_same_loss=round(per_step["soft"] / per_step["same_loss"], 3))
    row.update({f"{name}_first_step_s": round(seconds, 1) for name, seconds in first_s.items()})
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-sizes", default="32,64")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timing", default="sequential",
                   help="comma list: sequential (per-step medians, loop pace, components, diagnostics, one loop "
                        "after another) and/or interleaved (bench=train_loop: the peer's plain KD, plain KD with "
                        "the same loss, SparseForge soft and hard loops, timed round by round)")
    p.add_argument("--rounds", type=int, default=7, help=f"interleaved: rounds of {INTERLEAVED_STEPS} back-to-back steps per loop")
    p.add_argument("--hidden-weights", default="0",
                   help="comma list: layer-wise distillation weights to time (both loops use the same loss)")
    p.add_argument("--compile", default="on,off", help="comma list: time the loops compiled and/or eager")
    p.add_argument("--outline", default="off,regional",
                   help="the soft loop is timed as users get it (outline_blocks auto: regional where it compiles "
                        "on CUDA); the other settings listed are timed too (first-step seconds and step time)")
    p.add_argument("--profile", default=None, metavar="PREFIX",
                   help="also write torch.profiler tables of 8 plain-KD and 8 soft-phase steps to PREFIX.*.txt")
    p.add_argument("--trace", action="store_true",
                   help="with --profile: also write a chrome trace (gzip) of two more steps of each loop")
    p.add_argument("--host-report", default=None, metavar="PREFIX",
                   help="also write where the host waits (synchronizing calls, cProfile) to PREFIX.*.txt")
    p.add_argument("--sample-batches", default="1024,4096")
    p.add_argument("--sample-steps", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    timings = set(args.timing.split(","))
    if not timings or not timings <= {"sequential", "interleaved"}:
        p.error(f"--timing {args.timing!r}: a comma list of sequential, interleaved")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=device)
    base, tok = loaded.model, loaded.tokenizer
    base.name_or_path = args.model
    calib = calibration_windows(tok, 4, 256, seed=0)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for hidden_weight in [float(w) for w in args.hidden_weights.split(",")]:
            for compile in args.compile.split(","):
                if "sequential" in timings:
                    rows += measure_batch(base, tok, calib, batch, args, device, hidden_weight, compile)
                    print(tabulate(rows[-2:], headers="keys", tablefmt="github"), flush=True)
                if "interleaved" in timings:
                    rows.append(measure_interleaved(base, tok, calib, batch, args, hidden_weight, compile))
                    print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    teacher = copy.deepcopy(base).eval()
    if device == "cuda":
        teacher = teacher.to(torch.bfloat16)
    for sb in [int(b) for b in args.sample_batches.split(",") if b]:
        prompts = torch.randint(0, base.config.vocab_size, (sb, 8))
        paths = ("forward", "static", "graphs") if device == "cuda" else ("forward", "static")
        for path in paths:  # the model's forward + DynamicCache, the static-cache decoder, its graphed steps
            for _ in range(2):
                t = time.perf_counter()
                sample_from_teacher(teacher, prompts, 8 + args.sample_steps, batch_size=sb, decode=path)
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t
            rows.append({"bench": "teacher_sampling", "config": f"{args.model} bf16, decode={path}", "batch": sb,
                         "steps": args.sample_steps, "ms_per_step": round(seconds / args.sample_steps * 1e3, 2),
                         "tokens_per_s": round(sb * args.sample_steps / seconds)})
            print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    write_results("step_time", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
