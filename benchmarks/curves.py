"""Summarize training curves (``metrics.jsonl`` of prune / accuracy.py runs): where each loss term stands
at the quarters of the run (with the steps per second since the previous quarter) and its mean over the
last tenth of the logged steps.

    python -m benchmarks.curves benchmarks/results/training_curves/trained_10min_*_metrics.jsonl

Prints one table; ``--out`` writes the rows (one per file and point) in the results schema. The point
of it: whether the loss is still falling at the end, and, where the run logged losses by data source
(``ce_real`` against ``teacher_ce_real``), whether the student fits the repeated C4 rows better than the
dense teacher does, i.e. memorizes them.

    python -m benchmarks.curves --paired A_metrics.jsonl B_metrics.jsonl [--windows 0,500,1000,2000,4000]

``--paired``: two runs of one seed draw the same batch at each step (``anneal.TrainingBatches``), so the
difference of their logged losses at equal steps is free of the batches' noise. Rows: per window of steps,
the mean difference A - B of each term, its standard error, and each run's LR at the window's last
common step (a budget run's schedule follows its time: at equal steps the slower run is further along).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tabulate import tabulate

TERMS = ("loss", "ce", "kl", "hidden", "ce_real", "teacher_ce_real", "kl_real", "ce_sampled", "kl_sampled")


def read_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no logged steps")
    return rows


def summarize(path: Path, tail: float = 0.1) -> list[dict]:
    """Rows at the first logged step, 1/4, 1/2, 3/4 and the last, then the last ``tail`` share's mean."""
    rows = read_rows(path)
    terms = [t for t in TERMS if t in rows[-1]]
    n = len(rows)
    out, prev = [], None
    for label, i in (("first", 0), ("1/4", n // 4), ("1/2", n // 2), ("3/4", 3 * n // 4), ("last", n - 1)):
        row = {"file": path.name, "point": label, "step": rows[i]["step"],
               **{t: round(rows[i][t], 4) for t in terms if t in rows[i]}}
        if prev is not None and "elapsed_s" in rows[i] and rows[i]["elapsed_s"] > rows[prev]["elapsed_s"]:
            # training speed since the previous point (steps per second of the run's clock)
            row["steps_per_s"] = round((rows[i]["step"] - rows[prev]["step"])
                                       / (rows[i]["elapsed_s"] - rows[prev]["elapsed_s"]), 2)
        out.append(row)
        prev = i
    last = rows[-max(1, round(n * tail)):]
    out.append({"file": path.name, "point": f"mean of last {len(last)}", "step": last[-1]["step"],
                **{t: round(statistics.fmean(r[t] for r in last if t in r), 4) for t in terms}})
    return out


def paired(a: Path, b: Path, windows: list[int], terms: tuple[str, ...] = ("kl", "loss")) -> list[dict]:
    """Mean difference a - b of ``terms`` at the steps both runs logged, per window of steps."""
    ra = {r["step"]: r for r in read_rows(a)}
    rb = {r["step"]: r for r in read_rows(b)}
    common = sorted(set(ra) & set(rb))
    if not common:
        raise SystemExit(f"{a} and {b} logged no step in common")
    out = []
    for lo, hi in zip(windows, windows[1:] + [common[-1]]):
        steps = [s for s in common if lo < s <= hi]
        if not steps:
            continue
        row = {"a": a.name, "b": b.name, "steps": f"{lo + 1}-{steps[-1]}", "n": len(steps)}
        for t in terms:
            diffs = [ra[s][t] - rb[s][t] for s in steps if t in ra[s] and t in rb[s]]
            if diffs:
                row[f"{t}_a_minus_b"] = round(statistics.fmean(diffs), 5)
                row[f"{t}_stderr"] = round(statistics.stdev(diffs) / len(diffs) ** 0.5, 5) if len(diffs) > 1 else None
        row["lr_a"], row["lr_b"] = ra[steps[-1]].get("lr"), rb[steps[-1]].get("lr")
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--tail", type=float, default=0.1, help="share of the logged steps averaged at the end")
    p.add_argument("--out", default=None, help="also write the rows (benchmarks/results schema)")
    p.add_argument("--paired", action="store_true", help="two files of one seed: their losses' difference at equal steps")
    p.add_argument("--windows", default="0,500,1000,2000,3000", help="--paired: window starts, in steps")
    args = p.parse_args(argv)
    if args.paired:
        if len(args.files) != 2:
            raise SystemExit("--paired takes exactly two metrics files")
        rows = paired(*args.files, [int(w) for w in args.windows.split(",")])
    else:
        rows = [row for path in args.files for row in summarize(path, args.tail)]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.out:
        from common import write_results

        write_results("curves", rows, out=args.out, settings=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
