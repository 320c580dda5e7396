"""The SparseForge calibration-training loop: Hessian-guided soft masks annealed to exact N:M.

Per masked layer the mask is ``sigmoid((score - group threshold) / T)`` (``masks.MaskState``) with

    score = D / mean|D| + margin(p) * (2 * warm_mask - 1)
    D     = 1/2 H_ii w_ii^2

``D`` is the OBD saliency of each weight, computed with its latent value whether the mask keeps it
or not: what the loss would lose without it.
The Hessian diagonal is estimated every ``importance_every`` steps either by the
Fisher information of the student's own predictions (labels *sampled from the student*, so the
batch-mean gradient has mean zero and tokens x its square estimates the per-token Fisher, which is
the Hessian of the KL at the teacher; the plain "empirical Fisher" of the training gradient is not:
it vanishes as the student fits and is inflated where the gradient is biased) or by Hutchinson
(``E[(Hv) * v]``, Rademacher ``v``, by double backward).

``margin(p)`` anchors the mask to the warm start (SparseGPT / Wanda / magnitude): with no evidence
yet (``D = 0``) the mask *is* the warm mask, and a group changes only once the evidence for a swap
exceeds the (decaying) margin, measured in units of the layer's mean |D|.

The schedule over the run's progress ``p`` (0..1): a soft phase whose temperature anneals
``t_start -> t_end`` while the scores are refreshed every ``importance_every`` steps (until
``anneal_end``), a hardening phase whose ``blend`` moves the mask linearly into the exact N:M
projection (until ``harden_end``), then training with the final hard mask, run on the plain model
(masked weights re-zeroed after each step) since the graph's mask nodes have nothing left to do.
Weights train through the mask throughout; the loss is tau^2 KL to the dense teacher's logits (tau 1
by default), plus ``ce_weight`` x CE on the labels (0 by default) and the layer-wise block-output loss.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .distill import hidden_state_loss, kd_loss
from .errors import AnnealError
from .masks import MaskState, add_importances, make_masks
from .passes.inline_masks import InlineMaskOps
from .passes.outline_blocks import SharedBlock
from .passes.tap_blocks import BlockOutputRecorder

log = logging.getLogger(__name__)

IMPORTANCE_ESTIMATORS = ("fisher", "hutchinson")
SOURCE_METRICS = ("ce_real", "teacher_ce_real", "kl_real", "ce_sampled", "kl_sampled")  # see distill.kd_loss
WARM_STARTS = ("none", "magnitude", "wanda", "sparsegpt")


@dataclass
class LayerTaps:
    """Block-output recorders for layer-wise distillation: the teacher's, the masked graph's and the
    plain student's (``passes.tap_blocks``, ``distill.BlockOutputHooks``)."""

    teacher: BlockOutputRecorder
    graph: BlockOutputRecorder
    plain: BlockOutputRecorder
    hooks: list = field(default_factory=list)  # distill.BlockOutputHooks to remove after training




