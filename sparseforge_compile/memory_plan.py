"""How much GPU memory annealing a model needs per GPU, part by part, under DDP and FSDP2, and which mode
to run: ``sparseforge-compile plan --model M --gpus N``.

Parts, as the loop holds them: fp32 master weights, fp32 gradients, AdamW's two fp32 moments, the mask
state of every prunable weight (bytes per weight measured from a live ``MaskState``), the teacher (a
forward-only copy, bf16 where the loop autocasts), activations kept for the backward at the chosen batch,
the logits of student and teacher, and the Fisher probe's three fp32 vocab-sized buffers (logits, race
noise, softmax; SmolLM2 at 32 x 512: 9 GiB, most of the gap between the plan without them and the peak an
H100 measured, results/train_throughput_h100.json). DDP replicates all of it; FSDP2 (``fully_shard`` per decoder
block) shards weights, gradients, moments, mask state and the teacher over the GPUs and all-gathers two
blocks at a time (the one computing and the one prefetched).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import default_prune_layers, find_decoder_blocks

log = logging.getLogger(__name__)

GIB = 1024**3
HEADROOM = 0.9  # of a GPU's memory the plan may fill (allocator fragmentation, CUDA context, workspaces)
# ``batch_size = "auto"`` fills less: the plan runs a few % under measured peaks (docs/results.md), and
# an OOM after minutes of training costs more than a smaller batch.
BATCH_HEADROOM = 0.8
BATCH_MULTIPLE, MAX_AUTO_BATCH = 8, 256


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model."""

    params: int
    prunable: int  # weights of the prunable Linears
    layers: int
    block_params: int  # one decoder block's parameters
    hidden: int
    intermediate: int
    kv_dim: int  # width of k (and of v): kv_heads * head_dim
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        cfg = model.config
        blocks_path, blocks = find_decoder_blocks(model)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        prunable = sum(model.get_submodule(n).weight.numel() for n in default_prune_layers(model))
        return cls(params=sum(p.numel() for p in dict.fromkeys(model.parameters())), prunable=prunable,
                   layers=len(blocks), block_params=sum(p.numel() for p in blocks[0].parameters()),
                   hidden=cfg.hidden_size, intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                   kv_dim=kv_heads * head_dim, vocab=cfg.vocab_size)


