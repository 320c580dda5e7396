"""FSDP2 annealing (``sharding.py``) over 2 gloo ranks equals one process at twice the batch: the same
masks and weights within the data-parallel tolerance, a killed run resumes to the same result, and the
row gather's backward averages the mask gradient over ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import WEIGHT_TOL, _join, _port, _same, run

SF = {"warm_start": "sparsegpt", "hidden_weight": 3.0, "teacher_data_ratio": 0.0}


@pytest.mark.parametrize("method,model,extra", [("sparseforge", "tiny-llama", SF),
                                                ("sparsegpt+kd", "tiny-llama", {"teacher_data_ratio": 0.0}),
                                                ("sparseforge", "tiny-gpt2", SF)])  # Conv1D: sharded on dim 1
def test_fsdp2_two_ranks_equal_one_process_at_twice_the_batch(tmp_path, method, model, extra):
    one = run(1, tmp_path, "one", method, model=model, **extra)[0]
    two = run(2, tmp_path, "two", method, model=model, parallel="fsdp2", **extra)
    _same(two[0], two[1], 0.0)  # gathered back, every rank holds the one model
    _same(one, two[0], WEIGHT_TOL)
    for a, b in zip(one["history"], two[0]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        # undecided: a group whose soft mask sits at the 0.1 / 0.9 cut may count on one side or the other
        assert a["flips"] == b["flips"] and a["undecided"] == pytest.approx(b["undecided"], abs=1e-3)
    if method == "sparseforge":
        assert any(row["flips"] for row in one["history"][:4]), "the soft phase flipped nothing: the test shows little"


def test_fsdp2_killed_run_resumes_to_the_same_result(tmp_path):
    extra = {"warm_start": "wanda", "hidden_weight": 0.0, "teacher_data_ratio": 0.5, "checkpoint_every": 3,
             "parallel": "fsdp2"}
    whole = run(2, tmp_path, "whole", **extra)
    run(2, tmp_path, "cut", crash_at=5, **extra)
    folder = tmp_path / "cut" / "checkpoint"
    assert (folder / "state.pt").exists() and (folder / "state.rank1.pt").exists()  # each rank's shards
    assert torch.load(folder / "state.pt", weights_only=True)["shards"] == 2
    with pytest.raises(Exception, match="holds shards for 2 ranks and this run is sharded over 1 ranks"):
        run(1, tmp_path, "cut", resume=True, global_batch=2, **extra)  # the same per-rank batch
    resumed = run(2, tmp_path, "cut", resume=True, **extra)
    _same(whole[0], resumed[0], 0.0)
    _same(resumed[0], resumed[1], 0.0)
    assert not folder.exists()  # the finished run dropped every rank's training state


def _gather(rank: int, world: int, port: int) -> None:
    from sparseforge_compile.distributed import current
    from sparseforge_compile.sharding import gather_rows, row_range

    _join(rank, world, port)
    try:
        ranks = current()
        gen = torch.Generator().manual_seed(0)
        whole = torch.randn(5, 8, generator=gen)  # 5 rows over 2 ranks: 3 and 2
        upstream = torch.randn(world, 5, 8, generator=gen)  # each rank's gradient of the gathered tensor
        start, end = row_range(5, rank, world)
        assert (start, end) == ((0, 3), (3, 5))[rank]
        local = whole[start:end].clone().requires_grad_()
        gathered = gather_rows(local, 5, ranks)
        assert torch.equal(gathered, whole)
        (gathered * upstream[rank]).sum().backward()
        # the rank-mean gradient of this rank's rows: what one process on the whole batch would see
        assert torch.allclose(local.grad, upstream.mean(0)[start:end], rtol=1e-6, atol=1e-7)

        # The masked Linear (also GPT-2's transposed Conv1D layout): the plain computation's output and
        # gradients, the mask's averaged over ranks as the loss of the global batch averages them.
        from sparseforge_compile.sharding import _MaskedLinear

        for transposed, autocast in ((False, False), (True, False), (False, True)):
            module = torch.nn.Linear(8, 5)
            if transposed:
                module.weight = torch.nn.Parameter(module.weight.detach().t().contiguous())
            x = torch.randn(world, 3, 8, generator=gen)  # each rank's batch
            mask = torch.rand(5, 8, generator=gen)
            local = mask[start:end].clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = _MaskedLinear.apply(x[rank], module.weight, module.bias, local, module, 5, ranks, transposed)
            (y.float() * upstream[rank, :3, :5]).sum().backward()
            ref_w = module.weight.detach().clone().requires_grad_()
            ref_b = module.bias.detach().clone().requires_grad_()
            ref_m = mask.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                ref_y = torch.nn.functional.linear(x[rank], (ref_w.t() if transposed else ref_w) * ref_m, ref_b)
            assert y.dtype == ref_y.dtype and torch.allclose(y, ref_y, atol=1e-6)
            (ref_y.float() * upstream[rank, :3, :5]).sum().backward()
            tol = 2e-2 if autocast else 1e-6  # bf16 products summed in another order
            assert torch.allclose(module.weight.grad, ref_w.grad, atol=tol)
            assert torch.allclose(module.bias.grad, ref_b.grad, atol=tol)
            mean = ref_m.grad.clone()
            dist.all_reduce(mean)
            assert torch.allclose(local.grad, (mean / world)[start:end], atol=tol)
    finally:
        dist.destroy_process_group()


def test_row_gather_averages_the_mask_gradient_over_ranks():
    mp.spawn(_gather, args=(2, _port()), nprocs=2, join=True)
    assert [__import__("sparseforge_compile.sharding", fromlist=["row_range"]).row_range(6, r, 4)
            for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 6)]