@dataclass
class AnnealConfig:
    """Every field is one CLI flag of ``sparseforge-compile prune`` (``--field-name``)."""

    steps: int | None = None  # total training steps; None: as many as the time budget allows
    batch_size: int = 32
    seqlen: int = 512
    lr: float = 3e-4  # WikiText-2 valid: beat 1e-4 on the CPU, 1e-3 on the H200 (800 steps; results/*lr*, *sweep*)
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    # Logit KD alone at T=1 (no CE on the labels): H200, 10 minutes, 33.24 test / 34.52 valid against
    # 37.11 / 38.63 with CE + KD at T=2; 800 steps, 39.22 against 40.38 valid (results/*kd_only*).
    kd_temperature: float = 1.0
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    # Layer-wise distillation: weight of the normalized block-output MSE. None: the method's default
    # (SparsifyConfig: DEFAULT_HIDDEN_WEIGHT for sparseforge, 0 for the logit-KD peer sparsegpt+kd).
    hidden_weight: float | None = None
    importance: str = "fisher"
    importance_every: int = 8
    importance_beta: float = 0.9
    t_start: float = 0.3
    t_end: float = 0.02
    # The soft phase runs the masked graph with its evidence probes, slower than a plain KD step
    # (results/step_time_h200_*.json), while the hard phase trains the plain model as the peer does, so
    # it is kept short. H200 x2, 10 min, beside the peer: soft phase 10 % at margin 100 (712 flips)
    # 31.66 test against the peer's 31.56; 5 % at margin 300 (112 flips) 31.88 against 31.96, the first
    # pair SparseForge won (results/accuracy_smollm2-135m_trained_10min_{no_mask_sync,short_soft}.json);
    # at 5 min 34.24 against 34.16 (results/accuracy_smollm2-135m_trained_5min.json): level within noise.
    anneal_end: float = 0.05
    harden_end: float = 0.06
    warm_start: str = "sparsegpt"
    # The larger the margin, the fewer flips and the better: SmolLM2's first 4 blocks, 120 steps
    # (results/anneal_proxy_*), held-out KL 0.5537 at 6, 0.5477 at 12, 0.5418 at 100 (peer 0.5416);
    # H200, 10 min, 32.52 test ppl at 12 (13 k flips), 32.17 / 32.20 at 100 (0.4-0.9 k flips) and,
    # with the soft phase halved, 31.88 at 300 (112 flips; results/accuracy_smollm2-135m_trained_10min_*).
    # At 300 the OBD evidence overrides the warm start only where it is ~300x the layer's mean saliency.
    prior_margin: float = 300.0
    prior_floor: float = 0.5
    # Curvature probes before the evidence counts fully (it is scaled by probes / evidence_probes):
    # one probe is noise, and on SmolLM2 a single-probe refresh flipped 190k weights at step 8.
    evidence_probes: int = 8
    fixed_mask: bool = False  # the peer: KD fine-tuning with the warm-start mask held fixed
    teacher_data_ratio: float = 0.7
    seed: int = 0
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    # torch.compile the teacher, the student's graph and the loss: auto = on CUDA only (on the CPU the
    # compile time outweighs a small budget); a compile failure falls back to eager with one warning.
    compile: str = "auto"  # auto | on | off
    # Outline the masked graph's identical decoder blocks into one shared block (passes/outline_blocks.py)
    # and compile that block's body alone, the graph around it eager, as the peer compiles the plain
    # model: its first step compiles in a fraction of the flat graph's time (results/step_time_cpu_compile.json).
    # auto = regional where the loop compiles on CUDA. If it fails to compile, the flat graph is compiled.
    outline_blocks: str = "auto"  # off | regional | auto
    checkpoint_every: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_ESTIMATORS:
            raise ValueError(f"importance {self.importance!r}: choose one of {', '.join(IMPORTANCE_ESTIMATORS)}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start {self.warm_start!r}: choose one of {', '.join(WARM_STARTS)}")
        if not 0 <= self.anneal_end <= self.harden_end <= 1:
            raise ValueError(f"need 0 <= anneal_end ({self.anneal_end}) <= harden_end ({self.harden_end}) <= 1")
        if not 0 < self.t_end <= self.t_start:
            raise ValueError(f"need 0 < t_end ({self.t_end}) <= t_start ({self.t_start})")
        if not 0 <= self.teacher_data_ratio <= 1:
            raise ValueError(f"teacher_data_ratio {self.teacher_data_ratio} must be in [0, 1]")
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        for name in ("batch_size", "seqlen", "importance_every", "evidence_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast {self.autocast!r}: use auto, bf16 or off")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile {self.compile!r}: use auto, on or off")
        if self.outline_blocks not in ("auto", "regional", "off"):
            raise ValueError(f"outline_blocks {self.outline_blocks!r}: use auto, regional or off")

    def compiles(self, device: torch.device) -> bool:
        """Whether the loop runs compiled on ``device`` (Hutchinson's double backward cannot)."""
        return self.importance != "hutchinson" and (
            self.compile == "on" or (self.compile == "auto" and device.type == "cuda"))

    def autocasts(self, device: torch.device) -> bool:
        """Whether the loop runs under bf16 autocast on ``device``."""
        return self.autocast == "bf16" or (self.autocast == "auto" and device.type == "cuda")

    def outlines(self, device: torch.device) -> bool:
        """Whether the compiled masked graph has its blocks outlined into one shared block."""
        return self.compiles(device) and (
            self.outline_blocks == "regional" or (self.outline_blocks == "auto" and device.type == "cuda"))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict) -> AnnealConfig:
        unknown = set(payload) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown AnnealConfig fields: {', '.join(sorted(unknown))}")
        return cls(**payload)


# ----------------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class SchedulePoint:
    temperature: float
    blend: float
    margin: float
    lr_scale: float
    soft_phase: bool  # scores still move


def _cosine(cfg: AnnealConfig, r: float) -> float:
    """Cosine decay from 1 to ``min_lr_frac`` over r in [0, 1]."""
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(r, 1.0)))


def schedule(cfg: AnnealConfig, step: int, total: int, progress: float | None = None) -> SchedulePoint:
    """Temperature, blend, prior margin and LR scale at ``step`` of ``total`` (pure function).

    ``progress`` (0..1), when given, replaces ``step / total``: a run sized by a time budget follows
    the schedule over its *time* (``elapsed / budget``), so its phases and LR warm-up keep their
    shares of the budget however fast each phase's steps turn out to be.
    """
    p = step / max(total, 1) if progress is None else min(max(progress, 0.0), 1.0)
    harden_start = cfg.anneal_end
    # Temperature: geometric from t_start to t_end over the soft + hardening phases.
    t_span = max(cfg.harden_end, 1e-9)
    q = min(p / t_span, 1.0)
    temperature = cfg.t_start * (cfg.t_end / cfg.t_start) ** q
    if cfg.harden_end > harden_start:
        blend = min(max((p - harden_start) / (cfg.harden_end - harden_start), 0.0), 1.0)
    else:
        blend = 1.0 if p >= harden_start else 0.0
    margin_q = min(p / max(cfg.anneal_end, 1e-9), 1.0)
    margin = cfg.prior_margin * (1 - (1 - cfg.prior_floor) * margin_q)
    if progress is None:
        warm = max(int(cfg.warmup_frac * total), 1)
        if step < warm:
            lr_scale = (step + 1) / warm
        else:
            lr_scale = _cosine(cfg, (step - warm) / max(total - warm, 1))
    elif p < cfg.warmup_frac:
        lr_scale = max(p / cfg.warmup_frac, 1e-3)
    else:
        lr_scale = _cosine(cfg, (p - cfg.warmup_frac) / max(1 - cfg.warmup_frac, 1e-9))
    if cfg.fixed_mask:
        return SchedulePoint(cfg.t_end, 1.0, 0.0, lr_scale, False)
    return SchedulePoint(temperature, blend, margin, lr_scale, p < harden_start)


