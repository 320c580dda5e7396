"""Teacher-sampling speed at whole rows, by sampling batch: what the trained methods' budget pays for text.

    python -m benchmarks.sample_rate [--model smollm2-135m] [--batches 3840,4096] [--length 512] [--repeats 2]

Each call samples one batch of ``--length``-token rows from 8-token C4 prompts, as the prune does
(``training._teacher_samples``: bf16 teacher on a GPU, ``decode="auto"``), timed whole (graph capture
included, as in a run); the batch sizes take turns, ``--repeats`` rounds, and the rows report the median.
Why: on the H200, 10-minute runs that sampled 4096 rows at once spent ~40 s more in their sampling phase
than those at 3932; measured here in isolation (results/sample_rate.json) the two sample at the same speed,
so the batch size is not the cause (``distill.MAX_SAMPLE_BATCH``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from benchmarks.common import write_results
from sparseforge_compile.data import token_stream
from sparseforge_compile.distill import sample_from_teacher
from sparseforge_compile.models import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", default="3840,4096", help="sampling batch sizes (rows at once), comma-separated")
    p.add_argument("--length", type=int, default=512, help="tokens per row, prompt included")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loaded = load_model(args.model)
    teacher = loaded.model.to(args.device).eval().requires_grad_(False)
    if args.device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)  # as prepare_training's teacher
    stream = token_stream(loaded.tokenizer)
    gen = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",") if b]
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for batch in batches:
            starts = torch.randint(0, stream.numel() - 8, (batch,), generator=gen)
            prompts = torch.stack([stream[s : s + 8] for s in starts.tolist()])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            rows = sample_from_teacher(teacher, prompts, args.length, batch_size=batch)
            seconds[batch].append(time.perf_counter() - t)
            assert rows.shape == (batch, args.length)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # each size starts from the same allocator state
    rows = [{"bench": "teacher_sampling", "config": f"{args.model} whole rows, decode=auto", "batch": b,
             "length": args.length, "seconds_median": round(statistics.median(s), 2),
             "seconds_all": [round(x, 2) for x in s],
             "tokens_per_s": round(b * args.length / statistics.median(s))} for b, s in seconds.items()]
    write_results("sample_rate", rows, args.out, settings=vars(args))
    print(tabulate([{k: v for k, v in r.items() if k != "seconds_all"} for r in rows], headers="keys"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
