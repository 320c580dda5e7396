"""What a training run was started on (model, pattern, settings, data), kept beside its checkpoint, so
that ``--resume`` refuses a checkpoint of another run, or a damaged one, in one line before any work.

The record is ``checkpoint/run.json``; the loop's state is ``checkpoint/state.pt``. A finished run
removes both (and the teacher samples) unless ``keep_training_state`` is set; a crashed run keeps them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AnnealError

CHECKPOINT_DIR = "checkpoint"
RUN_FILE = "run.json"
STATE_FILE = "state.pt"
TEACHER_ROWS_FILE = "teacher_samples.safetensors"
# Settings that change neither the trained weights nor the data: a resume may change them.
RESUMABLE_SETTINGS = frozenset({"checkpoint_every", "keep_training_state", "log_every", "budget_s",
                                "teacher_sample_batch"})
# Config entries that say where or how a model was loaded, not what it is.
_LOAD_ONLY_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
                             "architectures", "quantization_config"})
STATE_KEYS = ("step", "total_steps", "params", "masks", "opt", "history", "config", "rng", "weights_folded")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_digest(model: nn.Module) -> str:
    """Names, shapes and dtypes of every parameter, and 64 values spread over each (cheap on any size)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        if flat.numel():
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _source_digest(source: str) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        return source  # the built-in sample ("c4"): its name is its identity
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"{path.resolve()}:{digest.hexdigest()[:16]}"


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def run_identity(model: nn.Module, settings: Mapping[str, Any], sources: Iterable[str]) -> dict:
    """The record of a run: the model (name, architecture, config and weights digests), every setting
    that shapes the training, and each data source (files by content)."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    name = str(config_dict.get("_name_or_path") or "") or type(model).__name__
    flat = _flatten(settings)
    return {"model": name, "architecture": type(model).__name__,
            "model_config": _digest({k: v for k, v in config_dict.items() if k not in _LOAD_ONLY_KEYS}),
            "weights": _weights_digest(model),
            "settings": {k: v for k, v in flat.items() if k.rpartition(".")[2] not in RESUMABLE_SETTINGS},
            "data": [_source_digest(s) for s in sources]}


def identity_mismatch(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """The first difference between two run records, as ``what: saved -> now``; None if they match."""
    labels = {"architecture": "architecture", "model_config": "model config", "weights": "initial weights",
              "data": "data sources"}
    for key, label in labels.items():
        if saved.get(key) != mine.get(key):
            return f"{label} {saved.get(key)} -> {mine.get(key)}"
    ours, theirs = mine.get("settings", {}), saved.get("settings", {})
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            return f"setting {key} {theirs.get(key, '(unset)')!r} -> {ours.get(key, '(unset)')!r}"
    return None


def damaged(path: Path, exc: BaseException) -> AnnealError:
    return AnnealError(f"{path} is damaged or unreadable ({type(exc).__name__}): the checkpoint cannot be "
                       f"resumed; run again without --resume (or delete {path.parent})")


def state_mismatch(state: Any, params: list[torch.Tensor], masks: Iterable[str]) -> str | None:
    """Why a loaded training state cannot be restored into ``params`` and ``masks``; None if it can."""
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        return f"its state lacks {', '.join(missing)}"
    saved = state["params"]
    if len(saved) != len(params):
        return f"it holds {len(saved)} parameters, this model {len(params)}"
    for i, (s, p) in enumerate(zip(saved, params)):
        if tuple(s.shape) != tuple(p.shape):
            return f"parameter {i} is {tuple(s.shape)} there, {tuple(p.shape)} here"
    missing = sorted(set(masks) - set(state["masks"]))
    if missing:
        return f"it has no mask for layer {missing[0]}"
    return None


def read_state(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """``state.pt``, any failure to read it (truncated, not a checkpoint) one line saying it is damaged."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for a damaged file; all mean "cannot resume"
        raise damaged(path, exc) from exc


def check_resume(out: Path, identity: Mapping[str, Any], params: list[torch.Tensor]) -> None:
    """Refuse, before any weight changes, a resume whose checkpoint is missing, damaged, or of another run."""
    folder = out / CHECKPOINT_DIR
    state_path, record_path = folder / STATE_FILE, folder / RUN_FILE
    if not state_path.is_file():
        raise AnnealError(f"no checkpoint at {state_path}: --resume needs a folder written by an earlier run "
                          f"with checkpoint_every > 0 (a finished run keeps none without --keep-training-state)")
    try:
        saved = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError as exc:
        raise AnnealError(f"{record_path} is missing: the checkpoint does not say what it was trained on; "
                          f"run again without --resume") from exc
    except (OSError, ValueError) as exc:
        raise damaged(record_path, exc) from exc
    difference = identity_mismatch(saved, identity)
    if difference:
        raise AnnealError(f"--resume: {folder} belongs to another run ({difference}): resume with the model, data "
                          f"and settings it was started with, or run without --resume")
    state = read_state(state_path, mmap=True)
    if isinstance(state, dict) and state.get("shards") and isinstance(state.get("params"), list):
        params = state["params"]  # rank 0's shards: checked against the sharded model when it loads them
    problem = state_mismatch(state, params, ())
    if problem:
        raise AnnealError(f"{state_path} does not fit this model ({problem}): it is damaged; run without --resume")


def refuse_unfinished(out: Path) -> None:
    """A fresh run must not overwrite the checkpoint of an unfinished one: that is --resume's to use."""
    state = out / CHECKPOINT_DIR / STATE_FILE
    if state.exists() and not _finished(out):
        raise AnnealError(f"{state} holds an unfinished run's checkpoint: pass --resume to continue it, or delete "
                          f"{state.parent} (or choose another output folder) to start over")


def start_record(out: Path, identity: Mapping[str, Any]) -> None:
    """A fresh run's record of what it is started on (written before its first checkpoint)."""
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(identity, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / RUN_FILE)


def _finished(out: Path) -> bool:
    try:
        return bool(json.loads((out / CHECKPOINT_DIR / RUN_FILE).read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def finish_record(out: Path, keep: bool) -> None:
    """The run ended: drop its training state, or (kept) mark it finished so a fresh run may replace it."""
    record = out / CHECKPOINT_DIR / RUN_FILE
    if not keep:
        drop_training_state(out)
    elif record.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            start_record(out, {**json.loads(record.read_text(encoding="utf-8")), "finished": True})


def drop_training_state(out: Path) -> None:
    """A finished run's optimizer state and teacher samples: only --resume read them."""
    folder = out / CHECKPOINT_DIR
    for path in (folder / STATE_FILE, folder / RUN_FILE, folder / (STATE_FILE + ".tmp"), out / TEACHER_ROWS_FILE,
                 *folder.glob("state.rank*.pt*")):  # a sharded run's other ranks' shards
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def resume_identity(model: nn.Module, settings: Mapping[str, Any], sources: Iterable[str], out: Path | None,
                    resume: bool, checkpointing: bool) -> dict | None:
    """A training run's record (None where nothing is checkpointed or resumed), checked first: a resume
    must match its checkpoint, and a fresh run must not overwrite an unfinished one's."""
    if out is None:
        return None
    if not resume:
        refuse_unfinished(out)
        if not checkpointing:
            return None
    identity = run_identity(model, settings, sources)
    if resume:
        check_resume(out, identity, list(dict.fromkeys(model.parameters())))
    return identity
