"""The annealing loop: one training step, the run over a step count or a time budget, checkpoints
and resume, and the metrics rows (metrics.jsonl)."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AnnealError
from ..masks import MaskState, make_masks
from ..sharding import local_shard
from .batches import TrainingBatches
from .compile import Compilation, Forwards
from .config import AnnealConfig
from .evidence import make_evidence, refresh_scores
from .guard import FiniteGuard
from .identity import read_state, state_mismatch
from .loss import SOURCE_METRICS, LayerTaps, fused_loss_terms, loss_terms
from .schedule import SchedulePoint, schedule

log = logging.getLogger(__name__)


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
    and ``plain_forward``, in that order, whose decoder blocks are compiled (with ``cfg.runtime.compile``) one
    block at a time (without them those two run eagerly);
    ``compile_forward`` the same graph with its blocks outlined, whose shared block is compiled alone.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                 masks: dict[str, MaskState], weight_views: dict[str, Callable[[], torch.Tensor]],
                 teacher: Callable[[torch.Tensor], torch.Tensor], batches: TrainingBatches, cfg: AnnealConfig,
                 *, device: torch.device, warm_masks: dict[str, torch.Tensor] | None = None,
                 plain_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 taps: LayerTaps | None = None, out_dir: Path | None = None, progress: bool = True,
                 regions: Sequence[nn.Module] = (), compile_forward: Callable | None = None,
                 ranks=None, layer_params: dict[str, tuple[nn.Parameter, bool]] | None = None) -> None:
        if cfg.loss.hidden_weight and taps is None:
            raise AnnealError("hidden_weight > 0 needs block-output taps on the teacher and the student")
        self.params, self.masks, self.weight_views, self.batches, self.cfg = params, masks, weight_views, batches, cfg
        self.taps = taps if cfg.loss.hidden_weight else None
        self.device, self.out_dir, self.progress = device, out_dir, progress
        self.warm = {k: v.to(device) for k, v in (warm_masks or {}).items()}
        self.evidence = make_evidence(cfg, masks)
        # distributed.Ranks (None: one process): gradients, probes, clocks and writes agree across ranks
        self.ranks, self.evidence.ranks = ranks, ranks
        # layer_params given: the model is sharded (sharding.py); each rank holds rows of every layer, its
        # mask state those rows, and FSDP averages the weight gradients.
        self.sharded = self.evidence.sharded = layer_params is not None and ranks is not None
        self._sync = ranks.gradient_sync(params) if ranks is not None and not self.sharded else None
        self._world = ranks.world if ranks is not None else 1
        for name, ms in masks.items():
            ms.importance_beta = cfg.evidence.importance_beta
            if cfg.evidence.fixed_mask:
                if name not in self.warm:
                    raise AnnealError(f"{name}: a fixed-mask run needs a warm-start mask for every layer")
                ms.set_hard(self.warm[name])
        self.opt = torch.optim.AdamW(params, lr=cfg.runtime.lr, weight_decay=cfg.runtime.weight_decay, betas=(0.9, 0.95),
                                     **({"fused": True} if device.type == "cuda" else {}))
        self.step = 0
        self.total_steps = cfg.schedule.steps or 0  # 0: sized by time (train_budget_s), not by steps
        self.train_budget_s = 0.0  # budget runs: training seconds the schedule spans
        self.train_seconds = 0.0  # budget runs: training seconds spent so far (kept across --resume)
        self.history: list[dict] = []
        self.tokens = 0
        self._weights_folded = False
        self._autocast = cfg.autocasts(device)
        # Each masked layer's parameter, and whether its (out, in) weight view is the parameter
        # transposed (GPT-2's Conv1D): for gradients and names, which live on the parameter.
        self._layer_params = layer_params or {n: _parameter_of(self.weight_views[n]()) for n in masks}
        self.guard = FiniteGuard(params, {id(p): n for n, (p, _) in self._layer_params.items()}, cfg.runtime.grad_clip,
                                 device, deferred=bool(self.opt.defaults.get("fused")), out_dir=out_dir,
                                 ranks=ranks if self.sharded else None)
        kd = fused_loss_terms if cfg.fuses_kd(device) else loss_terms
        self.compilation = Compilation(Forwards(forward, plain_forward, teacher, kd), cfg, device, regions,
                                       outlined=compile_forward)
        if not cfg.evidence.fixed_mask:
            refresh_scores(self.masks, self.evidence, self.warm, cfg.evidence.prior_margin, self.step)

    def _global_sum(self, value: torch.Tensor | int) -> float:
        """A count over the layers' rows: this rank's, or (sharded) every rank's."""
        return self.ranks.agree(float(value), "sum") if self.sharded else float(value)

    @property
    def compiled(self) -> bool:
        return self.compilation.compiled

    @property
    def teacher(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.compilation.active.teacher

    # -- one step -------------------------------------------------------------------------------
    def _loss(self, ids: torch.Tensor, plain: bool, eager: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The training loss of the masked graph (or, ``plain``, of the plain model) on ``ids``. Block
        outputs are recorded while ``self.taps`` is set (a layer-wise weight)."""
        fns = self.compilation.eager if eager else self.compilation.active
        masked = not plain or fns.plain is None
        forward = fns.forward if masked else fns.plain
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
                t_logits = fns.teacher(ids)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                s_logits = forward(ids)
        finally:
            if taps is not None:
                taps.teacher.enabled = student_rec.enabled = False
            for ms in self.masks.values():
                ms.feed(None)
        hidden = (student_rec.take(), taps.teacher.take()) if taps is not None else None
        extra = {}
        if hidden is not None and self.ranks is not None:  # normalized by the whole batch's teacher energy
            extra["hidden_energy"] = self.ranks.block_energy(hidden[1])
        loss, parts = fns.loss_terms(s_logits, t_logits, ids, hidden, self.cfg.loss.kd_temperature, self.cfg.loss.ce_weight,
                                     self.cfg.loss.kl_weight, self.batches.n_teacher, **extra)
        if hidden is not None:  # weighed outside the compiled function: a changing weight recompiles nothing
            loss = loss + self.cfg.loss.hidden_weight * parts["hidden"]
            parts["hidden"] = parts["hidden"].detach()
        return loss, parts, s_logits

    def _plain_phase(self, point: SchedulePoint) -> bool:
        """Hard mask everywhere: train the plain model and re-zero the pruned weights after each step.

        Compiled flat, SparseForge stays on its masked graph with the hard mask fed: a second
        whole-graph compile (tens of seconds) would cost more than it saves. Compiled block by block
        (regional) the plain model's blocks compile in seconds, and its steps are the peer's, faster
        than the hard-mask graph's (benchmarks/curves.py on a run's metrics.jsonl)."""
        if self.compiled and not self.cfg.evidence.fixed_mask and not self.cfg.outlines(self.device):
            return False
        return point.blend >= 1.0 and (self.cfg.evidence.fixed_mask or self.compilation.eager.plain is not None)

    def schedule_progress(self) -> float | None:
        """Where a budget run is in its schedule (training time spent / budget); None for step runs."""
        if self.total_steps:
            return None
        return self.train_seconds / self.train_budget_s if self.train_budget_s else 0.0

    def train_step(self) -> dict:
        if self.compilation.first_step():
            try:
                return self._train_step()
            except AnnealError:
                raise
            except Exception as exc:  # any compiler failure: the flat graph, then eager
                self._reset_failed_step()
                self.compilation.fall_back(exc)
                return self.train_step()
        return self._train_step()

    def _reset_failed_step(self) -> None:
        """Forget what a step that raised half-way left behind (gradients, masks, recordings)."""
        self.opt.zero_grad(set_to_none=True)
        for ms in self.masks.values():
            ms.last_mask = None
            ms.feed(None)
        if self.taps is not None:
            for rec in self.taps.recorders():
                rec.enabled = False
                rec.clear()

    def _train_step(self) -> dict:
        cfg = self.cfg
        self.compilation.step_begins()
        point = schedule(cfg, self.step, self.total_steps, progress=self.schedule_progress())
        plain = self._plain_phase(point)
        probing = point.soft_phase and self.step % cfg.evidence.importance_every == 0
        # Only a probe reads the mask gradient; other steps skip its weight-sized backward.
        for ms in self.masks.values():
            ms.set_schedule(point.temperature, point.blend)
            ms.collecting = probing and self.evidence.reads_step
        for group in self.opt.param_groups:
            group["lr"] = cfg.runtime.lr * point.lr_scale
        ids = self.batches.batch(self.step)
        # Pinned and non-blocking: a copy from pageable memory waits for the GPU to drain first.
        ids = ids.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else ids
        if probing and not self.evidence.reads_step:
            views = {n: self.weight_views[n]() for n in self.masks}
            self.evidence.probe_alone(self.step, lambda: self._loss(ids, plain=False, eager=True)[0],
                                      {n: param for n, (param, _) in self._layer_params.items()}, views)
            self.opt.zero_grad(set_to_none=True)
        if plain and not self._weights_folded:
            self._reapply_masks()  # the step the phase starts: fold the hard mask into the weights
            self._weights_folded = True
        loss, parts, s_logits = self._loss(ids, plain)
        if probing and self.evidence.reads_step:
            self.evidence.probe_step(self.step, s_logits)
        loss.backward()
        for ms in self.masks.values():
            ms.last_mask = None
        if self._sync is not None:  # gradients, and the global batch's loss with them
            keys = [k for k in ("ce", "kl", "hidden") if isinstance(parts.get(k), torch.Tensor)]
            loss, *reduced = self._sync([loss.detach(), *(parts[k] for k in keys)])
            parts.update(zip(keys, reduced))
        elif self.sharded:  # FSDP averaged the gradients; the logged loss is the global batch's too
            keys = [k for k in ("ce", "kl", "hidden") if isinstance(parts.get(k), torch.Tensor)]
            packed = torch.stack([t.detach().float() for t in (loss, *(parts[k] for k in keys))])
            self.ranks.mean_([packed])
            loss, *reduced = packed.unbind()
            parts.update(zip(keys, reduced))
        if plain:
            self._mask_gradients()
        bad, grad_norm = self.guard.clip_and_check(loss.detach(), self.step)
        if self.guard.deferred:
            # No host sync: the fused optimizer skips the update on the device when the step is
            # non-finite, and the loop raises at its next check (log step, checkpoint, end).
            self.opt.found_inf = bad.float()
        elif bool(bad):
            raise AnnealError(self.guard.message(loss, self.step))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if plain:
            self._reapply_masks()
        if point.soft_phase and (self.step + 1) % cfg.evidence.importance_every == 0:
            refresh_scores(self.masks, self.evidence, self.warm, point.margin, self.step)
        self.step += 1
        self.tokens += ids.numel() * self._world
        return {"loss": loss.detach(), **parts, "grad_norm": grad_norm, "temperature": point.temperature,
                "blend": point.blend, "hidden_weight": cfg.loss.hidden_weight or 0.0,
                "margin": point.margin, "lr": cfg.runtime.lr * point.lr_scale}

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        """Zero the pruned weights' gradients on the plain model, as the masked graph's are: the
        update would be undone anyway (the weights are re-zeroed), and counted in the clipping norm
        they made the peer clip harder than SparseForge on the same loss."""
        grads, masks = [], []
        for name, ms in self.masks.items():
            param, transposed = self._layer_params[name]
            if param.grad is not None:
                grad = local_shard(param.grad)
                grads.append(grad.t() if transposed else grad)
                masks.append(ms._hard_float())
        if grads:
            torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def _reapply_masks(self) -> None:
        # One multi-tensor multiply for all layers: in the plain phase this runs every step (the
        # peer's every step), and one mul_ per layer was ~200 launches of host time.
        torch._foreach_mul_([self.weight_views[name]() for name in self.masks],
                            [ms._hard_float() for ms in self.masks.values()])

    def check_finite(self) -> None:
        """Raise :class:`AnnealError` if a step since the start went non-finite (one host sync)."""
        self.guard.check()

    # -- stats -------------------------------------------------------------------------------
    @torch.no_grad()
    def flips(self) -> int:
        """Weights whose keep/prune decision differs from the warm start."""
        return int(self._global_sum(sum((ms.hard_mask() != self.warm[n]).sum() for n, ms in self.masks.items()
                                        if n in self.warm)))

    @torch.no_grad()
    def undecided(self) -> float:
        """Fraction of all groups still undecided (one device sync for all layers)."""
        groups = self._global_sum(sum(ms.score.numel() // ms.pattern.m for ms in self.masks.values()))
        return self._global_sum(sum(ms.undecided_groups() for ms in self.masks.values())) / max(groups, 1)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's state; sharded, this rank's shards (``shards``: the world size they were cut for)."""
        opt = self.opt.state_dict()
        if self.sharded:
            opt = {**opt, "state": {i: {k: local_shard(v) for k, v in st.items()} for i, st in opt["state"].items()}}
        return {"step": self.step, "total_steps": self.total_steps, "tokens": self.tokens,
                "train_budget_s": self.train_budget_s, "train_seconds": self.train_seconds,
                "params": [local_shard(p).detach().clone() for p in self.params],
                "masks": {n: {k: v.clone() for k, v in ms.state_dict().items()} for n, ms in self.masks.items()},
                **({"shards": self._world} if self.sharded else {}),
                **self.evidence.state_dict(), "opt": opt,
                "weights_folded": self._weights_folded, "history": list(self.history),
                "config": self.cfg.to_json(), "rng": {"torch": torch.get_rng_state()}}

    def save_checkpoint(self, directory: Path) -> None:
        if self.ranks is not None and not self.sharded and not self._ranks_write():
            return
        path = self._state_path(directory)
        if self.sharded and not self.ranks.main:
            self.ranks.barrier()  # rank 0 makes the folder
        directory.mkdir(parents=True, exist_ok=True)
        if self.sharded and self.ranks.main:
            self.ranks.barrier()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a crash keeps the previous checkpoint
        if self.ranks is not None:
            self.ranks.barrier()

    def _state_path(self, directory: Path) -> Path:
        """``state.pt``; sharded, rank r > 0 keeps its shards beside it in ``state.rank<r>.pt``."""
        return directory / (f"state.rank{self.ranks.rank}.pt" if self.sharded and not self.ranks.main else "state.pt")

    def _ranks_write(self) -> bool:
        """Before rank 0 writes shared state: the mask-gradient EMAs averaged (an EMA is linear, so the
        average of the ranks' EMAs is the EMA of the averaged gradients); the others wait for the file."""
        self.ranks.mean_([ms.grad_ema for ms in self.masks.values()])
        if not self.ranks.main:
            self.ranks.barrier()
        return self.ranks.main

    def load_checkpoint(self, directory: Path) -> None:
        path = self._state_path(directory)
        if not path.exists():
            raise AnnealError(f"no checkpoint at {path}: --resume needs a folder written by an earlier run")
        state = read_state(path, self.device)
        shards = state.get("shards") if isinstance(state, dict) else None
        if shards != (self._world if self.sharded else None):
            have = f"shards for {shards} ranks" if shards else "an unsharded state"
            want = f"sharded over {self._world} ranks" if self.sharded else "not sharded"
            raise AnnealError(f"{path} holds {have} and this run is {want}: resume with the --nproc and --parallel "
                              f"it was written with")
        if self.sharded and isinstance(state, dict) and self.ranks.agree(state.get("step", -1), "max") != \
                self.ranks.agree(state.get("step", -1), "min"):  # a crash between two ranks' writes
            raise AnnealError(f"{directory}: the ranks' shards were saved at different steps (this rank's at step "
                              f"{state.get('step')}); the checkpoint cannot resume: run without --resume")
        problem = state_mismatch(state, [local_shard(p) for p in self.params], self.masks)
        if problem:  # checked before any weight is copied: a failed resume leaves the model as it was
            raise AnnealError(f"{path} does not fit this model ({problem}): run without --resume")
        if not self.cfg.same_run(state["config"]):
            raise AnnealError(f"{path} was written with another configuration; resume with the same flags")
        self._restore(state)
        self.total_steps = state["total_steps"]
        self.train_budget_s = float(state.get("train_budget_s", 0.0))
        torch.set_rng_state(state["rng"]["torch"].cpu())

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                local_shard(p).copy_(saved)
            for n, ms in self.masks.items():
                ms.load_state_dict(state["masks"][n])
        self.evidence.load_state_dict(state)
        self.opt.load_state_dict(_sharded_like(state["opt"], self.params) if self.sharded else state["opt"])
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
        """Train until ``cfg.schedule.steps`` steps, or, without them, until the time budget (``deadline``) is spent."""
        cfg = self.cfg
        start = time.perf_counter()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        writes = self.ranks is None or self.ranks.main
        metrics_file = self._open_metrics() if self.out_dir and writes else None
        try:
            budget_mode = not self.total_steps
            if budget_mode and not self.train_budget_s:
                self.train_budget_s = self._training_budget(deadline)
            bar = tqdm(total=None if budget_mode else self.total_steps, initial=self.step, desc="anneal",
                       disable=not self.progress, unit="step")
            self._t_last, self._tok_last, self._start = time.perf_counter(), self.tokens, start
            last = {}
            every = cfg.runtime.log_every if budget_mode else max(1, min(cfg.runtime.log_every, self.total_steps // 50))
            seconds_before, loop_t0 = self.train_seconds, time.perf_counter()

            recent: collections.deque[float] = collections.deque(maxlen=5)  # step seconds

            def more() -> bool:
                if budget_mode:
                    # Start no step that a typical recent one says would end past the budget (the median:
                    # one slow step, a recompile at a phase change, does not end the run early).
                    typical = statistics.median(recent) if recent else 0.0
                    go = self.train_seconds + typical < self.train_budget_s
                    return go if self.ranks is None else self.ranks.all(go)  # every rank stops on the same step
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
                if cfg.runtime.checkpoint_every and self.out_dir and self.step % cfg.runtime.checkpoint_every == 0:
                    self.check_finite()  # a checkpoint is only ever written from finite steps
                    self.save_checkpoint(self.out_dir / "checkpoint")
                self.train_seconds = seconds_before + time.perf_counter() - loop_t0
                if budget_mode and self.ranks is not None:  # one clock for the schedule on every rank
                    self.train_seconds = self.ranks.agree(self.train_seconds, "max")
                recent.append(time.perf_counter() - step_t0)
            self.check_finite()
            if last and (not self.history or self.history[-1]["step"] != self.step):
                self._log_row(last, metrics_file)  # the curves end where the run ended
            bar.close()
        finally:
            if metrics_file:
                metrics_file.close()
            self.compilation.uncompile_blocks()
        for ms in self.masks.values():
            ms.collecting = False
            ms.set_schedule(cfg.schedule.t_end, 1.0)
        return AnnealResult(steps=self.step, seconds=time.perf_counter() - start, tokens=self.tokens,
                            final_loss=float(last["loss"]) if last else float("nan"),
                            flips_vs_warm_start=self.flips() if self.warm else 0,
                            metrics_path=str(self.out_dir / "metrics.jsonl") if self.out_dir else None,
                            history=self.history, compiled=self.compiled)

    def _log_row(self, last: dict, metrics_file: TextIO | None) -> dict:
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
        if (self.ranks is not None and not self.sharded
                and self.ranks.agree(row["flips"], "max") != self.ranks.agree(row["flips"], "min")):
            raise AnnealError(f"step {self.step}: the ranks' masks differ ({row['flips']} flips on rank "
                              f"{self.ranks.rank}); the processes must run the same code on the same kind of device")
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
        if self.ranks is not None:  # the slowest rank sets the pace
            per_step = self.ranks.agree(per_step, "max")
        self.check_finite()
        self._restore(snapshot)
        self.train_budget_s = 0.0
        remaining = deadline - time.perf_counter() - per_step  # one step of slack: the last step overruns
        if self.ranks is not None:
            remaining = self.ranks.agree(remaining, "min")
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


def _sharded_like(opt_state: dict, params: list[nn.Parameter]) -> dict:
    """An optimizer state saved as local shards, its per-parameter tensors made DTensors like the
    parameters they belong to (scalars, such as AdamW's step, stay as they are)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for i, st in opt_state["state"].items():
        p = params[int(i)]
        state[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                          run_check=False) if v.dim() and v.shape == local_shard(p).shape else v
                    for k, v in st.items()}
    return {**opt_state, "state": state}


def _parameter_of(view: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The parameter a layer's (out, in) weight view reads, and whether the view is a view of it
    (GPT-2's Conv1D: the parameter transposed) rather than the parameter itself."""
    return (view, False) if view._base is None else (view._base, True)
