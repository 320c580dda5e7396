"""The training loop's settings: ``AnnealConfig``, a few small nested configs validated where made.

Field names are unique across the nested configs, so a flat view works too:
``AnnealConfig.from_flat({"lr": 1e-3, "anneal_end": 0.1})``, ``cfg.flat()``, ``cfg.replace(lr=1e-3)``.
Each field's docstring is its help text (``field_docs``), in the CLI and in printed recipes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch

IMPORTANCE_ESTIMATORS = ("fisher", "hutchinson")
WARM_STARTS = ("none", "magnitude", "wanda", "sparsegpt")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: choose one of {', '.join(choices)}")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(obj, name)}")


@dataclass
class ScheduleConfig:
    """How long the run is and how its phases, temperature and learning rate move over it."""

    steps: int | None = None
    """Total training steps; None: as many as the time budget allows."""
    warmup_frac: float = 0.03
    """Share of the run over which the learning rate warms up linearly."""
    min_lr_frac: float = 0.1
    """Where the cosine decay of the learning rate ends, as a fraction of lr."""
    t_start: float = 0.3
    """Mask temperature at the start of the soft phase."""
    t_end: float = 0.02
    """Mask temperature where hardening ends (geometric from t_start)."""
    anneal_end: float = 0.05
    """End of the soft phase (share of the run): the scores move until here. Kept short, since its steps
    are slower than plain KD (results/step_time_h200_*.json, accuracy_smollm2-135m_trained_10min.json)."""
    harden_end: float = 0.06
    """End of the hardening phase (share of the run): the mask blends into exact N:M until here."""

    def __post_init__(self) -> None:
        if not 0 <= self.anneal_end <= self.harden_end <= 1:
            raise ValueError(f"need 0 <= anneal_end ({self.anneal_end}) <= harden_end ({self.harden_end}) <= 1")
        if not 0 < self.t_end <= self.t_start:
            raise ValueError(f"need 0 < t_end ({self.t_end}) <= t_start ({self.t_start})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class LossConfig:
    """What the student is trained to match: the teacher's logits, the labels, the block outputs."""

    kd_temperature: float = 1.0
    """Distillation temperature tau of the tau^2 KL to the teacher's logits (T=1 without CE beat CE + KD
    at T=2: results/*kd_only*)."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy on the labels."""
    kl_weight: float = 1.0
    """Weight of the KL to the teacher's logits."""
    hidden_weight: float | None = None
    """Weight of the normalized block-output MSE (layer-wise distillation); None: the method's default
    (3 for sparseforge, 0 for sparsegpt+kd)."""
    teacher_data_ratio: float = 0.7
    """Share of each batch that is text sampled from the dense teacher (the rest: calibration text)."""

    def __post_init__(self) -> None:
        if not 0 <= self.teacher_data_ratio <= 1:
            raise ValueError(f"teacher_data_ratio {self.teacher_data_ratio} must be in [0, 1]")
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")


@dataclass
class EvidenceConfig:
    """Where the mask starts and what moves it: the curvature estimate and the prior toward the warm start."""

    importance: str = "fisher"
    """Curvature estimator: fisher (of the student's own predictions) or hutchinson (double backward, eager)."""
    importance_every: int = 8
    """Soft-phase steps between curvature probes (and score refreshes)."""
    importance_beta: float = 0.9
    """EMA factor of the curvature estimate."""
    evidence_probes: int = 8
    """Probes before the evidence counts fully (scaled by probes / evidence_probes): one probe is noise."""
    prior_margin: float = 300.0
    """Pull toward the warm-start mask, in units of the layer's mean saliency: the larger, the fewer
    flips and the better (results/anneal_proxy_*, accuracy_smollm2-135m_trained_10min_*)."""
    prior_floor: float = 0.5
    """Share of prior_margin left at the end of the soft phase."""
    warm_start: str = "sparsegpt"
    """One-shot method the mask starts from: none, magnitude, wanda or sparsegpt."""
    fixed_mask: bool = False
    """Hold the warm-start mask fixed (the peer: KD fine-tuning of a one-shot mask)."""

    def __post_init__(self) -> None:
        _check_choice("importance", self.importance, IMPORTANCE_ESTIMATORS)
        _check_choice("warm_start", self.warm_start, WARM_STARTS)
        _check_positive(self, "importance_every", "evidence_probes")