# --------------------------------------------------------------------------------------- data

class TrainingBatches:
    """Deterministic batches: step ``s`` always gets the same rows (a resumed run sees the same data).

    A ``teacher_data_ratio`` share of each batch comes from teacher-sampled sequences, the rest are
    random windows of the calibration token stream (C4).
    """

    def __init__(self, stream: torch.Tensor, teacher_rows: torch.Tensor | None, cfg: AnnealConfig) -> None:
        if stream.numel() < cfg.seqlen + 1 and (teacher_rows is None or teacher_rows.numel() == 0):
            raise AnnealError(
                f"no calibration tokens: the token stream has {stream.numel()} tokens, fewer than one "
                f"{cfg.seqlen}-token window, and no teacher samples; give more text or a smaller --seqlen"
            )
        self.stream, self.teacher, self.cfg = stream, teacher_rows, cfg
        has_teacher = teacher_rows is not None and teacher_rows.shape[0] > 0
        self.n_teacher = round(cfg.batch_size * cfg.teacher_data_ratio) if has_teacher else 0
        if stream.numel() < cfg.seqlen + 1:
            self.n_teacher = cfg.batch_size

    def batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        rows = []
        if self.n_teacher:
            idx = torch.randint(0, self.teacher.shape[0], (self.n_teacher,), generator=gen)
            rows.append(self.teacher[idx, : self.cfg.seqlen])
        n_c4 = self.cfg.batch_size - self.n_teacher
        if n_c4:
            starts = torch.randint(0, self.stream.numel() - self.cfg.seqlen, (n_c4,), generator=gen)
            rows.append(torch.stack([self.stream[s : s + self.cfg.seqlen] for s in starts.tolist()]))
        return torch.cat(rows)


# ----------------------------------------------------------------------------- the annealer

@dataclass
class AnnealResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    flips_vs_warm_start: int
    metrics_path: str | None
    history: list[dict] = field(default_factory=list)
    compiled: bool = False  # the run ended compiled (False: eager by choice or after a compile failure)


