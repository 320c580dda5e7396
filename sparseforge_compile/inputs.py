"""Checks of user inputs shared by the CLI and the API: each fails in one line naming the flag, the
value and the fix, before any model is loaded, any weight changes or any file is written. Also the
CLI's JSON outputs, written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .errors import UsageError


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file a command will write: not a folder, and under a folder that exists or can be made."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder: give a file name, e.g. {target / 'result.json'}")
    if target.exists() and not target.is_file():  # a device or pipe: the atomic rename would replace it
        raise UsageError(f"{flag} {target} is not a regular file (a device, pipe or socket): give a file path")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {target}: {existing} is a file, not a folder: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: {existing} is not writable: choose another path")
    return target


def check_at_least(flag: str, value: int | None, minimum: int = 1, hint: str = "") -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value}: must be >= {minimum}" + (f" ({hint})" if hint else ""))


def pick_windows(flag: str, asked: int | None, total: int, all_value: int | None = None) -> int:
    """How many of ``total`` windows to score: all where ``asked`` is None (or ``all_value``), else
    exactly ``asked``; a count that would score another set (0, negative, more than there are) is refused."""
    if asked is None or (all_value is not None and asked == all_value):
        return total
    if asked < 1 or asked > total:
        everything = "leave it out" if all_value is None else f"give {all_value}"
        raise UsageError(f"{flag} {asked}: the text has {total} windows: give 1 to {total} ({everything} "
                         f"to score all)")
    return asked


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def check_seqlen_fits(model: nn.Module, seqlen: int, flag: str) -> None:
    """Sequences longer than the model's position table fail deep inside its embedding (or, with
    rotary positions, run past what it was trained on)."""
    positions = max_positions(model)
    if positions is not None and seqlen > positions:
        raise UsageError(f"{flag} {seqlen} exceeds {type(model).__name__}'s {positions} positions: use "
                         f"{flag} {positions} or less")


def check_generation_fits(model: nn.Module, prompt_tokens: int, new_tokens: int) -> None:
    """Prompt and new tokens must fit the position table (past it the embedding lookup fails)."""
    positions = max_positions(model)
    if positions is None or prompt_tokens + new_tokens <= positions:
        return
    fix = (f"lower --max-new-tokens to {positions - prompt_tokens}" if prompt_tokens < positions
           else "shorten the prompt")
    raise UsageError(f"the prompt's {prompt_tokens} tokens + --max-new-tokens {new_tokens} exceed "
                     f"{type(model).__name__}'s {positions} positions: {fix}")


def require_module(model: object, what: str) -> None:
    """``what`` takes a loaded torch model; a name or a path is the usual mistake."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"{what} needs a torch nn.Module, got {type(model).__name__}: load one with "
                         f"sparseforge_compile.load_model(name).model")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but CUDA is not available here: use --device cpu")
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    return name


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
