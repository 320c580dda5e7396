"""``SparsifyConfig``: what to prune and how (the method, the pattern, the calibration text, the budget),
with the training loop's ``AnnealConfig`` inside. A leaf of the pipeline: the stages read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .anneal import AnnealConfig
from .distill import TEACHER_DECODES
from .masks import NMPattern

ONE_SHOT = ("magnitude", "wanda", "sparsegpt")
TRAINED = ("sparseforge", "sparsegpt+kd")
METHODS = ONE_SHOT + TRAINED
DEFAULT_HIDDEN_WEIGHT = 3.0  # layer-wise distillation in SparseForge (benchmarks/results: accuracy_*)


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