@dataclass
class RuntimeConfig:
    """Batch shape, optimizer, seed, and how the step runs (precision, compilation, checkpoints, logs)."""

    batch_size: int | str = 32
    """Sequences per training step (per process under torchrun); auto: the largest multiple of 8 that the
    memory plan fits in 80 % of the GPU, at most 256 (32 off CUDA), fixed when the run starts."""
    seqlen: int = 512
    """Tokens per training sequence."""
    lr: float = 3e-4
    """Peak learning rate (AdamW); beat 1e-4 and 1e-3 on WikiText-2 valid (results/*lr*, *sweep*)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: none)."""
    seed: int = 0
    """Seed of the batches, the probes and the teacher samples."""
    autocast: str = "auto"
    """bf16 autocast: auto (on CUDA), bf16 or off."""
    compile: str = "auto"
    """torch.compile the teacher, the student and the loss: auto (on CUDA only), on or off; a compile
    failure falls back to eager with one warning."""
    outline_blocks: str = "auto"
    """Compile the masked graph's shared decoder block alone, the graph around it eager: regional, off,
    or auto (regional where the loop compiles on CUDA; results/step_time_cpu_compile.json)."""
    cuda_graphs: str = "auto"
    """Replay the teacher's and the plain student's compiled decoder blocks as CUDA graphs (torch.compile's
    reduce-overhead mode), so the host no longer launches every kernel of every block: auto (where the loop
    compiles on CUDA; 1.29x SparseForge's tokens/s on an H100, same losses and masks,
    results/train_throughput_settings_h100.json), on or off. The soft phase's masked graph runs ungraphed."""
    kd_loss: str = "auto"
    """The logit distillation loss: fused (its gradient formed in the forward, chunk by chunk, so one
    logits-sized tensor waits for the backward instead of vocab-wide fp32 intermediates; no per-source
    metrics; a memory option), plain, or auto (plain: the fused loss trained slower on an H100,
    results/train_throughput_h100.json)."""
    parallel: str = "auto"
    """Under torchrun: ddp (a replica per GPU), fsdp2 (the student, teacher and mask state sharded by
    rows over the ranks; eager) or auto (the memory plan's pick: ddp where a replica fits)."""
    checkpoint_every: int = 0
    """Steps between checkpoints in the output folder (0: none)."""
    keep_training_state: bool = False
    """Keep the last checkpoint's optimizer state and teacher samples after the run finishes (a crashed
    run always keeps them for --resume)."""
    log_every: int = 10
    """Steps between metrics rows."""

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and (isinstance(self.batch_size, str) or self.batch_size < 1):
            raise ValueError(f"batch_size must be >= 1 or auto, got {self.batch_size!r}")
        _check_positive(self, "log_every")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2 (a next-token loss needs two tokens), got {self.seqlen}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_choice("autocast", self.autocast, ("auto", "bf16", "off"))
        _check_choice("compile", self.compile, ("auto", "on", "off"))
        _check_choice("outline_blocks", self.outline_blocks, ("auto", "regional", "off"))
        _check_choice("cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        _check_choice("kd_loss", self.kd_loss, ("auto", "fused", "plain"))
        _check_choice("parallel", self.parallel, ("auto", "ddp", "fsdp2"))


SECTIONS: dict[str, type] = {"schedule": ScheduleConfig, "loss": LossConfig, "evidence": EvidenceConfig,
                             "runtime": RuntimeConfig}


@functools.cache
def flat_fields() -> dict[str, dataclasses.Field]:
    """Every setting's dataclass field, by its flat name (unique across the nested configs)."""
    return {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}


@functools.cache
def section_of() -> dict[str, str]:
    """Flat field name -> the nested config holding it."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field docstrings (the string right below each field), whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


@dataclass
class AnnealConfig:
    """The loop's settings, by job. ``AnnealConfig.from_flat({...})`` takes them by field name alone."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Run length, phases, temperatures, learning-rate shape."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Distillation loss and its data mix."""
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    """Warm start, curvature evidence and prior."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Batch, optimizer, seed, precision, compilation, checkpoints, logs."""

    def compiles(self, device: torch.device) -> bool:
        """Whether the loop runs compiled on ``device`` (Hutchinson's double backward cannot)."""
        compile = self.runtime.compile
        return self.evidence.importance != "hutchinson" and (
            compile == "on" or (compile == "auto" and device.type == "cuda"))

    def autocasts(self, device: torch.device) -> bool:
        """Whether the loop runs under bf16 autocast on ``device``."""
        return self.runtime.autocast == "bf16" or (self.runtime.autocast == "auto" and device.type == "cuda")

    def fuses_kd(self, device: torch.device) -> bool:
        """Whether the loop uses the fused KD loss (``fused_kd``) on ``device``."""
        return self.runtime.kd_loss == "fused"

    def outlines(self, device: torch.device) -> bool:
        """Whether the compiled masked graph has its blocks outlined, the shared block compiled alone."""
        outline = self.runtime.outline_blocks
        return self.compiles(device) and (outline == "regional" or (outline == "auto" and device.type == "cuda"))

    def graphs(self, device: torch.device) -> bool:
        """Whether the Hugging Face modules' compiled decoder blocks replay as CUDA graphs (CUDA only)."""
        return self.runtime.cuda_graphs != "off" and device.type == "cuda" and self.compiles(device)

    # -- the flat view ---------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Every setting by its field name alone."""
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> AnnealConfig:
        """The config with ``values`` (field name -> value) over the defaults; an unknown name is an error."""
        where = section_of()
        unknown = sorted(set(values) - set(where))
        if unknown:
            raise ValueError(f"unknown AnnealConfig setting {unknown[0]!r}" + (
                f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""))
        groups: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for key, value in values.items():
            groups[where[key]][key] = value
        return cls(**{section: SECTIONS[section](**kw) for section, kw in groups.items()})

    def replace(self, **values: Any) -> AnnealConfig:
        """A copy with the given settings (field names of any nested config) changed."""
        return AnnealConfig.from_flat({**self.flat(), **values})

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict) -> AnnealConfig:
        """From ``to_json``'s nested layout; an unknown section or setting is an error naming it."""
        for section, values in payload.items():
            if section not in SECTIONS:
                raise ValueError(f"unknown AnnealConfig section {section!r}: use {', '.join(SECTIONS)}")
            names = {f.name for f in dataclasses.fields(SECTIONS[section])}
            for key in values:
                if key not in names:
                    raise ValueError(f"unknown AnnealConfig setting {section}.{key}")
        return cls(**{section: SECTIONS[section](**values) for section, values in payload.items()})

    def same_run(self, payload: dict) -> bool:
        """Whether a checkpoint's saved configuration (``to_json``) trains this run: every setting but
        the checkpoint cadence and whether the state is kept equal."""
        try:
            saved = AnnealConfig.from_json(payload).flat()
        except (TypeError, ValueError):
            return False
        ignored = ("checkpoint_every", "keep_training_state")
        return ({k: v for k, v in saved.items() if k not in ignored}
                == {k: v for k, v in self.flat().items() if k not in ignored})
