"""What a trained method runs with, built before the training loop's clock starts: the teacher copy, the
warm start, teacher-sampled text, the graph checked against the model, masks (and block taps) in the graph,
and the annealer."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .anneal import Annealer, LayerTaps, TrainingBatches
from .anneal.identity import TEACHER_ROWS_FILE
from .config import SparsifyConfig
from .distill import MasklessCausalAttention
from .distributed import SEED_STRIDE, RankBatches
from .distributed import current as current_ranks
from .layers import device_of, weight_of
from .masks import NMPattern
from .sharding import ShardedTraining, choose_parallel, shard_for_training

log = logging.getLogger(__name__)

# Largest mean per-token KL between the captured graph and the model, under the loop's autocast, on a
# training batch: kernel choices differ by ~1e-4; the bf16 rotary bug (passes/float32_positions.py) was 0.145.
GRAPH_KL_TOLERANCE = 1e-2


def _teacher_samples(teacher: nn.Module, stream: torch.Tensor, cfg: SparsifyConfig, time_limit: float,
                     progress: bool) -> tuple[torch.Tensor | None, int]:
    """Teacher-sampled rows (None: none) and the rows sampled at once."""
    from .distill import sample_batch_size, sample_from_teacher
    from .evaluate import not_a_causal_lm

    if cfg.anneal.loss.teacher_data_ratio <= 0 or (time_limit <= 0 and not cfg.teacher_sample_rows):
        return None, 0
    problem = not_a_causal_lm(teacher)
    if problem:  # a masked LM samples no text: train on the real text alone
        log.warning("no teacher-sampled text: %s; training on C4 alone (teacher_data_ratio ignored)", problem)
        return None, 0
    ranks = current_ranks()
    # Each rank samples a share with its own seed; every rank then trains on all ranks' rows.
    seed = cfg.anneal.runtime.seed + (ranks.rank * SEED_STRIDE if ranks else 0)
    gen = torch.Generator().manual_seed(seed)
    rows = cfg.teacher_sample_rows or 1 << 15  # without a row count the time limit decides
    if ranks is not None:
        rows = -(-rows // ranks.world)
    starts = torch.randint(0, stream.numel() - cfg.teacher_prompt_tokens, (rows,), generator=gen)
    prompts = torch.stack([stream[s : s + cfg.teacher_prompt_tokens] for s in starts.tolist()])
    batch = cfg.teacher_sample_batch or sample_batch_size(teacher, cfg.anneal.runtime.seqlen)
    sampled = sample_from_teacher(teacher, prompts, cfg.anneal.runtime.seqlen, batch_size=batch, seed=seed,
                                  time_limit_s=None if cfg.teacher_sample_rows else time_limit,
                                  progress=progress, decode=cfg.teacher_decode)
    return (ranks.gather_rows(sampled) if ranks is not None else sampled), batch


@dataclass
class TrainingSetup:
    """Everything a trained method runs with, built before the clock of the training loop starts."""

    annealer: Annealer
    teacher_rows: torch.Tensor | None
    taps: LayerTaps | None = None
    teacher_sample_batch: int = 0
    attention: dict = field(default_factory=dict)  # "teacher" / "student" -> distill.MasklessCausalAttention
    sharded: ShardedTraining | None = None  # FSDP2: the sharded copies the loop trains
    masks: dict = field(default_factory=dict)  # the graph's mask states (sharded: gathered into after the run)


def prepare_training(model: nn.Module, cfg: SparsifyConfig, captured, report, layers: list[str],
                     transposed: dict[str, bool], calib: torch.Tensor | None, tokenizer, *, data_dir=None,
                     out: Path | None = None, resume: bool = False, progress: bool = True,
                     phases: dict[str, float] | None = None) -> TrainingSetup:
    """Teacher copy, warm start, teacher-sampled text, masks in the graph, and the annealer."""
    from .data import token_stream
    from .evaluate import logits_of
    from .methods import prune_oneshot
    from .passes.causal_attention import UseCausalAttention
    from .passes.insert_masks import InsertMasks
    from .passes.pipelines import mask_passes, prepare_passes, run_stage

    phases = phases if phases is not None else {}
    acfg = cfg.anneal
    pattern = NMPattern.parse(cfg.pattern)
    device = device_of(model)
    if tokenizer is None:
        raise ValueError(f"{cfg.method} trains on text: pass the model's tokenizer")
    ranks = current_ranks()
    mode = choose_parallel(acfg.runtime.parallel, model, ranks, acfg.runtime.batch_size, acfg.runtime.seqlen) \
        if ranks is not None else None
    train_device = ranks.device if mode == "fsdp2" else device  # sharded: the model may wait on the CPU

    t = time.perf_counter()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if train_device.type == "cuda" and acfg.autocasts(train_device):
        teacher = teacher.to(torch.bfloat16)  # forward only, and bf16 under autocast anyway: half the bytes
    phases["teacher"] = time.perf_counter() - t

    t = time.perf_counter()
    dense = {n: weight_of(model, n, transposed[n]).detach().clone() for n in layers}
    warm_masks = None
    if acfg.evidence.warm_start != "none":
        warm = prune_oneshot(model, acfg.evidence.warm_start, pattern=pattern, calib=calib, layers=layers, progress=progress)
        warm_masks = {n: m.to(device) for n, m in warm.masks.items()}
        if not acfg.evidence.fixed_mask:
            # Pruned weights keep their dense values underneath the mask, so a group can flip back.
            with torch.no_grad():
                for n in layers:
                    w = weight_of(model, n, transposed[n])
                    w.copy_(torch.where(warm_masks[n], w, dense[n]))
    del dense
    phases["warm_start"] = time.perf_counter() - t

    t = time.perf_counter()
    stream = token_stream(tokenizer, data_dir, sources=cfg.calib_data or None)
    rows_file = out / TEACHER_ROWS_FILE if out is not None else None
    writes = ranks is None or ranks.main
    sample_batch = 0
    if resume and rows_file is not None and rows_file.exists():
        teacher_rows = _load_rows(rows_file)
    else:
        share = cfg.teacher_sample_share * (cfg.budget_s or 0)
        teacher_rows, sample_batch = _teacher_samples(teacher, stream, cfg, share, progress)
        if rows_file is not None and teacher_rows is not None and acfg.runtime.checkpoint_every and writes:
            _save_rows(rows_file, teacher_rows)  # a resumed run trains on the same text
    if ranks is not None:
        ranks.barrier()  # the rows file is written before any rank reads it on a resume
    phases["teacher_sampling"] = time.perf_counter() - t
    batches = RankBatches(stream, teacher_rows, acfg, ranks) if ranks else TrainingBatches(stream, teacher_rows, acfg)

    # The loop runs the graph every soft-phase step: let its attention use the flash kernels.
    causal = run_stage(prepare_passes(), captured.gm).of(UseCausalAttention)
    if causal.stats["kept"]:
        log.info("attention kept its mask in %d node(s): %s", len(causal.stats["kept"]),
                 next(iter(causal.stats["kept"].values())))
    check_ids = batches.batch(0)[-2:].to(device)  # two rows the checks below run the models on
    if not acfg.evidence.fixed_mask and mode != "fsdp2":  # SparseForge trains the graph: it must be the model
        verify_graph(captured.gm, model, check_ids, autocast=acfg.autocasts(device))
    taps_at = _blocks_of(model) if acfg.loss.hidden_weight else None  # the layer-wise loss records block outputs
    masks = run_stage(mask_passes(pattern, taps_at), captured.gm, eligibility=report).of(InsertMasks).masks
    if mode == "fsdp2":
        return _sharded_setup(model, teacher, cfg, layers, transposed, masks, warm_masks, batches, teacher_rows,
                              sample_batch, check_ids, ranks, out, progress)
    attention = {who: MasklessCausalAttention(m, check_ids, autocast=acfg.autocasts(device))
                 for who, m in (("teacher", teacher), ("student", model))}
    for who, a in attention.items():
        if a.reason:
            log.info("the %s's training forwards build their attention mask: %s", who, a.reason)

    def plain_forward(ids: torch.Tensor) -> torch.Tensor:
        return logits_of(model, ids)

    # The peer trains the plain model throughout; SparseForge runs the masked graph until the mask is hard.
    forward = plain_forward if acfg.evidence.fixed_mask else captured.gm
    params = list(dict.fromkeys(p for p in model.parameters()))
    for p in params:
        p.requires_grad_(True)
    views = {n: (lambda n=n: weight_of(model, n, transposed[n])) for n in layers}

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        return logits_of(teacher, ids)

    taps = _layer_taps(model, teacher, captured.gm) if acfg.loss.hidden_weight else None
    annealer = Annealer(forward, params, masks, views, teacher_logits, batches, acfg, device=device,
                        warm_masks=warm_masks, plain_forward=plain_forward, taps=taps, out_dir=out,
                        progress=progress, regions=(teacher, model),
                        compile_forward=_outlined(model, captured.gm) if acfg.outlines(device) and not acfg.evidence.fixed_mask
                        else None, ranks=ranks)
    return TrainingSetup(annealer, teacher_rows, taps, sample_batch, attention, masks=masks)


def _sharded_setup(model: nn.Module, teacher: nn.Module, cfg: SparsifyConfig, layers: list[str],
                   transposed: dict[str, bool], masks: dict, warm_masks: dict | None, batches, teacher_rows,
                   sample_batch: int, check_ids: torch.Tensor, ranks, out: Path | None,
                   progress: bool) -> TrainingSetup:
    """The annealer over FSDP2-sharded copies of the student and the teacher (``sharding.py``): eager,
    the masked forward the Hugging Face module itself."""
    from .anneal import AnnealConfig
    from .distill import BlockOutputHooks
    from .evaluate import logits_of

    acfg = cfg.anneal
    if acfg.evidence.importance == "hutchinson":
        raise ValueError("importance='hutchinson' does not run sharded (its double backward): use "
                         "importance='fisher' or --parallel ddp")
    if acfg.compiles(ranks.device):
        log.info("parallel=fsdp2 trains eagerly (compile=off)")
        acfg = AnnealConfig.from_flat({**acfg.flat(), "compile": "off"})
    shard = shard_for_training(model, teacher, layers, transposed, masks, warm_masks, ranks,
                               masked=not acfg.evidence.fixed_mask)
    params = list(dict.fromkeys(shard.student.parameters()))
    for p in params:
        p.requires_grad_(True)
    attention = {who: MasklessCausalAttention(m, check_ids.to(ranks.device), autocast=acfg.autocasts(ranks.device))
                 for who, m in (("teacher", shard.teacher), ("student", shard.student))}
    shard.student.reshard()  # FSDP2 keeps the root's parameters gathered after a forward: a resume writes shards

    def student_logits(ids: torch.Tensor) -> torch.Tensor:  # the masked forward: no dropout, as the graph
        return logits_of(shard.student.eval(), ids)

    def plain_logits(ids: torch.Tensor) -> torch.Tensor:  # the plain phase: in training mode, as the model
        return logits_of(shard.student.train(), ids)

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        return logits_of(shard.teacher, ids)

    taps = None
    if acfg.loss.hidden_weight:  # one recorder for the student: its masked and plain forwards are one module
        hooks = [BlockOutputHooks(shard.teacher), BlockOutputHooks(shard.student)]
        taps = LayerTaps(teacher=hooks[0].recorder, graph=hooks[1].recorder, plain=hooks[1].recorder, hooks=hooks)
    forward = plain_logits if acfg.evidence.fixed_mask else student_logits  # the peer trains the plain model
    annealer = Annealer(forward, params, shard.masks, {n: shard.weight_view(n) for n in layers},
                        teacher_logits, batches, acfg, device=ranks.device, warm_masks=shard.warm,
                        plain_forward=plain_logits, taps=taps, out_dir=out,
                        progress=progress, ranks=ranks, layer_params=shard.layer_params)
    return TrainingSetup(annealer, teacher_rows, taps, sample_batch, attention, sharded=shard, masks=masks)


@torch.no_grad()
def verify_graph(gm: torch.fx.GraphModule, model: nn.Module, ids: torch.Tensor, autocast: bool) -> float:
    """KL (nats per token) from the model's logits to the captured graph's on ``ids``, run as the
    loop runs them (bf16 autocast or not); raises :class:`CaptureError` above ``GRAPH_KL_TOLERANCE``
    (NaN, without checking, where the model's own logits are not finite).

    Export can drop what a model does at run time only (an autocast-off region, say): training such
    a graph trains another function, which no loss curve shows. Two forwards of two rows are cheap
    insurance."""
    from .distill import kd_loss
    from .errors import CaptureError
    from .evaluate import logits_of

    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        graph = gm(ids)
        plain = logits_of(model, ids)
    graph = graph if isinstance(graph, torch.Tensor) else graph[0]
    if not bool(torch.isfinite(plain).all()):
        return float("nan")  # the model itself overflows: the loop's non-finite check names the layer
    kl = float(kd_loss(graph.float(), plain.float(), ids, temperature=1.0, ce_weight=0.0)[0])
    if not kl <= GRAPH_KL_TOLERANCE:  # NaN fails too
        where = "under bf16 autocast" if autocast else "in fp32"
        raise CaptureError(
            f"the captured graph does not compute what {type(model).__name__} computes {where}: KL {kl:.4g} "
            f"nats per token on a {tuple(ids.shape)} training batch (tolerance {GRAPH_KL_TOLERANCE}); training "
            f"it would train another function. Run benchmarks/graph_numerics.py to see where it diverges "
            f"(by position: rotary; everywhere: an op export changed); --autocast off trains in fp32 meanwhile")
    return kl


def _outlined(model: nn.Module, gm):
    """The masked graph with its decoder blocks outlined into one shared compile region (what
    torch.compile then builds once for all blocks); None, with a note, where the blocks differ."""
    from .errors import PruneError
    from .passes.base import PassConditionError
    from .passes.pipelines import outline_passes, run_stage

    try:
        return run_stage(outline_passes(_blocks_of(model)), gm).gm
    except (PruneError, PassConditionError) as exc:
        log.warning("compiling the masked graph flat: %s", exc)
        return None


def _blocks_of(model: nn.Module) -> tuple[str, int]:
    """The decoder block list's path and length (what the block passes are configured with)."""
    from .layers import find_decoder_blocks

    path, blocks = find_decoder_blocks(model)
    return path, len(blocks)


def _layer_taps(model: nn.Module, teacher: nn.Module, gm) -> LayerTaps:
    """Recorders of every decoder block's output: hooks on the teacher and the plain student, and the
    graph's tap nodes (the mask stage put them there; :func:`remove_taps` takes them out again)."""
    from .distill import BlockOutputHooks
    from .passes.tap_blocks import block_recorder

    hooks = [BlockOutputHooks(teacher), BlockOutputHooks(model)]
    return LayerTaps(teacher=hooks[0].recorder, graph=block_recorder(gm), plain=hooks[1].recorder, hooks=hooks)


def remove_taps(taps: LayerTaps, gm) -> None:
    """The student leaves training as it came: no hooks on its blocks, no tap nodes in its graph."""
    from .passes.tap_blocks import remove_block_taps

    remove_block_taps(gm)
    for hooks in taps.hooks:
        hooks.remove()


def _save_rows(path: Path, rows: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"rows": rows.contiguous()}, str(tmp))
    tmp.replace(path)


def _load_rows(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["rows"]
