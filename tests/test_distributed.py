"""Annealing over torch.distributed ranks (gloo, CPU processes) equals one process on the whole batch.

Each case spawns fresh processes (``torch.multiprocessing.spawn``): 2 ranks at batch b against a world of
one at batch 2b, on ``tiny-llama`` with synthetic C4-shaped text (CI has no data folder).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_digest import synthetic_data

# Soft phase for steps 0-3 (probes at 0 and 2), hardening 4-5, plain hard-mask training 6-7.
ANNEAL = dict(steps=8, seqlen=32, lr=3e-3, warmup_frac=0.1, importance="fisher", importance_every=2,
              evidence_probes=2, t_start=0.3, t_end=0.02, anneal_end=0.5, harden_end=0.75, prior_margin=0.5,
              prior_floor=0.5, seed=0, autocast="off", compile="off", log_every=1)
# Float summation order differs (two half-batch gradients averaged vs one batch), and AdamW's normalized
# update turns that into up to lr-sized steps where a gradient is near 0: a sixth of one step (lr 3e-3).
WEIGHT_TOL = 5e-4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _prune(rank: int, world: int, port: int, data_dir: str, out: str, method: str, global_batch: int,
           extra: dict, crash_at: int | None, resume: bool, model_name: str) -> None:
    from sparseforge_compile.anneal import AnnealConfig, Annealer
    from sparseforge_compile.models import ByteTokenizer, tiny_model
    from sparseforge_compile.pipeline import SparsifyConfig, sparsify

    _join(rank, world, port)
    try:
        if crash_at is not None:  # the job dies (every rank) once the step counter reaches crash_at
            step = Annealer.train_step

            def dying(self):
                if self.step == crash_at:
                    raise KeyboardInterrupt
                return step(self)
            Annealer.train_step = dying
        model = tiny_model(model_name, seed=0)
        for module in model.modules():  # GPT-2's dropout: ranks and one process would draw different masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        cfg = SparsifyConfig(method=method, budget_s=None, calib_samples=4, calib_seqlen=32, teacher_sample_rows=4,
                             teacher_sample_batch=2, kernel_constraints=None,
                             anneal=AnnealConfig.from_flat({**ANNEAL, "batch_size": global_batch // world, **extra}))
        try:
            result = sparsify(model, cfg, tokenizer=ByteTokenizer(), data_dir=data_dir, progress=False,
                              out_dir=out, resume=resume)
        except KeyboardInterrupt:
            return
        weights = {n: model.get_submodule(n).weight.detach().clone() for n in result.layers}
        torch.save({"weights": weights, "history": result.anneal.history, "flips": result.anneal.flips_vs_warm_start},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(world: int, tmp: Path, name: str, method: str = "sparseforge", global_batch: int = 4,
        crash_at: int | None = None, resume: bool = False, model: str = "tiny-llama", **extra) -> list[dict]:
    data = synthetic_data(tmp / "data")
    out = tmp / name
    out.mkdir(exist_ok=True)
    mp.spawn(_prune, args=(world, _port(), str(data), str(out), method, global_batch, extra, crash_at, resume, model),
             nprocs=world, join=True)
    if crash_at is not None:
        return []
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _same(a: dict, b: dict, tol: float) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        wa, wb = a["weights"][n], b["weights"][n]
        assert torch.equal(wa != 0, wb != 0), f"{n}: masks differ"
        assert torch.allclose(wa, wb, atol=tol, rtol=0), f"{n}: max |diff| {float((wa - wb).abs().max())}"
    assert a["flips"] == b["flips"]


@pytest.mark.parametrize("method,extra", [("sparseforge", {"warm_start": "sparsegpt", "hidden_weight": 3.0,
                                                           "teacher_data_ratio": 0.0}),
                                          ("sparsegpt+kd", {"teacher_data_ratio": 0.0})])
def test_two_ranks_equal_one_rank_at_twice_the_batch(tmp_path, method, extra):
    one = run(1, tmp_path, "one", method, **extra)[0]
    two = run(2, tmp_path, "two", method, **extra)
    _same(two[0], two[1], 0.0)  # the ranks hold one model
    _same(one, two[0], WEIGHT_TOL)
    steps = [row["step"] for row in one["history"]]
    assert steps == list(range(1, 9))
    for a, b in zip(one["history"], two[0]["history"]):  # the logged loss is the global batch's
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["flips"] == b["flips"] and a["temperature"] == b["temperature"]
    if method == "sparseforge":
        assert any(row["flips"] for row in one["history"][:4]), "the soft phase flipped nothing: the test shows little"


def test_killed_run_resumes_to_the_same_result(tmp_path):
    extra = {"warm_start": "wanda", "hidden_weight": 0.0, "teacher_data_ratio": 0.5, "checkpoint_every": 3}
    whole = run(2, tmp_path, "whole", **extra)
    run(2, tmp_path, "cut", crash_at=5, **extra)
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").exists()
    resumed = run(2, tmp_path, "cut", resume=True, **extra)
    _same(whole[0], resumed[0], 0.0)
    _same(resumed[0], resumed[1], 0.0)


def _collectives(rank: int, world: int, port: int) -> None:
    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.anneal.evidence import FisherEvidence
    from sparseforge_compile.distributed import Ranks, current, reduce_input_stats
    from sparseforge_compile.masks import MaskState, NMPattern
    from sparseforge_compile.methods.input_stats import LayerInputStats

    _join(rank, world, port)
    try:
        ranks = current()
        assert (ranks.rank, ranks.world) == (rank, world)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 6, 8, generator=gen)  # the global batch: (rows, seq, features)
        w = torch.randn(16, 8, generator=gen)
        cfg = AnnealConfig.from_flat({"importance_beta": 0.5, "seed": 3})

        # Fisher evidence: ranks average the batch-mean mask gradient, then square it.
        def probe(rows: torch.Tensor, on: Ranks | None) -> torch.Tensor:
            ms = MaskState(w.shape, NMPattern(2, 4), "layer")
            ms.importance_beta = 0.5
            ms.collecting = True
            evidence = FisherEvidence(cfg, {"layer": ms})
            evidence.ranks = on
            logits = rows @ (w * ms.make_mask()).t()
            evidence.probe_step(5, logits)
            return ms.importance.clone()

        local = probe(ranks.shard_rows(x), ranks)
        whole = probe(x, Ranks(0, 1, 0, torch.device("cpu")))  # one process, the same per-row labels
        assert torch.allclose(local, whole, rtol=1e-5, atol=1e-9), float((local - whole).abs().max())

        # Warm-start statistics summed over ranks equal one process's over all windows.
        s_local, s_whole = LayerInputStats(8, layer="l"), LayerInputStats(8, layer="l")
        for i in range(rank, 4, world):
            s_local.add_batch(x[i: i + 1])
        for i in range(4):
            s_whole.add_batch(x[i: i + 1])
        reduce_input_stats({"l": s_local})
        assert s_local.nsamples == 4
        assert torch.allclose(s_local.hessian, s_whole.hessian, rtol=1e-5)
        assert torch.allclose(s_local.feature_norms(), s_whole.feature_norms(), rtol=1e-5)

        # Ranks holding different row counts (teacher samples under a time limit) gather in rank order.
        mine = torch.full((rank + 1, 3), rank, dtype=torch.long)
        assert ranks.gather_rows(mine).tolist() == [[0] * 3, [1] * 3, [1] * 3]
        assert ranks.agree(rank, "max") == world - 1 and not ranks.all(rank == 0)
    finally:
        dist.destroy_process_group()


def test_collectives_match_one_process():
    mp.spawn(_collectives, args=(2, _port()), nprocs=2, join=True)
