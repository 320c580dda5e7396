"""The training batches: a fixed share teacher-sampled, the rest windows of the calibration text."""

from __future__ import annotations

import torch

from ..errors import AnnealError
from .config import AnnealConfig


class TrainingBatches:
    """Deterministic batches: step ``s`` always gets the same rows (a resumed run sees the same data).

    A ``teacher_data_ratio`` share of each batch comes from teacher-sampled sequences, the rest are
    random windows of the calibration token stream (C4).
    """

    def __init__(self, stream: torch.Tensor, teacher_rows: torch.Tensor | None, cfg: AnnealConfig) -> None:
        if stream.numel() < cfg.runtime.seqlen + 1 and (teacher_rows is None or teacher_rows.numel() == 0):
            raise AnnealError(
                f"no calibration tokens: the token stream has {stream.numel()} tokens, fewer than one "
                f"{cfg.runtime.seqlen}-token window, and no teacher samples; give more text or a smaller --seqlen"
            )
        self.stream, self.teacher, self.runtime = stream, teacher_rows, cfg.runtime
        has_teacher = teacher_rows is not None and teacher_rows.shape[0] > 0
        self.n_teacher = round(cfg.runtime.batch_size * cfg.loss.teacher_data_ratio) if has_teacher else 0
        if stream.numel() < cfg.runtime.seqlen + 1:
            self.n_teacher = cfg.runtime.batch_size

    def batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.runtime.seed * 1_000_003 + step)
        rows = []
        if self.n_teacher:
            idx = torch.randint(0, self.teacher.shape[0], (self.n_teacher,), generator=gen)
            rows.append(self.teacher[idx, : self.runtime.seqlen])
        n_c4 = self.runtime.batch_size - self.n_teacher
        if n_c4:
            starts = torch.randint(0, self.stream.numel() - self.runtime.seqlen, (n_c4,), generator=gen)
            rows.append(torch.stack([self.stream[s : s + self.runtime.seqlen] for s in starts.tolist()]))
        return torch.cat(rows)
