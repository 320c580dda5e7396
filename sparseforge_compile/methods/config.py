"""The knobs of the one-shot methods, checked when they are set."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OneShotConfig:
    """Knobs of the one-shot methods; the defaults are the papers'."""

    percdamp: float = 0.01  # SparseGPT: damping = percdamp * mean(diag(H))
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    batch_size: int = 8  # calibration sequences per catcher / block forward
    device: str | torch.device | None = None  # compute device; None: where the model's parameters are
    max_damp_retries: int = 6  # SparseGPT: Cholesky retries, percdamp x damp_growth each
    damp_growth: float = 10.0
    measure_error: bool = True  # relative reconstruction error per layer (needs X^T X for Wanda too)

    def __post_init__(self) -> None:
        if not (isinstance(self.percdamp, (int, float)) and self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise ValueError(f"percdamp {self.percdamp!r} must be a finite number >= 0 (the paper uses 0.01)")
        for name in ("blocksize", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer")
        if not isinstance(self.max_damp_retries, int) or self.max_damp_retries < 0:
            raise ValueError(f"max_damp_retries {self.max_damp_retries!r} must be an integer >= 0")
        if not self.damp_growth > 1:
            raise ValueError(f"damp_growth {self.damp_growth!r} must be > 1 so that each retry damps more")
