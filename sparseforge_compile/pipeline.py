"""``sparsify(model, config)``: the one entry point behind ``prune`` and the Python API.

capture -> eligibility -> (one-shot peer | warm start + anneal) -> masks in the graph -> harden
(N:M invariant checked). The model is pruned in place: the graph shares its parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .anneal import AnnealConfig, Annealer, AnnealResult, LayerTaps, TrainingBatches
from .distill import TEACHER_DECODES, MasklessCausalAttention
from .distributed import SEED_STRIDE, RankBatches
from .distributed import current as current_ranks
from .layers import weight_of
from .masks import NMPattern

log = logging.getLogger(__name__)

ONE_SHOT = ("magnitude", "wanda", "sparsegpt")
TRAINED = ("sparseforge", "sparsegpt+kd")
METHODS = ONE_SHOT + TRAINED
HARDEN_SLACK_S = 5.0  # budget kept back for hardening and the invariant check
DEFAULT_HIDDEN_WEIGHT = 3.0  # layer-wise distillation in SparseForge (benchmarks/results: accuracy_*)
# Largest mean per-token KL between the captured graph and the model, under the loop's autocast, on a
# training batch: kernel choices differ by ~1e-4; the bf16 rotary bug (passes/float32_positions.py) was 0.145.
GRAPH_KL_TOLERANCE = 1e-2


@dataclass
class SparsifyConfig:
    """What to prune and how. ``anneal`` holds the training loop's settings (trained methods)."""

    method: str = "sparseforge"
    """Pruning method: magnitude, wanda, sparsegpt (one-shot), sparseforge or sparsegpt+kd (trained)."""
    pattern: str | None = "2:4"
    """N:M pattern; None (or "none") for unstructured sparsity (one-shot methods, with sparsity)."""
    sparsity: float | None = None
    """Unstructured sparsity ratio (one-shot methods, no pattern)."""
    exclude: tuple[str, ...] = ()
    """Layers to keep dense (fnmatch globs, or re:REGEX)."""
    kernel_constraints: str | None = "cusparselt"
    """Sparse-kernel shape rules a layer must meet (cusparselt, cutlass); None: the N:M math only."""
    calib_samples: int = 128
    """Calibration windows of the one-shot methods and the warm start."""
    calib_seqlen: int = 2048
    """Tokens per calibration window."""
    calib_data: tuple[str, ...] = ()
    """Calibration and training text: files of the user's own (.txt, .jsonl with a text field, .parquet),
    and "c4" for the built-in C4 sample, in any mix; empty: the C4 sample."""
    budget_s: float | None = 600.0
    """Wall budget of the whole prune in seconds; None: no limit (trained methods then need steps)."""
    teacher_sample_share: float = 0.2
    """Share of the budget spent sampling training text from the dense teacher."""
    teacher_sample_rows: int | None = None
    """Sample exactly this many teacher sequences instead (no time limit)."""
    teacher_sample_batch: int | None = None
    """Teacher sequences sampled at once; None: from free GPU memory."""
    teacher_prompt_tokens: int = 8
    """Tokens of calibration text each teacher sample continues."""
    teacher_decode: str = "auto"
    """How teacher text is decoded: forward, static (KV cache, LLaMA family), graphs (CUDA graphs), or
    auto (graphs on a GPU, static on the CPU, forward for other families)."""
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    """The training loop's settings (trained methods)."""

    def __post_init__(self) -> None:
        if not isinstance(self.anneal, AnnealConfig):
            raise ValueError(f"anneal must be an AnnealConfig, got {type(self.anneal).__name__}: pass "
                             f"AnnealConfig.from_flat({{...}}) with the settings by name")
        if self.budget_s is not None and not isinstance(self.budget_s, int | float):
            raise ValueError(f"budget_s must be seconds as a number or None, got {self.budget_s!r}")
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pattern is not None and self.sparsity is not None:
            raise ValueError(f"sparsity {self.sparsity} applies to unstructured pruning, not to pattern {self.pattern}: "
                             f"add --pattern none (pattern=None), or drop the sparsity")
        if self.pattern is None and (self.sparsity is None or self.method not in ONE_SHOT):
            raise ValueError("unstructured pruning (no pattern) needs --sparsity and a one-shot method")
        if self.pattern is not None and NMPattern.parse(self.pattern).density == 1:
            raise ValueError(f"pattern {self.pattern} keeps every weight, so nothing would be pruned: use N < M, "
                             f"e.g. 2:4")
        if self.pattern is None and not 0 < self.sparsity < 1:
            what = "prunes nothing" if self.sparsity == 0 else "is not a ratio below 1"
            raise ValueError(f"sparsity {self.sparsity} {what}: give a ratio in (0, 1), e.g. 0.5")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"budget must be positive, got {self.budget_s}s")
        if self.teacher_decode not in TEACHER_DECODES:
            raise ValueError(f"teacher_decode {self.teacher_decode!r}: use one of {', '.join(TEACHER_DECODES)}")
        if not 0 <= self.teacher_sample_share < 1:
            raise ValueError(f"teacher_sample_share {self.teacher_sample_share} must be in [0, 1)")
        self.calib_data = (self.calib_data,) if isinstance(self.calib_data, str) else tuple(self.calib_data)
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise ValueError("calibration needs at least one window of two tokens")
        if self.method == "sparsegpt+kd" and not self.anneal.evidence.fixed_mask:
            self.anneal = self.anneal.replace(fixed_mask=True, warm_start="sparsegpt")
        if self.anneal.loss.hidden_weight is None:
            # The peer is KD fine-tuning as its recipe defines it (logits only); hidden_weight
            # given explicitly applies to either method (the ablation in benchmarks/accuracy.py).
            default = DEFAULT_HIDDEN_WEIGHT if self.method == "sparseforge" else 0.0
            self.anneal = self.anneal.replace(hidden_weight=default)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SparsifyResult:
    method: str
    pattern: str | None
    layers: list[str]
    skipped: dict[str, str]  # layer -> why it stays dense
    seconds: float
    phases: dict[str, float]  # seconds per phase
    anneal: AnnealResult | None = None
    teacher_tokens: int = 0
    oneshot: object | None = None
    teacher_sample_batch: int = 0  # rows sampled at once (0: none sampled here)
    # Training forwards of the teacher and the plain student: "skipped" (distill.MasklessCausalAttention)
    # or why they built their attention mask
    attention_masks: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"method": self.method, "pattern": self.pattern, "pruned_layers": len(self.layers),
               "dense_layers": len(self.skipped), "seconds": round(self.seconds, 2),
               "phases": {k: round(v, 2) for k, v in self.phases.items()}, "teacher_tokens": self.teacher_tokens,
               "teacher_sample_batch": self.teacher_sample_batch}
        if self.attention_masks:
            out["attention_masks"] = "; ".join(f"{k}: {v}" for k, v in self.attention_masks.items())
        if self.anneal:
            out.update(steps=self.anneal.steps, train_tokens=self.anneal.tokens,
                       final_loss=self.anneal.final_loss, flips_vs_warm_start=self.anneal.flips_vs_warm_start,
                       compiled=self.anneal.compiled)
        return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *, tokenizer=None, calib: torch.Tensor | None = None,
             data_dir: str | Path | None = None, out_dir: str | Path | None = None, resume: bool = False,
             progress: bool = True, example_inputs: tuple | None = None) -> SparsifyResult:
    """Prune ``model`` in place to the configured pattern; returns what was done and how long it took.

    Language models are captured on token ids; any other ``nn.Module`` needs ``example_inputs`` (a tuple
    of its forward's arguments) and prunes with ``method="magnitude"``: the calibrated and trained
    methods run text through a language model's decoder blocks.

    ``calib`` (token windows) defaults to ``calib_samples`` x ``calib_seqlen`` windows of the C4 sample.
    For the trained methods ``out_dir`` receives metrics.jsonl and checkpoints (``resume`` picks up
    the last one). Configuration and input errors are raised before any weight changes; an error
    during training (``AnnealError``) leaves the model with its warm-start weights, unhardened, so
    reload it (or ``resume``) rather than saving it.
    """
    from .anneal.identity import resume_identity
    from .capture import capture
    from .data import calibration_windows, check_sources
    from .passes.eligibility import analyze_eligibility

    check_sparsify_inputs(model, config, out_dir, resume)
    cfg = config or SparsifyConfig()
    start = time.perf_counter()
    deadline = start + cfg.budget_s if cfg.budget_s else None
    phases: dict[str, float] = {}
    pattern = NMPattern.parse(cfg.pattern) if cfg.pattern is not None else None
    device = _device_of(model)
    out = Path(out_dir) if out_dir else None

    t = time.perf_counter()
    if cfg.method == "sparseforge" and cfg.anneal.evidence.importance == "hutchinson":
        # Hutchinson differentiates twice; fused SDPA kernels have no double backward.
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError("importance 'hutchinson' needs a model whose attention can be set to 'eager'")
        model.set_attn_implementation("eager")
        log.warning("importance 'hutchinson': one Rademacher probe per refresh is noisy; it did far worse than the "
                    "Fisher default (benchmarks/results/anneal_proxy_smollm2_4layers_hutchinson_margin12.json)")
    vocab = _vocab_size(model)
    if not vocab and example_inputs is None:
        raise ValueError(f"{type(model).__name__} is not a language model (no vocabulary): pass "
                         f"example_inputs=(tensor, ...) for its forward")
    if not vocab and cfg.method != "magnitude":
        raise ValueError(f"method {cfg.method!r} calibrates on text through a language model's decoder blocks; "
                         f"{type(model).__name__} takes no token ids: use method='magnitude'")
    identity = resume_identity(model, cfg.to_json(), cfg.calib_data or ("c4",), out if cfg.method in TRAINED else None,
                               resume, bool(cfg.anneal.runtime.checkpoint_every))  # before any weight changes
    if cfg.method != "magnitude":  # a bad text file is named now, not after the warm start changed weights
        check_sources(cfg.calib_data)
    if example_inputs is None:
        batch, seqlen = (2, 16) if cfg.method in ONE_SHOT else (cfg.anneal.runtime.batch_size, cfg.anneal.runtime.seqlen)
        example_inputs = (torch.randint(0, vocab, (batch, seqlen), device=device),)
    captured = capture(model, tuple(example_inputs))
    report = analyze_eligibility(captured, pattern or NMPattern(1, 1), exclude=cfg.exclude,
                                 kernel_constraints=cfg.kernel_constraints if pattern is not None else None)
    layers = [info.name for info in report.layers if info.eligible]
    transposed = {info.name: info.transposed for info in report.layers if info.eligible}
    skipped = {info.name: info.reason for info in report.layers if not info.eligible}
    phases["capture"] = time.perf_counter() - t
    if not layers:
        raise ValueError(f"no layer is eligible for {cfg.pattern} sparsity: " + "; ".join(
            f"{k}: {v}" for k, v in list(skipped.items())[:5]))

    needs_calib = cfg.method in ("wanda", "sparsegpt") or (
        cfg.method in TRAINED and cfg.anneal.evidence.warm_start in ("wanda", "sparsegpt"))
    if calib is None and needs_calib:
        if tokenizer is None:
            raise ValueError(f"{cfg.method} needs calibration text: pass a tokenizer or calib windows")
        calib = calibration_windows(tokenizer, cfg.calib_samples, cfg.calib_seqlen, seed=cfg.anneal.runtime.seed,
                                    sources=cfg.calib_data or None,
                                    data_dir=data_dir)

    ranks = current_ranks()
    if ranks is not None and calib is not None:  # each rank calibrates on a share; the statistics are summed
        calib = ranks.shard_rows(calib)

    if cfg.method in ONE_SHOT:
        from .methods import prune_oneshot

        t = time.perf_counter()
        result = prune_oneshot(model, cfg.method, pattern=pattern, sparsity=cfg.sparsity, calib=calib,
                               layers=layers, progress=progress)
        phases["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        if pattern is not None:
            _harden_through_graph(captured, report, pattern, result.masks)
        _record_layers(model, layers, transposed, cfg, result.masks)
        phases["harden"] = time.perf_counter() - t
        return SparsifyResult(cfg.method, cfg.pattern, layers, skipped, time.perf_counter() - start, phases,
                              oneshot=result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
    return _sparsify_trained(model, cfg, captured, report, layers, transposed, skipped, calib, tokenizer,
                             data_dir, out, resume, progress, start, deadline, phases, identity)


def check_sparsify_inputs(model: object, config: object, out_dir: object, resume: bool) -> None:
    """The arguments' kinds, in one line each, before anything runs."""
    from .errors import UsageError
    from .inputs import require_module

    require_module(model, "sparsify")
    if config is not None and not isinstance(config, SparsifyConfig):
        hint = "SparsifyConfig(**d)" if isinstance(config, dict) else "SparsifyConfig(method=..., pattern=...)"
        raise UsageError(f"sparsify's config must be a SparsifyConfig, got {type(config).__name__} {config!r:.60}: "
                        f"pass {hint}")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to prune")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir, the folder holding the checkpoint")
    if resume and (config or SparsifyConfig()).method in ONE_SHOT:
        raise ValueError(f"resume applies to the trained methods ({', '.join(TRAINED)}); "
                         f"{config.method} runs in one shot: drop --resume")


def _vocab_size(model: nn.Module) -> int:
    """The token vocabulary the model takes (its config's, or its input embedding's); 0 when it has none."""
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(config, "vocab_size", 0) or getattr(embeddings, "num_embeddings", 0))


