"""The schedule over a run's progress: temperature, hardening blend, prior margin and LR scale.

A soft phase whose temperature anneals ``t_start -> t_end`` while the scores are refreshed (until
``anneal_end``), a hardening phase whose ``blend`` moves the mask linearly into the exact N:M
projection (until ``harden_end``), then training with the final hard mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import AnnealConfig, ScheduleConfig


@dataclass(frozen=True)
class SchedulePoint:
    temperature: float
    blend: float
    margin: float
    lr_scale: float
    soft_phase: bool  # scores still move


def _cosine(sched: ScheduleConfig, r: float) -> float:
    """Cosine decay from 1 to ``min_lr_frac`` over r in [0, 1]."""
    return sched.min_lr_frac + (1 - sched.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(r, 1.0)))


def schedule(cfg: AnnealConfig, step: int, total: int, progress: float | None = None) -> SchedulePoint:
    """Temperature, blend, prior margin and LR scale at ``step`` of ``total`` (pure function).

    ``progress`` (0..1), when given, replaces ``step / total``: a run sized by a time budget follows
    the schedule over its *time* (``elapsed / budget``), so its phases and LR warm-up keep their
    shares of the budget however fast each phase's steps turn out to be.
    """
    sched, evidence = cfg.schedule, cfg.evidence
    p = step / max(total, 1) if progress is None else min(max(progress, 0.0), 1.0)
    harden_start = sched.anneal_end
    # Temperature: geometric from t_start to t_end over the soft + hardening phases.
    t_span = max(sched.harden_end, 1e-9)
    q = min(p / t_span, 1.0)
    temperature = sched.t_start * (sched.t_end / sched.t_start) ** q
    if sched.harden_end > harden_start:
        blend = min(max((p - harden_start) / (sched.harden_end - harden_start), 0.0), 1.0)
    else:
        blend = 1.0 if p >= harden_start else 0.0
    margin_q = min(p / max(sched.anneal_end, 1e-9), 1.0)
    margin = evidence.prior_margin * (1 - (1 - evidence.prior_floor) * margin_q)
    if progress is None:
        warm = max(int(sched.warmup_frac * total), 1)
        if step < warm:
            lr_scale = (step + 1) / warm
        else:
            lr_scale = _cosine(sched, (step - warm) / max(total - warm, 1))
    elif p < sched.warmup_frac:
        lr_scale = max(p / sched.warmup_frac, 1e-3)
    else:
        lr_scale = _cosine(sched, (p - sched.warmup_frac) / max(1 - sched.warmup_frac, 1e-9))
    if evidence.fixed_mask:
        return SchedulePoint(sched.t_end, 1.0, 0.0, lr_scale, False)
    return SchedulePoint(temperature, blend, margin, lr_scale, p < harden_start)
