"""What every benchmark script shares: the results-file schema and timing helpers."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """The command that is running, as a user would type it (``python -m benchmarks.X ...`` for a module)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else f"python {shlex.quote(sys.argv[0])}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def git_commit() -> str:
    """The checkout's commit, ``-dirty`` when files differ from it (a rerun then needs that diff too)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def write_results(name: str, rows: list[dict], out: str | Path | None = None, extra: dict | None = None,
                  settings: dict | None = None) -> Path:
    """``benchmarks/results/NAME.json`` = {command, commit, settings, device, torch, date, rows} (flat rows);
    ``settings``: the resolved arguments, defaults included, so a rerun can be matched."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command_line(),
        "commit": git_commit(),
        "settings": settings or {},
        "device": device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
        "rows": rows,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _once_ms(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` after warm-up: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    return statistics.median(_once_ms(fn) for _ in range(repeats))


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each ``fns[name]()``, timed round by round (one call of each per round), so
    clock or thermal drift during the measurement lands on every variant alike instead of on the later one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once_ms(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def results_path(name: str, out: str | Path | None, smoke: bool) -> Path:
    """Where a run writes: ``--out``, else a temporary file for ``--smoke`` (a check, not a result), else
    ``results/NAME.json``."""
    if out:
        return Path(out)
    if smoke:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="sparseforge-smoke-")) / f"{name}.json"
    return RESULTS_DIR / f"{name}.json"


def time_variants(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each variant: CUDA-graph replays, interleaved round by round, on a GPU (device time
    only); interleaved perf_counter calls on the CPU (a smoke check: CPU times are no kernel speed)."""
    if torch.cuda.is_available():
        from sparseforge_compile.lowering.dispatch import graph_times_ms

        return dict(zip(fns, graph_times_ms([[fn] for fn in fns.values()], replays=repeats)))
    return interleaved_median_ms(fns, repeats)