def _harden_through_graph(captured, report, pattern: NMPattern, masks: dict[str, torch.Tensor]) -> None:
    """Put the given binary masks into the graph's mask nodes, then harden (invariant checked)."""
    from .passes.insert_masks import InsertMasks
    from .passes.pipelines import harden_passes, mask_passes, run_stage

    inserted = run_stage(mask_passes(pattern), captured.gm, eligibility=report).of(InsertMasks)
    for name, state in inserted.masks.items():
        state.set_hard(masks[name].to(state.score.device))
    run_stage(harden_passes(), captured.gm)


def _record_layers(model: nn.Module, layers: list[str], transposed: dict[str, bool], cfg: SparsifyConfig,
                   masks: dict[str, torch.Tensor] | None = None) -> None:
    registry = getattr(model, "_sparseforge_layers", {}) or {}
    for name in layers:
        entry = dict(registry.get(name, {}))
        entry.update(pattern=cfg.pattern, transposed=transposed[name], method=cfg.method)
        if cfg.pattern is None:
            entry["sparsity"] = cfg.sparsity
        registry[name] = entry
    model._sparseforge_layers = registry


@dataclass
class TrainingSetup:
    """Everything a trained method runs with, built before the clock of the training loop starts."""

    annealer: Annealer
    teacher_rows: torch.Tensor | None
    taps: LayerTaps | None = None
    teacher_sample_batch: int = 0
    attention: dict = field(default_factory=dict)  # "teacher" / "student" -> distill.MasklessCausalAttention


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
    device = _device_of(model)
    if tokenizer is None:
        raise ValueError(f"{cfg.method} trains on text: pass the model's tokenizer")

    t = time.perf_counter()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if device.type == "cuda" and acfg.autocasts(device):
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
    rows_file = out / "teacher_samples.safetensors" if out is not None else None
    ranks = current_ranks()
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
    if not acfg.evidence.fixed_mask:  # SparseForge trains the graph: it must be the model, in the loop's precision
        verify_graph(captured.gm, model, check_ids, autocast=acfg.autocasts(device))
    taps_at = _blocks_of(model) if acfg.loss.hidden_weight else None  # the layer-wise loss records block outputs
    masks = run_stage(mask_passes(pattern, taps_at), captured.gm, eligibility=report).of(InsertMasks).masks
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
    return TrainingSetup(annealer, teacher_rows, taps, sample_batch, attention)


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
    graph's tap nodes (the mask stage put them there; :func:`_remove_taps` takes them out again)."""
    from .distill import BlockOutputHooks
    from .passes.tap_blocks import block_recorder

    hooks = [BlockOutputHooks(teacher), BlockOutputHooks(model)]
    return LayerTaps(teacher=hooks[0].recorder, graph=block_recorder(gm), plain=hooks[1].recorder, hooks=hooks)


