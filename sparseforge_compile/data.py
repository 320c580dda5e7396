"""Evaluation and calibration text: WikiText-2 raw and the C4 train sample, from a data directory.

The perplexity protocol (SparseGPT / Wanda / MaskLLM) is in ``../shared/data/README.md``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .errors import DataError

WIKITEXT_FILES = {"test": "wikitext-2-raw/wiki.test.raw", "valid": "wikitext-2-raw/wiki.valid.raw"}
C4_FILE = "c4/c4_en_train_head1000.jsonl"


def default_data_dir() -> Path | None:
    """``$SPARSEFORGE_DATA``, else ``../shared/data`` beside the repository (or the working dir)."""
    env = os.environ.get("SPARSEFORGE_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if path is None or not path.is_dir():
        raise DataError(
            f"data directory {str(path) if path else '(none found)'} does not exist: pass --data-dir DIR or set "
            f"SPARSEFORGE_DATA to a folder holding {WIKITEXT_FILES['test']} and {C4_FILE}"
        )
    return path


def _data_file(data_dir: str | Path | None, relative: str) -> Path:
    path = resolve_data_dir(data_dir) / relative
    if not path.is_file():
        raise DataError(f"missing data file {path}: put {relative} under the data directory (--data-dir)")
    return path


def load_wikitext2(split: str = "test", data_dir: str | Path | None = None) -> str:
    """The raw split joined exactly as ``"\\n\\n".join(load_dataset(...)["text"])``."""
    if split not in WIKITEXT_FILES:
        raise DataError(f"unknown WikiText-2 split {split!r}; use 'test' or 'valid'")
    raw = _data_file(data_dir, WIKITEXT_FILES[split]).read_text(encoding="utf-8")
    return "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))


def load_c4_documents(data_dir: str | Path | None = None) -> list[str]:
    path = _data_file(data_dir, C4_FILE)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` as the tokenizer's default call makes them (what the papers use)."""
    out = tokenizer(text, return_tensors="pt")
    ids = out["input_ids"]
    return ids.reshape(-1).to(torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows, tail dropped: shape ``(numel // seqlen, seqlen)``."""
    if seqlen < 2:
        raise DataError(f"seqlen {seqlen} is too short: need at least 2 tokens per window")
    count = tokens.numel() // seqlen
    if count == 0:
        raise DataError(
            f"the text has {tokens.numel()} tokens, fewer than one window of seqlen {seqlen}: use a smaller --seqlen"
        )
    windows = tokens[: count * seqlen].reshape(count, seqlen)
    return windows[:max_windows] if max_windows else windows


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0,
                        data_dir: str | Path | None = None) -> torch.Tensor:
    """``n`` random ``seqlen``-token windows of the C4 sample, as SparseGPT draws them.

    A random document longer than ``seqlen`` tokens, then a random start inside it (Python's
    ``random`` seeded with ``seed``). Shape ``(n, seqlen)``.
    """
    if n < 1:
        raise DataError(f"asked for {n} calibration windows: need at least one")
    docs = [tokenize(tokenizer, d) for d in load_c4_documents(data_dir)]
    long_docs = [d for d in docs if d.numel() > seqlen]
    if not long_docs:
        raise DataError(f"no C4 document is longer than seqlen {seqlen} tokens: use a smaller calibration seqlen")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        doc = long_docs[rng.randint(0, len(long_docs) - 1)]
        start = rng.randint(0, doc.numel() - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return torch.stack(out)


def token_stream(tokenizer, data_dir: str | Path | None = None, eos_id: int | None = None) -> torch.Tensor:
    """All C4 documents tokenized and concatenated (EOS between them when known): training text."""
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    parts = []
    for doc in load_c4_documents(data_dir):
        parts.append(tokenize(tokenizer, doc))
        if eos is not None:
            parts.append(torch.tensor([eos]))
    if not parts:
        raise DataError("the C4 sample holds no documents: no calibration tokens")
    return torch.cat(parts)
