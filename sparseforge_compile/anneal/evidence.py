"""The evidence behind the mask scores: each weight's OBD saliency ``D = 1/2 H_ii w_ii^2``.

The Hessian diagonal is estimated every ``importance_every`` soft-phase steps, either by the Fisher
information of the student's own predictions (labels *sampled from the student*, so the batch-mean
gradient has mean zero and tokens x its square estimates the per-token Fisher, which is the Hessian
of the KL at the teacher; the plain "empirical Fisher" of the training gradient is not: it vanishes
as the student fits and is inflated where the gradient is biased) or by Hutchinson (``E[(Hv) * v]``,
Rademacher ``v``, by double backward). :func:`refresh_scores` turns it into the mask scores

    score = D / mean|D| * min(probes / evidence_probes, 1) + margin(p) * (2 * warm_mask - 1)

so that with no evidence yet the mask *is* the warm mask, and a group changes only once the evidence
for a swap exceeds the (decaying) margin, in units of the layer's mean |D|.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..masks import MaskState, add_importances
from .config import AnnealConfig


class Evidence:
    """One curvature estimator: how it probes, and the saliency ``1/2 H_ii w_ii^2`` it has so far."""

    #: whether it probes through the mask gradient of the training step's own forward
    reads_step: bool = False
    #: ``distributed.Ranks`` where the batch is split over processes (None: one process)
    ranks = None
    #: each rank holds rows of every layer (``sharding.py``), whose mask gradients arrive rank-averaged
    sharded = False

    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState]) -> None:
        self.cfg, self.masks = cfg, masks

    def probe_step(self, step: int, s_logits: torch.Tensor) -> None:
        """Probe from the training step's logits (their mask gradients kept, ``reads_step``)."""

    def probe_alone(self, step: int, loss: Callable[[], torch.Tensor], params: dict[str, nn.Parameter],
                    views: dict[str, torch.Tensor]) -> None:
        """Probe with a forward of its own (``loss``), before the training step."""

    def curvature(self, name: str, ms: MaskState) -> torch.Tensor:
        """~ 1/2 H_ii w_ii^2 for every weight of the layer (loss units)."""
        raise NotImplementedError

    def probes(self, ms: MaskState) -> int:
        raise NotImplementedError

    def weight(self, ms: MaskState) -> float:
        """How much the evidence counts yet: one probe is noise, ``evidence_probes`` count fully."""
        return min(self.probes(ms) / self.cfg.evidence.evidence_probes, 1.0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FisherEvidence(Evidence):
    """1/2 F_ii w_ii^2 from labels sampled from the student itself (the mask gradient is g * w), kept
    as an EMA in each ``MaskState.importance``."""

    reads_step = True

    def probe_step(self, step: int, s_logits: torch.Tensor) -> None:
        """E_y[grad log p(y)] = 0, so tokens x (batch-mean gradient)^2 is an unbiased estimate of the
        per-token Fisher diagonal, the Hessian of the mean KL at the teacher."""
        masks = [ms for ms in self.masks.values() if ms.last_mask is not None]
        if not masks:
            return
        logits = s_logits[:, :-1].detach().float()
        # Seeded per step: the same seed gives the same probes, resumed or not, whatever ran before.
        seed = self.cfg.runtime.seed * 1_000_003 + step + 17
        if self.ranks is None:
            gen = torch.Generator(device=logits.device).manual_seed(seed)
            race = torch.empty_like(logits).exponential_(generator=gen)
        else:  # seeded per global row: the same labels on any number of ranks
            race = self.ranks.row_race(logits, seed)
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
        if pairs and self.ranks is not None:  # the global batch-mean gradient, averaged before it is squared
            if not self.sharded:  # sharded, the mask gather's backward averaged it already
                self.ranks.mean_([g for _, g in pairs])
            tokens *= self.ranks.world
        if pairs:
            with torch.no_grad():
                squares = torch._foreach_mul([g for _, g in pairs], [g for _, g in pairs])
                torch._foreach_mul_(squares, 0.5 * tokens)
            add_importances([ms for ms, _ in pairs], squares)

    def curvature(self, name: str, ms: MaskState) -> torch.Tensor:
        return ms.corrected("importance")

    def probes(self, ms: MaskState) -> int:
        return ms._updates[1]


class HutchinsonEvidence(Evidence):
    """E[(Hv) * v] per weight, one Rademacher probe per refresh, by double backward (eager attention)."""

    def __init__(self, cfg: AnnealConfig, masks: dict[str, MaskState]) -> None:
        super().__init__(cfg, masks)
        self.curv: dict[str, torch.Tensor] = {}
        self.count = 0

    def probe_alone(self, step: int, loss: Callable[[], torch.Tensor], params: dict[str, nn.Parameter],
                    views: dict[str, torch.Tensor]) -> None:
        """``params``: each layer's parameter, differentiated itself (GPT-2's Conv1D views are transposes)."""
        from ..hessian import hutchinson_diagonal

        value = loss()
        for ms in self.masks.values():
            ms.hook_enabled = False
        try:
            diag = hutchinson_diagonal(value, params, seed=self.cfg.runtime.seed + step)
        finally:
            for ms in self.masks.values():
                ms.hook_enabled = True
        if self.ranks is not None:  # the same probe vector on every rank: the estimates average
            if self.sharded:
                raise ValueError("importance='hutchinson' does not run on a sharded model: use 'fisher'")
            self.ranks.mean_(list(diag.values()))
        beta = self.cfg.evidence.importance_beta
        for n, d in diag.items():
            curv = 0.5 * (d.t() if d.shape != views[n].shape else d) * views[n].detach().float().square()
            old = self.curv.get(n)
            self.curv[n] = curv if old is None else old.mul_(beta).add_(curv, alpha=1 - beta)
        self.count += 1

    def curvature(self, name: str, ms: MaskState) -> torch.Tensor:
        return self.curv.get(name, torch.zeros_like(ms.importance))

    def probes(self, ms: MaskState) -> int:
        return self.count

    def state_dict(self) -> dict:
        return {"hutchinson": dict(self.curv), "hutchinson_probes": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.curv = dict(state["hutchinson"])
        self.count = int(state.get("hutchinson_probes", 0))


def make_evidence(cfg: AnnealConfig, masks: dict[str, MaskState]) -> Evidence:
    return (HutchinsonEvidence if cfg.evidence.importance == "hutchinson" else FisherEvidence)(cfg, masks)


@torch.no_grad()
def refresh_scores(masks: dict[str, MaskState], evidence: Evidence, warm: dict[str, torch.Tensor],
                   margin: float, step: int) -> None:
    """Set every layer's scores from its OBD saliency and the prior toward the warm-start mask."""
    # OBD saliency with the latent weight, the same formula kept or pruned: the loss cost of not having
    # the weight; in units of the layer's mean |saliency| (over every rank's rows where sharded).
    means = _sharded_means(masks, evidence) if evidence.sharded else {}
    for name, ms in masks.items():
        saliency = evidence.curvature(name, ms)
        mean = means[name] if evidence.sharded else saliency.abs().mean()
        score = saliency / mean.clamp_min(1e-30) * evidence.weight(ms)
        if name in warm:
            score += margin * (2 * warm[name].float() - 1)
        elif not step:
            score += margin * (2 * ms.hard_mask().float() - 1)  # no warm start: keep magnitude's choice until evidence
        ms.set_scores(score)


def _sharded_means(masks: dict[str, MaskState], evidence: Evidence) -> dict[str, torch.Tensor]:
    """Each layer's mean |saliency| over every rank's rows: one all-reduce of all layers' sums and counts."""
    totals = torch.stack([t for name, ms in masks.items() for t in (
        evidence.curvature(name, ms).abs().sum().float(), ms.score.new_tensor(float(ms.score.numel())))])
    evidence.ranks.sum_([totals])
    return dict(zip(masks, (totals[0::2] / totals[1::2].clamp_min(1.0)).unbind()))
