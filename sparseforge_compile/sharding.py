"""Annealing a model sharded over ranks with FSDP2 (``fully_shard``), for models whose student, teacher,
optimizer and mask state do not fit one GPU.

What changes against data parallelism (``distributed.py``):

* the student trained is a copy of the model, ``fully_shard``-ed per decoder block (the teacher too,
  forward only); the model itself, and the captured graph that holds its parameters, stay where they
  are, untouched until the run ends and :meth:`ShardedTraining.gather_into` writes the result back;
* the masked forward is the Hugging Face module with every pruned Linear computing ``W * mask``: the
  exported graph holds references to the unsharded parameters and cannot follow ``fully_shard``;
* each layer's mask state (scores, importance, EMAs) holds this rank's rows of the weight, the rows
  FSDP2 keeps here (``torch.chunk`` over dim 0). Every mask operation is row-local (N:M groups run
  along the input dimension), except the layer's mean saliency, which the score refresh all-reduces;
* the mask is all-gathered inside the Linear's forward (and again in its backward: only this rank's rows
  are kept in between), and the backward reduce-scatters the mask gradient divided by the world size:
  the Fisher evidence then is the global batch-mean gradient, averaged before it is squared, as the
  data-parallel path averages it;
* no gradient all-reduce of our own: FSDP2 reduce-scatters the weight gradients (averaged).

Not sharded: the warm start and the teacher's sampled text run before sharding, on the model where it
was loaded (a model too large for one GPU: load it on the CPU, or give ``teacher_data_ratio=0``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Ranks
from .errors import AnnealError
from .layers import find_decoder_blocks, is_conv1d
from .masks import MaskState

log = logging.getLogger(__name__)

def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, end)`` of a ``rows``-row weight that FSDP2 keeps on ``rank`` (``torch.chunk``
    over dim 0: ceil(rows / world) each, the last ranks fewer or none)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _gather(local: torch.Tensor, rows: int, ranks: Ranks) -> torch.Tensor:
    """Every rank's :func:`row_range` rows of a ``rows``-row tensor, in rank order."""
    chunk = -(-rows // ranks.world)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)[:rows]


def _scatter_mean(grad: torch.Tensor, count: int, ranks: Ranks) -> torch.Tensor:
    """This rank's ``count`` rows of the rank-mean of every rank's whole-tensor ``grad``."""
    chunk = -(-grad.shape[0] // ranks.world)
    full = grad.new_zeros((chunk * ranks.world, *grad.shape[1:]))
    full[: grad.shape[0]] = grad
    if dist.get_backend() == "nccl":
        mine = full.new_empty((chunk, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, full)
    else:  # gloo: an all-reduce, then this rank's rows
        dist.all_reduce(full)
        mine = full[ranks.rank * chunk: (ranks.rank + 1) * chunk]
    return mine[:count] / ranks.world


class _GatherRows(torch.autograd.Function):
    """:func:`_gather` whose backward hands each rank the rank-mean gradient of its own rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rows: int, ranks: Ranks) -> torch.Tensor:
        ctx.ranks, ctx.count = ranks, local.shape[0]
        return _gather(local, rows, ranks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _scatter_mean(grad, ctx.count, ctx.ranks), None, None


def gather_rows(local: torch.Tensor, rows: int, ranks: Ranks) -> torch.Tensor:
    """The whole ``rows``-row tensor from each rank's :func:`row_range` rows (differentiable)."""
    return _GatherRows.apply(local, rows, ranks)


class _MaskedLinear(torch.autograd.Function):
    """``linear(x, W * mask, b)`` with the mask gathered from every rank's rows, saving only ``x`` and this
    rank's mask rows: the backward gathers the mask again and reads ``W`` from the module, which FSDP2 has
    gathered again for the backward. Saving ``W * mask`` (or the gathered mask) would keep every layer's
    whole weight alive from the forward to the backward, the memory sharding exists to save."""

    @staticmethod
    def forward(ctx, x, weight, bias, local, module, rows, ranks, transposed):
        mask = _gather(local.detach(), rows, ranks)
        w = weight.t() if transposed else weight
        kind = x.device.type
        # Under autocast the matmul reads x in the autocast dtype: saved so, as linear itself saves it.
        ctx.save_for_backward(x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x, local)
        ctx.module, ctx.rows, ctx.ranks, ctx.transposed, ctx.x_dtype = module, rows, ranks, transposed, x.dtype
        return nn.functional.linear(x, w * mask.to(w.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        x, local = ctx.saved_tensors
        weight = ctx.module.weight
        weight = weight.t() if ctx.transposed else weight
        mask = _gather(local.detach(), ctx.rows, ctx.ranks)
        g = grad.reshape(-1, grad.shape[-1])
        w_eff = (weight * mask.to(weight.dtype)).to(g.dtype)
        grad_x = (g @ w_eff).reshape(*grad.shape[:-1], w_eff.shape[1]).to(ctx.x_dtype)
        grad_w_eff = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).float()
        grad_weight = (grad_w_eff * mask.float()).to(weight.dtype)
        grad_weight = grad_weight.t() if ctx.transposed else grad_weight
        grad_bias = g.sum(0).to(ctx.module.bias.dtype) if ctx.needs_input_grad[2] else None
        grad_local = None
        if ctx.needs_input_grad[3]:  # dL/dmask = dL/dW_eff * W, averaged over ranks
            grad_local = _scatter_mean(grad_w_eff * weight.float(), local.shape[0], ctx.ranks).to(local.dtype)
        return grad_x, grad_weight, grad_bias, grad_local, None, None, None, None


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rows_of(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """This rank's rows of a weight in the mask's (out, in) layout (GPT-2's Conv1D stores (in, out))."""
    return local_shard(param).t() if transposed else local_shard(param)


@dataclass
class ShardedTraining:
    """The sharded student and teacher, and this rank's rows of every layer's mask state."""

    ranks: Ranks
    student: nn.Module
    teacher: nn.Module
    masks: dict[str, MaskState]
    warm: dict[str, torch.Tensor]
    rows: dict[str, int]  # layer -> its weight's rows on all ranks (this rank's: row_range)
    layer_params: dict[str, tuple[nn.Parameter, bool]] = field(default_factory=dict)

    def weight_view(self, name: str) -> Callable[[], torch.Tensor]:
        """This rank's rows of the layer's weight in the mask's (out, in) layout."""
        param, transposed = self.layer_params[name]
        return lambda: _rows_of(param, transposed)

    @torch.no_grad()
    def gather_into(self, model: nn.Module, graph_masks: dict[str, MaskState]) -> None:
        """Write the trained weights into ``model`` and the whole mask state into ``graph_masks`` (on
        every rank: each holds the model, and hardening runs on each as in data parallelism)."""
        self.student.reshard()  # the root's parameters as shards (FSDP2 leaves them gathered after a forward)
        for name, p in self.student.named_parameters():
            target = model.get_parameter(name)
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            target.copy_(full.to(target.device, target.dtype))
        for name, local in self.masks.items():
            total = self.rows[name]
            whole = graph_masks[name]
            for attr in ("score", "importance", "grad_ema"):
                value = gather_rows(getattr(local, attr).detach(), total, self.ranks)
                getattr(whole, attr).copy_(value.to(getattr(whole, attr).device))
            whole._updates = list(local._updates)
            whole.importance_beta = local.importance_beta
            whole.set_schedule(local._t, local._blend)
            whole._cache_key = None


def shard_for_training(model: nn.Module, teacher: nn.Module, layers: list[str], transposed: dict[str, bool],
                       graph_masks: dict[str, MaskState], warm: dict[str, torch.Tensor] | None, ranks: Ranks,
                       masked: bool) -> ShardedTraining:
    """A ``fully_shard``-ed copy of ``model`` on this rank's device (one FSDP unit per decoder block),
    the teacher sharded alike, and this rank's rows of each layer's mask state. ``masked``: the pruned
    Linears compute ``W * mask`` with the gathered mask (SparseForge); otherwise they stay plain (the
    peer, whose weights the loop re-zeroes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    # Copied where the model is (the CPU for one too large for a GPU): fully_shard moves only this rank's
    # shards to the device.
    student = copy.deepcopy(model)
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    # GPT-2's Conv1D stores (in, out): sharded on dim 1, so that each rank holds whole N:M groups.
    conv_weights = {id(student.get_submodule(n).weight) for n in layers if transposed[n]}

    def placement(param: nn.Parameter):
        return Shard(1) if id(param) in conv_weights else Shard(0)

    for module in (student, teacher):
        _, blocks = find_decoder_blocks(module)
        for block in blocks:
            fully_shard(block, mesh=mesh, shard_placement_fn=placement if module is student else None)
        fully_shard(module, mesh=mesh, shard_placement_fn=placement if module is student else None)

    masks, local_warm, rows, layer_params = {}, {}, {}, {}
    for name in layers:
        module = student.get_submodule(name)
        whole = graph_masks[name]
        total, width = whole.score.shape
        start, end = row_range(total, ranks.rank, ranks.world)
        param = module.weight
        local_view = _rows_of(param, transposed[name])
        if tuple(local_view.shape) != (end - start, width):
            raise AnnealError(f"{name}: FSDP2 keeps a {tuple(local_view.shape)} shard here, not rows {start}:{end} "
                              f"of ({total}, {width}); run with --parallel ddp")
        ms = MaskState((end - start, width), whole.pattern, name).to(ranks.device)
        with torch.no_grad():
            for attr in ("score", "importance", "grad_ema"):
                getattr(ms, attr).copy_(getattr(whole, attr)[start:end])
        ms.importance_beta = whole.importance_beta
        masks[name] = ms
        if warm and name in warm:
            local_warm[name] = warm[name][start:end].to(ranks.device)
        rows[name] = total
        layer_params[name] = (param, transposed[name])
        if masked:
            _mask_linear(module, ms, total, ranks, transposed[name])
    return ShardedTraining(ranks, student, teacher, masks, local_warm, rows, layer_params)


def _mask_linear(module: nn.Module, ms: MaskState, rows: int, ranks: Ranks, transposed: bool) -> None:
    """``module`` computes with ``weight * mask``, the mask gathered from every rank's rows (what the
    loop fed this step, or the state's own mask)."""
    if transposed and not is_conv1d(module):
        raise AnnealError(f"{ms.layer}: a transposed weight that is not GPT-2's Conv1D cannot be masked sharded")

    plain = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if ms.fed is None and ms._blend >= 1.0:  # the plain phase: the loop folded the hard mask into W
            return plain(x)
        return _MaskedLinear.apply(x, module.weight, module.bias, ms(), module, rows, ranks, transposed)

    module.forward = forward


def choose_parallel(mode: str, model: nn.Module, ranks: Ranks, batch: int, seqlen: int) -> str:
    """``ddp`` or ``fsdp2``: as asked, or (``auto``) what the memory plan picks for this model on this GPU
    (DDP on the CPU, where memory is the host's)."""
    if mode != "auto":  # a value the config checked: ddp or fsdp2
        return mode
    if ranks.device.type != "cuda":
        return "ddp"
    from .memory_plan import ModelShape, choose, plan_modes

    gpu_bytes = torch.cuda.get_device_properties(ranks.device).total_memory
    chosen = choose(plan_modes(ModelShape.of(model), ranks.world, batch, seqlen), gpu_bytes)
    log.info("parallel=auto: %s (memory plan for %d GPUs)", chosen, ranks.world)
    return chosen