def mask_state_bytes_per_weight() -> float:
    """Bytes the loop keeps per prunable weight for its mask: a live ``MaskState`` while hardening, when it
    holds the most (score, curvature and gradient EMAs, the soft mask's margins and the cached hard mask),
    plus the warm-start mask."""
    from .masks import MaskState, NMPattern

    state = MaskState((16, 64), NMPattern(2, 4))
    state.set_schedule(0.3, 0.5)  # blending soft into hard: both caches live
    state.make_mask()
    state.hard_mask()
    tensors = [*state.parameters(), *state.buffers()]
    tensors += [t for t in (state._hard, state._hard_f, state._thr, state._margin) if isinstance(t, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in tensors) - sum(
        b.numel() * b.element_size() for b in (state.temperature, state.blend, state.updates))
    return total / (16 * 64) + 1  # + the bool warm-start mask


def activation_bytes_per_token(shape: ModelShape, act_bytes: int) -> float:
    """Saved-for-backward bytes per token of the whole stack, from what a LLaMA-style block keeps: the
    residual stream and norm inputs (fp32), q/k/v and attention outputs, the MLP's gate/up/product, per layer
    (SDPA keeps no seq x seq matrix), plus the final norm and the student's logits."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = 4 * (2 * h) + act_bytes * (4 * h + 2 * kv + 2 * h + 4 * i)
    return shape.layers * per_layer + 4 * h + act_bytes * shape.vocab


@dataclass
class Plan:
    mode: str  # "ddp" or "fsdp2"
    gpus: int
    parts: dict[str, int] = field(default_factory=dict)  # bytes per GPU

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def plan_modes(shape: ModelShape, gpus: int, batch: int, seqlen: int, *, autocast: bool = True,
               mask_bytes: float | None = None) -> dict[str, Plan]:
    """Per-GPU bytes of each part under DDP and under FSDP2 (``batch`` sequences per GPU)."""
    if gpus < 1 or batch < 1 or seqlen < 1:
        raise ValueError(f"gpus {gpus}, batch {batch} and seqlen {seqlen} must all be >= 1")
    act = 2 if autocast else 4
    teacher_bytes = 2 if autocast else 4
    mask_bytes = mask_state_bytes_per_weight() if mask_bytes is None else mask_bytes
    tokens = batch * seqlen
    replicated = {
        "weights": 4 * shape.params,
        "gradients": 4 * shape.params,
        "optimizer": 8 * shape.params,
        "mask_state": int(mask_bytes * shape.prunable),
        "teacher": teacher_bytes * shape.params,
    }
    per_batch = {
        "activations": int(tokens * activation_bytes_per_token(shape, act)),
        "logits": tokens * shape.vocab * (2 * act),  # the teacher's logits and the loss's gradient
        # SparseForge's Fisher probe: the logits in fp32, its exponential race noise and the softmax
        "fisher_probe": 3 * 4 * tokens * shape.vocab,
    }
    ddp = Plan("ddp", gpus, {**replicated, **per_batch})
    sharded = {k: -(-v // gpus) for k, v in replicated.items()}
    gathered = 2 * shape.block_params * (4 + teacher_bytes) if gpus > 1 else 0  # student + teacher blocks
    fsdp = Plan("fsdp2", gpus, {**sharded, **per_batch, "gathered_blocks": gathered})
    return {"ddp": ddp, "fsdp2": fsdp}


def choose(plans: dict[str, Plan], gpu_bytes: int) -> str:
    """DDP where a replica fits (less communication), else FSDP2; an error where neither fits."""
    budget = HEADROOM * gpu_bytes
    for mode in ("ddp", "fsdp2"):
        if plans[mode].total <= budget:
            return mode
    need = plans["fsdp2"].total / GIB
    raise ValueError(f"needs {need:.1f} GiB per GPU under FSDP2 but a GPU holds {gpu_bytes / GIB:.0f} GiB "
                     f"({HEADROOM:.0%} usable): use more GPUs, a smaller --batch-size or --seqlen")


def fitting_batch(shape: ModelShape, gpus: int, seqlen: int, gpu_bytes: int, mode: str, *,
                  autocast: bool = True) -> int:
    """The largest batch per GPU under ``mode`` whose plan fits :data:`BATCH_HEADROOM` of a GPU: a multiple
    of 8, at most 256 (a longer step buys no more throughput); 0 where not even 8 sequences fit."""
    one, two = (plan_modes(shape, gpus, batch, seqlen, autocast=autocast)[mode].total for batch in (1, 2))
    per_sequence, fixed = two - one, 2 * one - two  # every part is constant or linear in the batch
    fits = int((BATCH_HEADROOM * gpu_bytes - fixed) // per_sequence)
    return max(0, min(MAX_AUTO_BATCH, fits // BATCH_MULTIPLE * BATCH_MULTIPLE))


def auto_batch(model: nn.Module, device: torch.device, world: int, seqlen: int, parallel: str,
               autocast: bool = True) -> int:
    """``batch_size = "auto"``: the :func:`fitting_batch` of this model on this GPU (``parallel`` fsdp2: the
    sharded plan's; auto with several processes: DDP's, else FSDP2's); 32 off CUDA, where memory is the host's."""
    if device.type != "cuda":
        log.info("batch_size auto: 32 on %s (the plan sizes GPU memory)", device.type)
        return 32
    shape = ModelShape.of(model)
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    modes = ["fsdp2"] if parallel == "fsdp2" else ["ddp", "fsdp2"] if parallel == "auto" and world > 1 else ["ddp"]
    for mode in modes:
        batch = fitting_batch(shape, world, seqlen, gpu_bytes, mode, autocast=autocast)
        if batch:
            log.warning("batch_size auto: %d sequences of %d tokens per GPU (%s memory plan, %.0f GiB GPU)",
                        batch, seqlen, mode, gpu_bytes / GIB)
            return batch
    raise ValueError(f"batch_size auto: not even {BATCH_MULTIPLE} sequences of {seqlen} tokens fit a "
                     f"{gpu_bytes / GIB:.0f} GiB GPU ({', '.join(modes)}): give --batch-size N, a smaller --seqlen, "
                     f"or more GPUs (sparseforge-compile plan shows the parts)")


def format_plan(plans: dict[str, Plan], chosen: str | None, gpu_bytes: int) -> str:
    parts = list(dict.fromkeys(k for p in plans.values() for k in p.parts))
    width = max(len(p) for p in parts)
    lines = [f"{'part':<{width}}  {'ddp GiB':>9}  {'fsdp2 GiB':>9}"]
    for part in parts:
        cells = [plans[m].parts.get(part, 0) / GIB for m in ("ddp", "fsdp2")]
        lines.append(f"{part:<{width}}  {cells[0]:>9.2f}  {cells[1]:>9.2f}")
    lines.append(f"{'total':<{width}}  {plans['ddp'].total / GIB:>9.2f}  {plans['fsdp2'].total / GIB:>9.2f}")
    gpus = plans["ddp"].gpus
    verdict = f"mode: {chosen}" if chosen else "fits neither mode"
    if chosen == "fsdp2":  # a replica does not fit: say how to launch the sharded run
        verdict += f" (`prune --nproc {gpus} --parallel fsdp2`; --parallel auto picks it on these GPUs)"
    lines.append(f"{gpus} GPU(s) of {gpu_bytes / GIB:.0f} GiB ({HEADROOM:.0%} usable): {verdict}")
    return "\n".join(lines)


def named_shape(name: str) -> ModelShape:
    """A :class:`ModelShape` of a shaped model (``models.SHAPED_MODELS``, ``NAME`` or ``NAME:L``), built on the
    meta device: no weights allocated."""
    from transformers import LlamaForCausalLM

    from .models import SHAPED_MODELS, shaped_config

    config = shaped_config(name)
    if config is None:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPED_MODELS)}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return ModelShape.of(model)


def model_shape(name: str) -> ModelShape:
    """The shape of any ``--model`` of prune: Hugging Face models (folders, hub ids) and the shaped models
    are built from their config on the meta device (no weights read or allocated); the tiny models and the
    embedded default are small enough to load."""
    from pathlib import Path

    from .models import SMOLLM2_NAME, TINY_MODELS, load_model, shaped_config

    if shaped_config(name) is not None:
        return named_shape(name)
    path = Path(name).expanduser()
    if name in TINY_MODELS or name == SMOLLM2_NAME or path.suffix == ".gguf" or (path / "sparseforge.json").is_file():
        return ModelShape.of(load_model(name, device="cpu").model)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name, local_files_only=path.is_dir(), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelShape.of(model)
