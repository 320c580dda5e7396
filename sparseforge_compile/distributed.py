"""Annealing on many processes with ``torch.distributed``: what SparseForge adds to data parallelism.

Launched by ``torchrun`` (or ``prune --nproc N``, which runs torchrun itself), every process holds a
replica and trains on its share of each global batch (``--batch-size`` is per process). On top of the
gradient average, each piece the loop keeps must agree across ranks, or the masks drift apart:

* batches: every rank builds the global batch from the shared seed and takes rows ``rank::world``
  (each rank the same mix of teacher-sampled and real rows), so N ranks at batch b train on what one
  process at batch N*b trains on;
* the Fisher probe: labels sampled per row from a generator seeded by the row's *global* index, and
  the batch-mean mask gradient averaged over ranks *before* it is squared (the square of a mean is not
  the mean of squares); Hutchinson's probe vector is the same on every rank, its estimate averaged;
* the loss and its parts ride with the gradients in one all-reduce: the logged loss is the global
  batch's, and a non-finite step on one rank is non-finite on all;
* the budget clock and the stop decision are agreed (max of the seconds spent, all ranks must agree
  to go on), so the schedule's phases change on the same step everywhere;
* calibration statistics of the warm start (SparseGPT's ``2/n X X^T``, Wanda's norms) are summed over
  ranks, each rank running a share of the calibration windows;
* rank 0 alone writes metrics, checkpoints and the pruned model.

The loop runs two modules over the same parameters (the masked graph, then the plain model), which
``DistributedDataParallel``'s one-module reducer cannot both own: gradients are averaged here, in
flat buckets after the backward.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 64 << 20  # per all-reduce: large enough to reach bus bandwidth, small enough to stay cheap
SEED_STRIDE = 1_000_003  # rank offsets of per-rank seeds (teacher samples)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job, and the collectives the loop needs."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- small agreements -----------------------------------------------------------------------
    def agree(self, value: float, op: str = "max") -> float:
        """``value`` reduced over ranks (max, min or sum): one scalar all-reduce."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
        return float(t.item())

    def all(self, flag: bool) -> bool:
        """True where every rank says True."""
        return self.agree(1.0 if flag else 0.0, "min") > 0.5

    def max_(self, t: torch.Tensor) -> None:
        """Elementwise max of ``t`` over ranks, in place."""
        comm = t.to(self._comm_device())
        dist.all_reduce(comm, op=dist.ReduceOp.MAX)
        t.copy_(comm)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- tensors ---------------------------------------------------------------------------------
    @torch.no_grad()
    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over ranks in place, in flat buckets per dtype."""
        self._reduce_(list(tensors), 1.0 / self.world)

    @torch.no_grad()
    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        self._reduce_(list(tensors), 1.0)

    def _reduce_(self, tensors: list[torch.Tensor], scale: float) -> None:
        if self.world == 1:
            return
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for group in by_kind.values():
            for bucket in _buckets(group):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                comm = flat.to(self._comm_device())
                dist.all_reduce(comm)
                if scale != 1.0:
                    comm.mul_(scale)
                offset = 0
                for t in bucket:
                    t.copy_(comm[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        for t in tensors:
            comm = t.detach().to(self._comm_device())
            dist.broadcast(comm, src)
            t.copy_(comm)

    def shard_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: ``rows[rank::world]``."""
        if rows.shape[0] < self.world:
            raise ValueError(f"{rows.shape[0]} rows cannot be split over {self.world} ranks: give at least "
                             f"{self.world} (more calibration samples or a larger batch)")
        return rows[self.rank:: self.world]

    def gather_rows(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Every rank's rows, concatenated in rank order (ranks may hold different counts, or none)."""
        count = 0 if rows is None else rows.shape[0]
        counts = [None] * self.world
        dist.all_gather_object(counts, (count, None if rows is None else tuple(rows.shape[1:]),
                                        None if rows is None else str(rows.dtype).removeprefix("torch.")))
        shapes = [c for c in counts if c[0]]
        if not shapes:
            return None
        tail, dtype = shapes[0][1], getattr(torch, shapes[0][2])
        most = max(c[0] for c in counts)
        padded = torch.zeros((most, *tail), dtype=dtype, device=self._comm_device())
        if count:
            padded[:count] = rows.to(padded.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: c[0]] for p, c in zip(parts, counts)]).to(rows.device if rows is not None else "cpu")

    def gradient_sync(self, params: Sequence[nn.Parameter]) -> GradientSync:
        return GradientSync(self, params)

    @torch.no_grad()
    def block_energy(self, teacher_blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each teacher block output's mean square over the global batch (the layer-wise loss's normalizer)."""
        energy = torch.stack([t.detach().float().square().mean() for t in teacher_blocks])
        self.mean_([energy])
        return list(energy.unbind())

    # -- the Fisher probe -------------------------------------------------------------------------
    def global_rows(self, local_rows: int) -> list[int]:
        """Global batch indices of this rank's ``local_rows`` rows (``rank::world``)."""
        return [self.rank + j * self.world for j in range(local_rows)]

    def row_race(self, logits: torch.Tensor, seed: int) -> torch.Tensor:
        """Exponential race noise for a (rows, seq, vocab) block, each row from a generator seeded by its
        global index: the same samples whatever the number of ranks."""
        race = torch.empty_like(logits)
        for j, g in enumerate(self.global_rows(logits.shape[0])):
            gen = torch.Generator(device=logits.device).manual_seed(seed * SEED_STRIDE + g)
            race[j].exponential_(generator=gen)
        return race


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, current, size = [], [], 0
    for t in tensors:
        if current and size + t.numel() * t.element_size() > BUCKET_BYTES:
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel() * t.element_size()
    if current:
        out.append(current)
    return out