class Annealer:
    """Runs the loop over a masked forward (the graph with one mask node per layer).

    ``forward(input_ids) -> logits`` routes every masked Linear through its ``MaskState``;
    ``plain_forward`` runs the model without mask nodes (the final, hard-mask phase);
    ``weight_views`` maps each layer name to its weight in the mask's (out, in) layout;
    ``teacher(input_ids) -> logits`` is the dense model; ``regions`` the modules behind ``teacher``
    and ``plain_forward``, in that order, whose decoder blocks are compiled (with ``cfg.compile``) one
    block at a time (without them those two run eagerly);
    ``compile_forward`` the same graph with its blocks outlined, whose shared block is compiled alone.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                 masks: dict[str, MaskState], weight_views: dict[str, Callable[[], torch.Tensor]],
                 teacher: Callable[[torch.Tensor], torch.Tensor], batches: TrainingBatches, cfg: AnnealConfig,
                 *, device: torch.device, warm_masks: dict[str, torch.Tensor] | None = None,
                 plain_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 taps: LayerTaps | None = None, out_dir: Path | None = None, progress: bool = True,
                 regions: Sequence[nn.Module] = (), compile_forward: Callable | None = None) -> None:
        if cfg.hidden_weight and taps is None:
            raise AnnealError("hidden_weight > 0 needs block-output taps on the teacher and the student")
        self.forward, self.plain_forward, self.params, self.masks = forward, plain_forward, params, masks
        self.taps = taps if cfg.hidden_weight else None
        self.weight_views, self.teacher, self.batches, self.cfg = weight_views, teacher, batches, cfg
        self.device, self.out_dir, self.progress = device, out_dir, progress
        self.warm = {k: v.to(device) for k, v in (warm_masks or {}).items()}
        self.hutchinson_curv: dict[str, torch.Tensor] = {}
        self.hutchinson_probes = 0
        for name, ms in masks.items():
            ms.importance_beta = cfg.importance_beta
            if cfg.fixed_mask:
                if name not in self.warm:
                    raise AnnealError(f"{name}: a fixed-mask run needs a warm-start mask for every layer")
                ms.set_hard(self.warm[name])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                     **({"fused": True} if device.type == "cuda" else {}))
        self.step = 0
        self.total_steps = cfg.steps or 0  # 0: sized by time (train_budget_s), not by steps
        self.train_budget_s = 0.0  # budget runs: training seconds the schedule spans
        self.train_seconds = 0.0  # budget runs: training seconds spent so far (kept across --resume)
        self.history: list[dict] = []
        self.tokens = 0
        self._weights_folded = False
        self._autocast = cfg.autocasts(device)
        # Non-finite steps: with the fused optimizer (CUDA) the check is deferred (no sync per step).
        self._deferred_check = bool(self.opt.defaults.get("fused"))
        self._first_bad_step = torch.tensor(-1, device=device)
        self._bad_param = torch.tensor(-1, device=device)
        self._bad_loss = torch.tensor(0.0, device=device)
        self._grad_params: list[nn.Parameter] = []
        # Each masked layer's parameter, and whether its (out, in) weight view is the parameter
        # transposed (GPT-2's Conv1D): for gradients and names, which live on the parameter.
        self._layer_params = {n: _parameter_of(self.weight_views[n]()) for n in masks}
        self._eager = (self.forward, self.plain_forward, self.teacher)
        self._loss_terms = _loss_terms
        self.regions = list(regions)
        self._compile_forward = compile_forward
        self._compiled_blocks: list[nn.Module] = []
        self.compiled = cfg.compiles(device)
        self._compile_tried = False
        if self.compiled:
            self._compile()
        if not cfg.fixed_mask:
            self._refresh_scores(margin=cfg.prior_margin)

    # -- scores -------------------------------------------------------------------------------
    def _curvature(self, name: str, ms: MaskState) -> torch.Tensor:
        """~ 1/2 H_ii w_ii^2 for every weight of the layer (loss units)."""
        if self.cfg.importance == "hutchinson":
            return self.hutchinson_curv.get(name, torch.zeros_like(ms.importance))
        return ms.corrected("importance")

    def _fisher_probe(self, s_logits: torch.Tensor) -> None:
        """1/2 F_ii w_ii^2 from labels sampled from the student itself (the mask gradient is g * w).

        E_y[grad log p(y)] = 0, so tokens x (batch-mean gradient)^2 is an unbiased estimate of the
        per-token Fisher diagonal, the Hessian of the mean KL at the teacher.
        """
        masks = [ms for ms in self.masks.values() if ms.last_mask is not None]
        if not masks:
            return
        logits = s_logits[:, :-1].detach().float()
        # Seeded per step: the same seed gives the same probes, resumed or not, whatever ran before.
        gen = torch.Generator(device=logits.device).manual_seed(self.cfg.seed * 1_000_003 + self.step + 17)
        race = torch.empty_like(logits).exponential_(generator=gen)
        sampled = (torch.softmax(logits, dim=-1) / race).argmax(dim=-1)
        fisher_loss = torch.nn.functional.cross_entropy(
            s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).float(), sampled.reshape(-1))
        for ms in masks:
            ms.hook_enabled = False  # this backward must not enter the mask-gradient EMA
        try:
            grads = torch.autograd.grad(fisher_loss, [ms.last_mask for ms in masks], retain_graph=True,
                                        allow_unused=True)
        finally:
            for ms in masks:
                ms.hook_enabled = True
        tokens = sampled.numel()
        pairs = [(ms, g.float()) for ms, g in zip(masks, grads) if g is not None]
        if pairs:
            with torch.no_grad():
                squares = torch._foreach_mul([g for _, g in pairs], [g for _, g in pairs])
                torch._foreach_mul_(squares, 0.5 * tokens)
            add_importances([ms for ms, _ in pairs], squares)

    def _evidence_weight(self, ms: MaskState) -> float:
        probes = self.hutchinson_probes if self.cfg.importance == "hutchinson" else ms._updates[1]
        return min(probes / self.cfg.evidence_probes, 1.0)

    @torch.no_grad()
    def _refresh_scores(self, margin: float) -> None:
        for name, ms in self.masks.items():
            # OBD saliency with the latent weight, the same formula kept or pruned: the loss cost of
            # not having the weight.
            evidence = self._curvature(name, ms)
            score = evidence / evidence.abs().mean().clamp_min(1e-30) * self._evidence_weight(ms)
            if name in self.warm:
                score += margin * (2 * self.warm[name].float() - 1)
            elif not self.step:
                score += margin * (2 * ms.hard_mask().float() - 1)  # no warm start: keep magnitude's choice until evidence
            ms.set_scores(score)

    def _hutchinson(self, ids: torch.Tensor) -> None:
        """E[(Hv) * v] per weight, one Rademacher probe, by double backward (needs eager attention)."""
        from .hessian import hutchinson_diagonal

        views = {n: self.weight_views[n]() for n in self.masks}
        # Differentiate with respect to the parameters themselves (GPT-2's Conv1D views are transposes).
        bases = {n: param for n, (param, _) in self._layer_params.items()}
        loss = self._loss(ids, plain=False, eager=True)[0]
        for ms in self.masks.values():
            ms.hook_enabled = False
        try:
            diag = hutchinson_diagonal(loss, bases, seed=self.cfg.seed + self.step)
        finally:
            for ms in self.masks.values():
                ms.hook_enabled = True
        beta = self.cfg.importance_beta
        for n, d in diag.items():
            curv = 0.5 * (d.t() if d.shape != views[n].shape else d) * views[n].detach().float().square()
            old = self.hutchinson_curv.get(n)
            self.hutchinson_curv[n] = curv if old is None else old.mul_(beta).add_(curv, alpha=1 - beta)
        self.hutchinson_probes += 1

    # -- one step -------------------------------------------------------------------------------
    def _loss(self, ids: torch.Tensor, plain: bool, eager: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The training loss of the masked graph (or, ``plain``, of the plain model) on ``ids``. Block
        outputs are recorded while ``self.taps`` is set (a layer-wise weight)."""
        forward, plain_forward, teacher = self._eager if eager else (self.forward, self.plain_forward, self.teacher)
        masked = not plain or plain_forward is None
        forward = forward if masked else plain_forward
        taps = self.taps
        student_rec = None
        if taps is not None:
            student_rec = taps.graph if masked else taps.plain
            taps.teacher.enabled = student_rec.enabled = True
        if masked:  # every mask is made eagerly, all layers at once, and handed to the graph (feed)
            states = list(self.masks.values())
            for ms, mask in zip(states, make_masks(states, leaf=self.compiled and not eager)):
                ms.feed(mask)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                t_logits = teacher(ids)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                s_logits = forward(ids)
        finally:
            if taps is not None:
                taps.teacher.enabled = student_rec.enabled = False
            for ms in self.masks.values():
                ms.feed(None)
        hidden = (student_rec.take(), taps.teacher.take()) if taps is not None else None
        loss_terms = _loss_terms if eager else self._loss_terms
        loss, parts = loss_terms(s_logits, t_logits, ids, hidden, self.cfg.kd_temperature, self.cfg.ce_weight,
                                 self.cfg.kl_weight, self.batches.n_teacher)
        if hidden is not None:  # weighed outside the compiled function: a changing weight recompiles nothing
            loss = loss + self.cfg.hidden_weight * parts["hidden"]
            parts["hidden"] = parts["hidden"].detach()
        return loss, parts, s_logits

    def _plain_phase(self, point: SchedulePoint) -> bool:
        """Hard mask everywhere: train the plain model and re-zero the pruned weights after each step.

        Compiled whole (or outlined), SparseForge stays on its masked graph with the hard mask fed: a
        second whole-graph compile (tens of seconds) would cost more than it saves. Compiled block by
        block (regional) the plain model's blocks compile in seconds, and its steps are the peer's:
        the hard-mask graph ran slower than the peer's plain steps (benchmarks/curves.py on
        runs_h200/trained_10min_measured_flips_*)."""
        if self.compiled and not self.cfg.fixed_mask and not self.cfg.outlines(self.device):
            return False
        return point.blend >= 1.0 and (self.cfg.fixed_mask or self.plain_forward is not None)

    def schedule_progress(self) -> float | None:
        """Where a budget run is in its schedule (training time spent / budget); None for step runs."""
        if self.total_steps:
            return None
        return self.train_seconds / self.train_budget_s if self.train_budget_s else 0.0

    def train_step(self) -> dict:
        if self.compiled and not self._compile_tried:
            self._compile_tried = True
            try:
                return self._train_step()
            except AnnealError:
                raise
            except Exception as exc:  # any compiler failure: the flat graph, then eager
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self._reset_failed_step()
                if self._compile_forward is not None:
                    log.warning("compiling the outlined graph failed (%s); compiling it flat", reason)
                    self._compile_forward = None
                    self.forward = torch.compile(_inlined_masks(self._eager[0]), dynamic=False)
                    self._compile_tried = False
                    return self.train_step()
                log.warning("torch.compile failed (%s); training eagerly (--compile off skips the attempt)", reason)
                self._use_eager()
                return self._train_step()
        return self._train_step()

    def _compile(self) -> None:
        """The masked graph is compiled whole (export inlined its blocks; ``compile_forward`` may
        hand them in outlined). The Hugging Face modules (teacher, plain student) are compiled one
        decoder block at a time: all blocks of a model share one compiled artifact (regional
        compilation; the peer's whole first step on SmolLM2 on the CPU: 35.6 s,
        benchmarks/results/step_time_cpu_compile.json)."""
        from .errors import PruneError
        from .layers import find_decoder_blocks

        compiled = functools.partial(torch.compile, dynamic=False)
        if not self.cfg.fixed_mask:
            if self._compile_forward is not None:
                self.forward = _inlined_masks(self._compile_forward, copy=False)  # eager around the blocks
                for module in self.forward.modules():
                    if isinstance(module, SharedBlock):
                        module.compile_body()
            else:
                self.forward = compiled(_inlined_masks(self.forward))
        for model in self.regions:
            try:
                blocks = find_decoder_blocks(model)[1]
            except PruneError:
                continue
            for block in blocks:
                block.compile(dynamic=False)
                self._compiled_blocks.append(block)
        self._loss_terms = compiled(_loss_terms)

    def _uncompile_blocks(self) -> None:
        """Blocks leave training eager: evaluation at other shapes must not recompile them."""
        for block in self._compiled_blocks:
            block._compiled_call_impl = None
        self._compiled_blocks = []

    def _use_eager(self) -> None:
        self.forward, self.plain_forward, self.teacher = self._eager
        self._uncompile_blocks()
        self._loss_terms = _loss_terms
        self.compiled = False

    def _reset_failed_step(self) -> None:
        """Forget what a step that raised half-way left behind (gradients, masks, recordings)."""
        self.opt.zero_grad(set_to_none=True)
        for ms in self.masks.values():
            ms.last_mask = None
            ms.feed(None)
        if self.taps is not None:
            for rec in (self.taps.teacher, self.taps.graph, self.taps.plain):
                rec.enabled = False
                rec.clear()

    def _train_step(self) -> dict:
        cfg = self.cfg
        point = schedule(cfg, self.step, self.total_steps, progress=self.schedule_progress())
        plain = self._plain_phase(point)
        probe = point.soft_phase and cfg.importance == "fisher" and self.step % cfg.importance_every == 0
        # The mask gradient feeds the Fisher probe only; other steps skip its weight-sized backward.
        for ms in self.masks.values():
            ms.set_schedule(point.temperature, point.blend)
            ms.collecting = probe
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * point.lr_scale
        ids = self.batches.batch(self.step)
        # Pinned and non-blocking: a copy from pageable memory waits for the GPU to drain first.
        ids = ids.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else ids
        if point.soft_phase and cfg.importance == "hutchinson" and self.step % cfg.importance_every == 0:
            self._hutchinson(ids)
            self.opt.zero_grad(set_to_none=True)
        if plain and not self._weights_folded:
            self._reapply_masks()  # the step the phase starts: fold the hard mask into the weights
            self._weights_folded = True
        loss, parts, s_logits = self._loss(ids, plain)
        if probe:
            self._fisher_probe(s_logits)
        loss.backward()
        for ms in self.masks.values():
            ms.last_mask = None
        if plain:
            self._mask_gradients()
        bad, grad_norm = self._clip_and_check(loss.detach())
        if self._deferred_check:
            # No host sync: the fused optimizer skips the update on the device when the step is
            # non-finite, and the loop raises at its next check (log step, checkpoint, end).
            self.opt.found_inf = bad.float()
        elif bool(bad):
            raise AnnealError(self._nonfinite_message(loss, self.step, self._bad_param))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if plain:
            self._reapply_masks()
        if point.soft_phase and (self.step + 1) % cfg.importance_every == 0:
            self._refresh_scores(point.margin)
        self.step += 1
        self.tokens += ids.numel()
        return {"loss": loss.detach(), **parts, "grad_norm": grad_norm, "temperature": point.temperature,
                "blend": point.blend, "hidden_weight": cfg.hidden_weight or 0.0,
                "margin": point.margin, "lr": cfg.lr * point.lr_scale}

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        """Zero the pruned weights' gradients on the plain model, as the masked graph's are: the
        update would be undone anyway (the weights are re-zeroed), and counted in the clipping norm
        they made the peer clip harder than SparseForge on the same loss."""
        grads, masks = [], []
        for name, ms in self.masks.items():
            param, transposed = self._layer_params[name]
            if param.grad is not None:
                grads.append(param.grad.t() if transposed else param.grad)
                masks.append(ms._hard_float())
        if grads:
            torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def _clip_and_check(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the gradients to ``grad_clip`` and return whether this step is non-finite (a device
        bool: a non-finite loss gives non-finite gradients too, and the norm catches both) and the
        gradient norm before clipping. The first bad step and the parameter whose gradient went
        non-finite are kept on the device."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        per_param = torch.stack(torch._foreach_norm(grads))
        norm = per_param.norm()
        if self.cfg.grad_clip:
            torch._foreach_mul_(grads, (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        bad = ~torch.isfinite(norm + loss)
        first = self._first_bad_step < 0
        nonfinite = ~torch.isfinite(per_param)
        culprit = torch.where(nonfinite.any(), nonfinite.int().argmax(), -1)  # -1: only the total overflowed
        self._bad_param = torch.where(bad & first, culprit, self._bad_param)
        self._first_bad_step = torch.where(bad & first, self.step, self._first_bad_step)
        self._bad_loss = torch.where(bad & first, loss.float(), self._bad_loss)
        self._grad_params = params
        return bad, norm

    def check_finite(self) -> None:
        """Raise :class:`AnnealError` if a step since the start went non-finite (one host sync)."""
        step = int(self._first_bad_step)
        if step >= 0:
            raise AnnealError(self._nonfinite_message(self._bad_loss, step, self._bad_param))

    @torch.no_grad()
    def _reapply_masks(self) -> None:
        # One multi-tensor multiply for all layers: in the plain phase this runs every step (the
        # peer's every step), and one mul_ per layer was ~200 launches of host time.
        torch._foreach_mul_([self.weight_views[name]() for name in self.masks],
                            [ms._hard_float() for ms in self.masks.values()])

    def _first_nonfinite_grad(self, index: torch.Tensor) -> str:
        i = int(index)
        if i < 0 or i >= len(self._grad_params):
            return "(no single parameter: the total norm overflowed)"
        p = self._grad_params[i]
        return self._param_names().get(id(p), f"a parameter of shape {tuple(p.shape)}")

    def _param_names(self) -> dict[int, str]:
        return {id(param): n for n, (param, _) in self._layer_params.items()}

    def _kept_note(self) -> str:
        return (f"the last good checkpoint is in {self.out_dir / 'checkpoint'}"
                if self.out_dir and (self.out_dir / "checkpoint").exists() else "no checkpoint was written yet")

    def _nonfinite_message(self, loss: torch.Tensor, step: int, bad_param: torch.Tensor) -> str:
        names = self._param_names()
        culprit = next((names.get(id(p), "?") for p in self.params if not torch.isfinite(p).all()), None)
        where = (f"; non-finite weights in {culprit}" if culprit
                 else f"; first non-finite gradient in {self._first_nonfinite_grad(bad_param)}")
        return (f"loss is {float(loss.detach())} at step {step}{where}; lower --lr or check the data. "
                f"The model was not hardened; {self._kept_note()}")

    # -- stats -------------------------------------------------------------------------------
    @torch.no_grad()
    def flips(self) -> int:
        """Weights whose keep/prune decision differs from the warm start."""
        return int(sum((ms.hard_mask() != self.warm[n]).sum() for n, ms in self.masks.items() if n in self.warm))

    @torch.no_grad()
    def undecided(self) -> float:
        """Fraction of all groups still undecided (one device sync for all layers)."""
        groups = sum(ms.score.numel() // ms.pattern.m for ms in self.masks.values())
        return float(sum(ms.undecided_groups() for ms in self.masks.values())) / max(groups, 1)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "tokens": self.tokens,
                "train_budget_s": self.train_budget_s, "train_seconds": self.train_seconds,
                "params": [p.detach().clone() for p in self.params],
                "masks": {n: {k: v.clone() for k, v in ms.state_dict().items()} for n, ms in self.masks.items()},
                "hutchinson": dict(self.hutchinson_curv), "hutchinson_probes": self.hutchinson_probes, "opt": self.opt.state_dict(),
                "weights_folded": self._weights_folded, "history": list(self.history),
                "config": self.cfg.to_json(), "rng": {"torch": torch.get_rng_state()}}

    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "state.pt.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, directory / "state.pt")  # atomic: a crash keeps the previous checkpoint

    def load_checkpoint(self, directory: Path) -> None:
        path = directory / "state.pt"
        if not path.exists():
            raise AnnealError(f"no checkpoint at {path}: --resume needs a folder written by an earlier run")
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved_cfg = dict(state["config"])
        if {k: v for k, v in saved_cfg.items() if k != "checkpoint_every"} != {
                k: v for k, v in self.cfg.to_json().items() if k != "checkpoint_every"}:
            raise AnnealError(f"{path} was written with another configuration; resume with the same flags")
        self._restore(state)
        self.total_steps = state["total_steps"]
        self.train_budget_s = float(state.get("train_budget_s", 0.0))
        torch.set_rng_state(state["rng"]["torch"].cpu())

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
            for n, ms in self.masks.items():
                ms.load_state_dict(state["masks"][n])
        self.hutchinson_curv = dict(state["hutchinson"])
        self.hutchinson_probes = int(state.get("hutchinson_probes", 0))
        self.opt.load_state_dict(state["opt"])
        self.step, self.tokens, self.history = state["step"], state["tokens"], list(state["history"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._weights_folded = state["weights_folded"]

    def _open_metrics(self) -> TextIO:
        """metrics.jsonl for appending: a fresh run starts it empty (a reused out dir held another run's
        curve, and appending mixed two runs into one file); a resumed run keeps the lines up to its
        checkpoint's step, dropping those logged after it by the interrupted run (they are re-logged)."""
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if self.step and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line + "\n")
        path.write_text("".join(kept))
        return open(path, "a")

    # -- the loop -----------------------------------------------------------------------------
    def run(self, deadline: float | None = None, resume_from: Path | None = None) -> AnnealResult:
        """Train until ``cfg.steps`` steps, or, without them, until the time budget (``deadline``) is spent."""
        cfg = self.cfg
        start = time.perf_counter()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        metrics_file = self._open_metrics() if self.out_dir else None
        try:
            budget_mode = not self.total_steps
            if budget_mode and not self.train_budget_s:
                self.train_budget_s = self._training_budget(deadline)
            bar = tqdm(total=None if budget_mode else self.total_steps, initial=self.step, desc="anneal",
                       disable=not self.progress, unit="step")
            self._t_last, self._tok_last, self._start = time.perf_counter(), self.tokens, start
            last = {}
            every = cfg.log_every if budget_mode else max(1, min(cfg.log_every, self.total_steps // 50))
            seconds_before, loop_t0 = self.train_seconds, time.perf_counter()

            recent: collections.deque[float] = collections.deque(maxlen=5)  # step seconds

            def more() -> bool:
                if budget_mode:
                    # Start no step that a typical recent one says would end past the budget (the median:
                    # one slow step, a recompile at a phase change, does not end the run early).
                    typical = statistics.median(recent) if recent else 0.0
                    return self.train_seconds + typical < self.train_budget_s
                return self.step < self.total_steps

            while more():
                step_t0 = time.perf_counter()
                last = self.train_step()
                if self.step % every == 0 or (not budget_mode and self.step == self.total_steps):
                    self.check_finite()
                    row = self._log_row(last, metrics_file)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", T=f"{row['temperature']:.3f}",
                                    undecided=f"{row['undecided']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.checkpoint_every and self.out_dir and self.step % cfg.checkpoint_every == 0:
                    self.check_finite()  # a checkpoint is only ever written from finite steps
                    self.save_checkpoint(self.out_dir / "checkpoint")
                self.train_seconds = seconds_before + time.perf_counter() - loop_t0
                recent.append(time.perf_counter() - step_t0)
            self.check_finite()
            if last and (not self.history or self.history[-1]["step"] != self.step):
                self._log_row(last, metrics_file)  # the curves end where the run ended
            bar.close()
        finally:
            if metrics_file:
                metrics_file.close()
            self._uncompile_blocks()
        for ms in self.masks.values():
            ms.collecting = False
            ms.set_schedule(cfg.t_end, 1.0)
        return AnnealResult(steps=self.step, seconds=time.perf_counter() - start, tokens=self.tokens,
                            final_loss=float(last["loss"]) if last else float("nan"),
                            flips_vs_warm_start=self.flips() if self.warm else 0,
                            metrics_path=str(self.out_dir / "metrics.jsonl") if self.out_dir else None,
                            history=self.history, compiled=self.compiled)

    def _log_row(self, last: dict, metrics_file) -> dict:
        now = time.perf_counter()
        row = {"step": self.step, "loss": float(last["loss"]), "ce": float(last["ce"]),
               "kl": float(last["kl"]), "hidden": float(last.get("hidden", 0.0)),  # 0 where not computed
               "hidden_weight": last.get("hidden_weight", 0.0),
               "grad_norm": float(last["grad_norm"]),
               "temperature": last["temperature"], "blend": last["blend"],
               "lr": last["lr"], "undecided": self.undecided(), "flips": self.flips() if self.warm else 0,
               "tokens_per_s": (self.tokens - self._tok_last) / max(now - self._t_last, 1e-9),
               "elapsed_s": now - self._start}
        for key in SOURCE_METRICS:  # this batch's losses by source: memorization of the real text shows here
            if key in last:
                row[key] = float(last[key])
        self._t_last, self._tok_last = now, self.tokens
        self.history.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        return row

    def _training_budget(self, deadline: float | None) -> float:
        """Seconds of training the budget leaves, after two probe steps (then undone) show that one
        step fits. The probe runs a soft-phase step, the slowest kind."""
        if deadline is None:
            raise AnnealError("give either --steps or a time budget")
        snapshot = self.state_dict()
        self.train_budget_s = float("inf")  # progress 0 during the probe
        t0 = time.perf_counter()
        self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        per_step = time.perf_counter() - t1
        self.check_finite()
        self._restore(snapshot)
        self.train_budget_s = 0.0
        remaining = deadline - time.perf_counter() - per_step  # one step of slack: the last step overruns
        if remaining < per_step:
            compiled = (f"; the first step, which compiles, took {t1 - t0:.0f}s (--compile off trains eagerly)"
                        if self.compiled else "")
            raise AnnealError(
                f"the budget leaves {max(remaining, 0):.1f}s for training but one step takes {per_step:.1f}s: "
                f"raise --budget-minutes or lower --batch-size / --seqlen{compiled}"
            )
        log.info("one step takes %.3fs (probe took %.1fs): %.0fs of training, ~%d steps", per_step,
                 time.perf_counter() - t0, remaining, remaining / per_step)
        return remaining


def _parameter_of(view: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The parameter a layer's (out, in) weight view reads, and whether the view is a view of it
    (GPT-2's Conv1D: the parameter transposed) rather than the parameter itself."""
    return (view, False) if view._base is None else (view._base, True)


def _inlined_masks(forward: Callable, copy: bool = True) -> Callable:
    """What torch.compile gets for a masked graph: its ``apply_mask`` ops as plain multiplies, which
    Inductor fuses (with the bf16 cast) instead of calling the op back in Python for every layer
    (passes/inline_masks.py). ``copy``: rewrite a copy, leaving the graph hardening reads intact."""
    return InlineMaskOps(copy=copy)(forward).gm if isinstance(forward, fx.GraphModule) else forward


def _loss_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor,
                hidden: tuple[list[torch.Tensor], list[torch.Tensor]] | None, temperature: float,
                ce_weight: float, kl_weight: float, real_from_row: int | None = None) -> tuple[torch.Tensor, dict]:
    """CE + tau^2 KL to the teacher, and the layer-wise loss as ``parts["hidden"]`` (with its
    gradient; the caller weighs it in): one function, so that torch.compile fuses the vocab-sized
    fp32 work (a quarter of an eager step on SmolLM2). The batch's first ``real_from_row`` rows are
    teacher-sampled, the rest real text (``kd_loss``)."""
    loss, parts = kd_loss(s_logits, t_logits, ids, temperature=temperature, ce_weight=ce_weight,
                          kl_weight=kl_weight, real_from_row=real_from_row)
    if hidden is not None:
        parts["hidden"] = hidden_state_loss(*hidden)
    return loss, parts
