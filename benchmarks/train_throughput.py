"""Training tokens per second: SparseForge and the SparseGPT + KD peer, with the throughput settings off
and on, side by side in one run; then data-parallel scaling over ``--gpus`` (rows ``bench: "scaling"``).

Every measurement is its own process (a fresh CUDA context, torchrun for several GPUs): a run of
``--steps`` steps through ``sparsify``, tokens per second the median of the per-step rates logged after
``--warmup`` steps (compilation and the first probes excluded), over the global batch.

    python -m benchmarks.train_throughput                   # SmolLM2, 32 x 512 per GPU, 1 GPU
    python -m benchmarks.train_throughput --gpus 1,2,4,8    # + scaling rows
    python -m benchmarks.train_throughput --gpus 1,2 --parallel fsdp2   # the scaling rows sharded
    python -m benchmarks.train_throughput --model llama-7b-shape:8 --settings '' --gpus 8 --parallel fsdp2 \
        --methods sparseforge --batch-size 8   # 8 LLaMA-7B-shaped blocks (random init) sharded over 8 GPUs
    python -m benchmarks.train_throughput --smoke           # CPU, tiny model, gloo: checks the script only

``--smoke`` runs end to end on the CPU; its numbers are no speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The throughput settings off, one at a time, and together (the fused KD loss, measured slower on an
# H100, is a memory option: results/train_throughput_h100.json).
SETTINGS = {"before": {"cuda_graphs": "off"}, "graphs": {"cuda_graphs": "on"},
            "batch": {"cuda_graphs": "off", "batch_size": "auto"}, "after": {"cuda_graphs": "on", "batch_size": "auto"}}
METHODS = ("sparseforge", "sparsegpt+kd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default smollm2-135m (tiny-llama with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per GPU (default 32; 2 with --smoke)")
    p.add_argument("--seqlen", type=int, default=None, help="default 512 (32 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="default 40 (4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the rate (default 10; 1 with --smoke)")
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts for the scaling rows, e.g. 1,2,4,8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"the settings rows, of {', '.join(SETTINGS)} (empty: the scaling rows only)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp2"],
                   help="how the scaling rows split the model over GPUs (fsdp2: sharded, eager)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, gloo processes: the script runs")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON of one measurement (internal)
    args = p.parse_args(argv)
    small = args.smoke
    args.model = args.model or ("tiny-llama" if small else "smollm2-135m")
    args.batch_size = args.batch_size or (2 if small else 32)
    args.seqlen = args.seqlen or (32 if small else 512)
    args.steps = args.steps or (4 if small else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 10)
    unknown = [name for name in args.settings.split(",") if name and name not in SETTINGS]
    if unknown:
        p.error(f"--settings {unknown[0]}: choose from {', '.join(SETTINGS)}")
    return args


def worker(spec: dict) -> None:
    """One measurement, in this process (under torchrun when ``spec["gpus"] > 1``)."""
    import torch

    from sparseforge_compile import distributed
    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.models import load_model
    from sparseforge_compile.pipeline import SparsifyConfig, sparsify

    device = spec["device"]
    ranks = None
    if distributed.launched():
        ranks, device = distributed.init_from_env(device)
    try:
        # Sharded, each rank moves only its shards to its GPU: the model, possibly larger than one, waits on the CPU.
        sharded = ranks is not None and spec["settings"].get("parallel") == "fsdp2"
        loaded = load_model(spec["model"], device="cpu" if sharded else device)
        anneal = AnnealConfig.from_flat({"steps": spec["steps"], "batch_size": spec["batch_size"],
                                         "seqlen": spec["seqlen"], "log_every": 1, "warm_start": "magnitude",
                                         "teacher_data_ratio": 0.0, **spec["settings"],
                                         **({"compile": "off", "autocast": "off"} if device == "cpu" else {})})
        cfg = SparsifyConfig(method=spec["method"], budget_s=None, calib_samples=8, calib_seqlen=spec["seqlen"],
                             anneal=anneal)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = sparsify(loaded.model, cfg, tokenizer=loaded.tokenizer, data_dir=spec["data_dir"], progress=False)
        rates = [row["tokens_per_s"] for row in result.anneal.history if row["step"] > spec["warmup"]]
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        if ranks is None or ranks.main:
            Path(spec["result"]).write_text(json.dumps({
                "tokens_per_s": statistics.median(rates), "steps": result.anneal.steps,
                "batch_per_gpu": result.batch_size,
                "compiled": result.anneal.compiled, "peak_gib_per_gpu": peak / 2**30 if peak else None}))
    finally:
        distributed.shutdown()


def measure(args: argparse.Namespace, method: str, settings: dict, gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        spec = {"model": args.model, "method": method, "settings": settings, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size, "seqlen": args.seqlen,
                "data_dir": args.data_dir, "device": "cpu" if args.smoke else "cuda", "result": str(result)}
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", json.dumps(spec)]
        if gpus > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                   "-m", "benchmarks.train_throughput", "--worker", json.dumps(spec)]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.smoke else {})}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            raise SystemExit(f"{method} {settings} on {gpus} GPU(s) failed:\n{run.stderr[-4000:]}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> Path:
    from benchmarks.common import results_path, write_results

    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return Path()
    gpus = [int(g) for g in args.gpus.split(",")] if not args.smoke else [1, 2]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    names = [name for name in args.settings.split(",") if name]
    for method in methods:
        for name in names:
            settings = SETTINGS[name]
            r = measure(args, method, settings, 1)
            rows.append({"bench": "settings", "method": method, "settings": name, **settings, "gpus": 1,
                         "seqlen": args.seqlen, **r})
            print(json.dumps(rows[-1]))
    if gpus != [1] or not names:
        base = None
        for g in gpus:
            r = measure(args, methods[0], {"parallel": args.parallel}, g)
            base = base or (r["tokens_per_s"] if g == 1 else None)
            rows.append({"bench": "scaling", "method": methods[0], "parallel": args.parallel, "gpus": g,
                         "seqlen": args.seqlen, **r,
                         "speedup": r["tokens_per_s"] / base if base else None})
            print(json.dumps(rows[-1]))
    name = f"train_throughput_{args.model}" + ("_smoke" if args.smoke else "")
    path = write_results(name, rows, results_path(name, args.out, args.smoke), settings=vars(args))
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    main()