def _sparsify_trained(model, cfg: SparsifyConfig, captured, report, layers, transposed, skipped, calib, tokenizer,
                      data_dir, out: Path | None, resume: bool, progress: bool, start: float,
                      deadline: float | None, phases: dict[str, float], identity: dict | None = None) -> SparsifyResult:
    from .anneal.identity import finish_record, start_record
    from .passes.pipelines import harden_passes, run_stage

    setup = prepare_training(model, cfg, captured, report, layers, transposed, calib, tokenizer, data_dir=data_dir,
                             out=out, resume=resume, progress=progress, phases=phases)
    if identity is not None and not resume:
        start_record(out, identity)  # what a later --resume must match
    model.train()
    try:
        result = setup.annealer.run(deadline=deadline - HARDEN_SLACK_S if deadline else None,
                                    resume_from=out / "checkpoint" if resume and out else None)
    finally:
        model.eval()
        for p in setup.annealer.params:
            p.requires_grad_(False)
        if setup.taps is not None:
            _remove_taps(setup.taps, captured.gm)
        for attention in setup.attention.values():
            attention.restore()
    phases["anneal"] = result.seconds

    t = time.perf_counter()
    run_stage(harden_passes(), captured.gm)
    _record_layers(model, layers, transposed, cfg)
    phases["harden"] = time.perf_counter() - t
    if out is not None:
        finish_record(out, keep=cfg.anneal.runtime.keep_training_state)  # the optimizer state is only for --resume
    rows = setup.teacher_rows
    return SparsifyResult(cfg.method, cfg.pattern, layers, skipped, time.perf_counter() - start, phases,
                          anneal=result, teacher_tokens=int(rows.numel()) if rows is not None else 0,
                          teacher_sample_batch=setup.teacher_sample_batch,
                          attention_masks={who: "skipped" if a.applied else str(a.reason)
                                           for who, a in setup.attention.items()})


def _remove_taps(taps: LayerTaps, gm) -> None:
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
