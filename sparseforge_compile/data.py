"""Evaluation and calibration text: WikiText-2 raw and the C4 train sample, from a data directory.

The perplexity protocol (SparseGPT / Wanda / MaskLLM) is in ``../shared/data/README.md``.
"""

from __future__ import annotations

import hashlib
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


# sha256 of the joined texts the protocol defines (utf-8): a hub copy must give the same text.
WIKITEXT_SHA256 = {"test": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83",
                   "valid": "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"}
HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
HUB_C4 = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")  # the shard SparseGPT / Wanda calibrate on
C4_SAMPLE_DOCS = 1000  # the local sample is the shard's first 1,000 documents
HUB_SPLITS = {"test": "test", "valid": "validation"}
C4_SOURCE = "c4"  # the name of the built-in calibration text among --calib-data sources


def _local_or_none(data_dir: str | Path | None, relative: str) -> Path | None:
    """The local file if a data folder holds it; None where no folder was given or found (the hub then
    serves); an error where a folder was given but lacks the file."""
    if data_dir is None and default_data_dir() is None:
        return None
    return _data_file(data_dir, relative)


def _from_hub(what: str, load):
    """``load()`` through the datasets library, any failure one line saying both places looked in."""
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{what}: no local data folder (--data-dir or SPARSEFORGE_DATA) and the datasets library "
                        f"is not installed to fetch it") from exc
    try:
        return load()
    except Exception as exc:  # the hub, its cache and the network fail in many types; all mean "not there"
        raise DataError(f"{what}: no local data folder (--data-dir or SPARSEFORGE_DATA) and the datasets hub is "
                        f"not reachable ({type(exc).__name__})") from exc


def load_wikitext2(split: str = "test", data_dir: str | Path | None = None) -> str:
    """The raw split joined exactly as ``"\\n\\n".join(load_dataset(...)["text"])``: from the data folder,
    or (with none) through the datasets library, checked against the protocol text's sha256."""
    if split not in WIKITEXT_FILES:
        raise DataError(f"unknown WikiText-2 split {split!r}; use 'test' or 'valid'")
    path = _local_or_none(data_dir, WIKITEXT_FILES[split])
    if path is not None:
        raw = path.read_text(encoding="utf-8")
        return "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))

    def load() -> list[str]:
        from datasets import load_dataset

        return load_dataset(*HUB_WIKITEXT, split=HUB_SPLITS[split])["text"]

    text = "\n\n".join(_from_hub(f"WikiText-2 {split}", load))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != WIKITEXT_SHA256[split]:
        raise DataError(f"WikiText-2 {split} from {HUB_WIKITEXT[0]} is not the protocol's text (sha256 {digest[:12]}, "
                        f"expected {WIKITEXT_SHA256[split][:12]}): use a local copy with --data-dir")
    return text


def load_c4_documents(data_dir: str | Path | None = None) -> list[str]:
    """The C4 calibration sample: the local file, or the first 1,000 documents of the same shard."""
    path = _local_or_none(data_dir, C4_FILE)
    if path is not None:
        return read_documents(path)

    def load() -> list[str]:
        from datasets import load_dataset

        stream = load_dataset(HUB_C4[0], data_files={"train": HUB_C4[1]}, split="train", streaming=True)
        return [row["text"] for _, row in zip(range(C4_SAMPLE_DOCS), stream)]

    return _from_hub("the C4 calibration sample", load)


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """A user's text as documents: a plain-text file is one document; JSON lines and parquet give one
    document per row, from ``field``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"calibration text {path} is not a file: give a .txt, .jsonl or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__})") from exc
        if field not in table.column_names:
            raise DataError(f"{path}: no {field!r} column (columns: {', '.join(table.column_names)})")
        docs = [str(v) for v in table.column(field).to_pylist() if v]
    elif path.suffix in (".jsonl", ".json"):
        docs = []
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                lines = list(f)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{path}:{number}: no {field!r} text field in this line")
            docs.append(row[field])
    else:
        try:
            docs = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path}: holds no documents (no text in it)")
    return docs


def check_sources(sources: tuple[str, ...] | list[str]) -> None:
    """Read each of the user's text files once, so a bad one fails before any work starts."""
    for source in sources:
        if source != C4_SOURCE:
            read_documents(source)


def calibration_documents(sources: tuple[str, ...] | list[str] | None = None,
                          data_dir: str | Path | None = None) -> list[str]:
    """Documents of every source in order: ``"c4"`` (the built-in sample) or a user's file."""
    docs: list[str] = []
    for source in sources or (C4_SOURCE,):
        docs += load_c4_documents(data_dir) if source == C4_SOURCE else read_documents(source)
    return docs


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` as the tokenizer's default call makes them (what the papers use)."""
    out = tokenizer(text, return_tensors="pt")
    ids = out["input_ids"]
    return ids.reshape(-1).to(torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows, tail dropped: shape ``(numel // seqlen, seqlen)``."""
    if seqlen < 2:
        raise DataError(f"seqlen {seqlen} is too short: need at least 2 tokens per window")
    if tokens.numel() == 0:  # not a --seqlen problem: the tokenizer gave nothing
        raise DataError("the tokenizer turned the text into 0 tokens: the model folder's tokenizer files are empty "
                        "or not this model's; add its tokenizer (tokenizer.json) to the folder")
    count = tokens.numel() // seqlen
    if count == 0:
        raise DataError(
            f"the text has {tokens.numel()} tokens, fewer than one window of seqlen {seqlen}: use a smaller --seqlen"
        )
    windows = tokens[: count * seqlen].reshape(count, seqlen)
    return windows[:max_windows] if max_windows else windows


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0, data_dir: str | Path | None = None,
                        sources: tuple[str, ...] | None = None) -> torch.Tensor:
    """``n`` random ``seqlen``-token windows of the calibration text (default the C4 sample), as SparseGPT
    draws them.

    A random document longer than ``seqlen`` tokens, then a random start inside it (Python's
    ``random`` seeded with ``seed``). Shape ``(n, seqlen)``.
    """
    if n < 1:
        raise DataError(f"asked for {n} calibration windows: need at least one")
    docs = [tokenize(tokenizer, d) for d in calibration_documents(sources, data_dir)]
    long_docs = [d for d in docs if d.numel() > seqlen]
    if not long_docs:
        raise DataError(f"no calibration document is longer than seqlen {seqlen} tokens: use a smaller "
                        f"calibration seqlen or longer documents")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        doc = long_docs[rng.randint(0, len(long_docs) - 1)]
        start = rng.randint(0, doc.numel() - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return torch.stack(out)


def token_stream(tokenizer, data_dir: str | Path | None = None, eos_id: int | None = None,
                 sources: tuple[str, ...] | None = None) -> torch.Tensor:
    """All calibration documents (default the C4 sample) tokenized and concatenated, EOS between them
    when known: the training text."""
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    parts = []
    for doc in calibration_documents(sources, data_dir):
        parts.append(tokenize(tokenizer, doc))
        if eos is not None:
            parts.append(torch.tensor([eos]))
    if not parts:
        raise DataError("the calibration text holds no documents: no calibration tokens")
    return torch.cat(parts)
