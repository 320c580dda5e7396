"""``sparsify(model, config)``: the one entry point behind ``prune`` and the Python API.

capture -> eligibility -> (one-shot peer | warm start + anneal) -> masks in the graph -> harden
(N:M invariant checked). The model is pruned in place: the graph shares its parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .anneal import AnnealResult
from .config import METHODS, ONE_SHOT, TRAINED, SparsifyConfig
from .distributed import current as current_ranks
from .layers import device_of
from .masks import NMPattern
from .training import prepare_training, remove_taps

log = logging.getLogger(__name__)

HARDEN_SLACK_S = 5.0  # budget kept back for hardening and the invariant check
__all__ = ["METHODS", "ONE_SHOT", "TRAINED", "SparsifyConfig", "SparsifyResult", "sparsify"]


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
    batch_size: int = 0  # training sequences per step and process (batch_size "auto" resolved)
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
            out.update(steps=self.anneal.steps, batch_size=self.batch_size, train_tokens=self.anneal.tokens,
                       final_loss=self.anneal.final_loss, flips_vs_warm_start=self.anneal.flips_vs_warm_start,
                       compiled=self.anneal.compiled)
        return out


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
    cfg = _fixed_batch(config or SparsifyConfig(), model)
    start = time.perf_counter()
    deadline = start + cfg.budget_s if cfg.budget_s else None
    phases: dict[str, float] = {}
    pattern = NMPattern.parse(cfg.pattern) if cfg.pattern is not None else None
    device = device_of(model)
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
    elif cfg.calib_data:
        log.warning("method 'magnitude' reads no calibration text: calib_data %s is not used (wanda or sparsegpt "
                    "calibrate on it)", ",".join(cfg.calib_data))
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


def _fixed_batch(cfg: SparsifyConfig, model: nn.Module) -> SparsifyConfig:
    """``batch_size = "auto"`` made a number for this model on this GPU, before anything records the config."""
    runtime = cfg.anneal.runtime
    if runtime.batch_size != "auto":
        return cfg
    from .memory_plan import auto_batch

    ranks = current_ranks()
    device = ranks.device if ranks is not None else device_of(model)
    batch = 32 if cfg.method in ONE_SHOT else auto_batch(
        model, device, ranks.world if ranks is not None else 1, runtime.seqlen, runtime.parallel,
        cfg.anneal.autocasts(device))
    return dataclasses.replace(cfg, anneal=cfg.anneal.replace(batch_size=batch))


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


def _sparsify_trained(model, cfg: SparsifyConfig, captured, report, layers, transposed, skipped, calib, tokenizer,
                      data_dir, out: Path | None, resume: bool, progress: bool, start: float,
                      deadline: float | None, phases: dict[str, float], identity: dict | None = None) -> SparsifyResult:
    from .anneal.identity import finish_record, start_record
    from .passes.pipelines import harden_passes, run_stage

    setup = prepare_training(model, cfg, captured, report, layers, transposed, calib, tokenizer, data_dir=data_dir,
                             out=out, resume=resume, progress=progress, phases=phases)
    ranks = current_ranks()
    writes = ranks is None or ranks.main  # the run's files are rank 0's: two writers of one file race
    if identity is not None and not resume and writes:
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
            remove_taps(setup.taps, captured.gm)
        for attention in setup.attention.values():
            attention.restore()
    phases["anneal"] = result.seconds
    if setup.sharded is not None:  # the trained shards back into the model and the graph's mask states
        setup.sharded.gather_into(model, setup.masks)

    t = time.perf_counter()
    run_stage(harden_passes(), captured.gm)
    _record_layers(model, layers, transposed, cfg)
    phases["harden"] = time.perf_counter() - t
    if out is not None and writes:
        finish_record(out, keep=cfg.anneal.runtime.keep_training_state)  # the optimizer state is only for --resume
    rows = setup.teacher_rows
    return SparsifyResult(cfg.method, cfg.pattern, layers, skipped, time.perf_counter() - start, phases,
                          anneal=result, teacher_tokens=int(rows.numel()) if rows is not None else 0,
                          teacher_sample_batch=setup.teacher_sample_batch, batch_size=cfg.anneal.runtime.batch_size,
                          attention_masks={who: "skipped" if a.applied else str(a.reason)
                                           for who, a in setup.attention.items()})