class RankBatches:
    """This rank's rows (``rank::world``) of the global batch that ``TrainingBatches`` at ``world`` x
    the per-rank batch size builds: the same rows, in the same order of sources, on every world size."""

    def __init__(self, stream: torch.Tensor, teacher_rows: torch.Tensor | None, cfg, ranks: Ranks) -> None:
        from .anneal.batches import TrainingBatches

        self.ranks = ranks
        self.glob = TrainingBatches(stream, teacher_rows, cfg.replace(batch_size=cfg.runtime.batch_size * ranks.world))
        # Teacher-sampled rows lead the global batch; rows rank::world keep them leading locally.
        self.n_teacher = len(range(ranks.rank, self.glob.n_teacher, ranks.world))

    @property
    def stream(self) -> torch.Tensor:
        return self.glob.stream

    @property
    def teacher(self) -> torch.Tensor | None:
        return self.glob.teacher

    def batch(self, step: int) -> torch.Tensor:
        return self.ranks.shard_rows(self.glob.batch(step))


class GradientSync:
    """Averages the gradients of ``params`` over ranks after a backward, with scalars riding along."""

    def __init__(self, ranks: Ranks, params: Sequence[nn.Parameter]) -> None:
        self.ranks, self.params = ranks, list(params)
        ranks.broadcast_([p.data for p in self.params])  # start from rank 0's replica, as DDP does

    @torch.no_grad()
    def __call__(self, scalars: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Average every gradient and ``scalars`` (returned averaged, as new tensors). A parameter whose
        gradient is None on this rank but not on another gets a zero one: every rank updates it alike."""
        device = self.params[0].device
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=device)
        self.ranks.max_(present)
        for p, has in zip(self.params, present.tolist()):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params if p.grad is not None]
        packed = torch.stack([s.detach().float().to(device) for s in scalars]) if scalars else None
        self.ranks.mean_(grads + ([packed] if packed is not None else []))
        return list(packed.unbind()) if packed is not None else []


# -- process group ---------------------------------------------------------------------------------

def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Ranks | None:
    """This process's :class:`Ranks` where a process group is up, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), local, device)


def init_from_env(device: str = "auto") -> tuple[Ranks, str]:
    """Join the job torchrun started: NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU. Returns the
    ranks and the device string this process trains on."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but CUDA is not available here: use --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                **({"device_id": torch.device(device)} if cuda else {}))
    ranks = current()
    assert ranks is not None
    return ranks, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(argv: Sequence[str], nproc: int, nnodes: str | None = None, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """The command that reruns ``sparseforge-compile argv`` under torchrun on ``nproc`` processes per node
    (multi-node: torchrun's rendezvous flags)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes:
        cmd.append(f"--nnodes={nnodes}")
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif not nnodes or nnodes == "1":
        cmd.append("--standalone")
    return [*cmd, "-m", "sparseforge_compile.cli", *argv]


def strip_launch_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's own flags (``--nproc``, ``--nnodes``, ``--node-rank``,
    ``--rdzv-endpoint``), as the processes torchrun starts must not launch again."""
    flags = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        out.append(arg)
    return out


# -- warm start ------------------------------------------------------------------------------------

@torch.no_grad()
def reduce_input_stats(collected: dict) -> None:
    """Sum one-shot calibration statistics (``methods.input_stats.LayerInputStats``) over ranks, each of
    which ran a share of the windows: every rank then solves the same layers from the same statistics.
    Nothing happens in a single process."""
    ranks = current()
    if ranks is None or ranks.world == 1:
        return
    names = sorted(collected)
    counts = torch.tensor([[collected[n].nsamples, collected[n].ntokens] for n in names], dtype=torch.float64)
    local = counts.clone()
    ranks.sum_([counts])
    # Each statistic is a running mean over this rank's sequences: back to sums, summed, then over all.
    tensors = []
    for i, n in enumerate(names):
        s = collected[n]
        if s._gram is None and s._sq_norms is None:  # no window reached it here: zeros, as the others sum
            s._allocate(ranks.device)
        for attr in ("_gram", "_sq_norms"):
            value = getattr(s, attr)
            if value is not None:
                value.mul_(float(local[i, 0]))
                tensors.append(value)
    ranks.sum_(tensors)
    for i, n in enumerate(names):
        s = collected[n]
        s.nsamples, s.ntokens = int(counts[i, 0]), int(counts[i, 1])
        for attr in ("_gram", "_sq_norms"):
            value = getattr(s, attr)
            if value is not None and s.nsamples:
                value.div_(s.nsamples)
