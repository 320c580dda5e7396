"""The checkpoint folder: its index (``sparseforge.json``), checksums, verified reads and the
crash-safe commit of a new checkpoint over an old one.

The index is the only thing trusted to say what the checkpoint is: a load reads exactly the files it
names, each checked against its sha256, and every file name in it must be a plain name inside the
folder. A save never writes over a file the index did not write.

Commit (``commit``): the new files are written into a staging folder inside the target, moved in
under generation names no earlier index uses, and an index naming those is swapped in with
``os.replace``; the files are then copied to their usual names (what plain ``transformers`` reads)
and a second index naming those is swapped in; the old files go last. At every instant the index
describes a complete checkpoint, old or new; what a crash leaves behind the next save deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..masks import NMPattern

MANIFEST_NAME = "sparseforge.json"
COMPACT_NAME = "sparseforge.compact.safetensors"
FORMAT_NAME = "sparseforge-checkpoint"
FORMAT_VERSION = 2  # 2: file checksums, generation names and owned leftovers in the index
FORMATS = ("hf", "compact")
STAGING_NAME = ".sparseforge-staging"
STAGING_MARK = "written-by-sparseforge"
# Names only this tool writes: a file of a not yet (or no longer) current generation, a copy on its
# way to its usual name, an index being written.
_TEMP_NAME = re.compile(r"^\..+\.sparseforge-(g\d+|swap|new)$")
# What a Hugging Face model folder holds: an output folder with such files that no index of ours
# lists belongs to someone else.
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|"
                          r"pytorch_model.*\.bin|tokenizer.*|special_tokens_map\.json|vocab\.(json|txt)|"
                          r"merges\.txt)$")

RUN_FILES = {"teacher_samples.safetensors"}  # a pruning run's own file in its output folder, not a model



# ---------------------------------------------------------------------------------------------
# Checksums and safetensors checks
# ---------------------------------------------------------------------------------------------

def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, the bytes safetensors stores)."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def tensor_record(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "sha256": tensor_sha256(tensor)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _layout(data: bytes, path: Path) -> dict[str, dict]:
    """The header of safetensors bytes, checked against their size (names the cut tensor)."""
    size = len(data)
    if size < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes): not a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > size - 8:
        raise CheckpointError(f"{path}: truncated: header claims {header_len} bytes, file has {size}")
    try:
        header = json.loads(data[8: 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes {start}..{end} of the data, "
                                  f"the file holds {data_size}; re-save the checkpoint")
    return header


def safetensors_layout(path: Path) -> dict[str, dict]:
    """The checked header of the safetensors file ``path``."""
    return _layout(Path(path).read_bytes(), Path(path))


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------

def plain_name(value: object, where: str, index: Path) -> str:
    """``value`` if it is a plain file name inside the folder, else a CheckpointError naming it."""
    if (not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value
            or "\0" in value or os.path.isabs(value) or Path(value).name != value):
        raise CheckpointError(f"{index}: {where} names {value!r}, not a plain file name in the folder: the index "
                              f"was altered; re-save the checkpoint")
    return value


def _named_files(manifest: Mapping, index: Path) -> None:
    """Every file name the index holds, checked (a name outside the folder is never opened)."""
    def names(value: object, where: str) -> Iterable[tuple[object, str]]:
        if not isinstance(value, list):
            raise CheckpointError(f"{index}: {where} is not a list of file names: re-save the checkpoint")
        return ((v, where) for v in value)

    fields: list[tuple[object, str]] = [*names(manifest.get("files", []), "files"),
                                        *names(manifest.get("leftovers", []), "leftovers")]
    for key in ("stored", "file_sha256"):
        mapping = manifest.get(key, {})
        if not isinstance(mapping, dict):
            raise CheckpointError(f"{index}: {key} is not a mapping of file names: re-save the checkpoint")
        fields += [(k, key) for k in mapping] + ([(v, key) for v in mapping.values()] if key == "stored" else [])
    formats = manifest.get("formats", {})
    if not isinstance(formats, dict):
        raise CheckpointError(f"{index}: formats is not a mapping: re-save the checkpoint")
    hf, compact = formats.get("hf"), formats.get("compact")
    if isinstance(hf, dict):
        fields += list(names(hf.get("files", []), "formats.hf.files"))
        fields += [(t.get("file") if isinstance(t, dict) else None, f"formats.hf.tensors.{n}.file")
                   for n, t in hf.get("tensors", {}).items()]
    if isinstance(compact, dict):
        fields.append((compact.get("file"), "formats.compact.file"))
    for value, where in fields:
        plain_name(value, where, index)


def read_index(folder: Path) -> dict | None:
    """The raw index of ``folder`` (names checked), None where there is none."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}): re-save the checkpoint") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} index")
    _named_files(manifest, path)
    return manifest


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder holding a sparseforge index."""
    return (Path(path).expanduser() / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> dict:
    """The checked index of the checkpoint folder ``path``."""
    folder = Path(path).expanduser()
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: a sparse checkpoint is a folder written by save()")
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST_NAME}: not a sparseforge checkpoint (or an interrupted "
                              f"first save); a plain Hugging Face folder loads with load_model instead")
    manifest = read_index(folder)
    assert manifest is not None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('format_version')}; this "
                              f"sparseforge-compile reads version {FORMAT_VERSION}: re-save it with this version")
    for key in ("architecture", "dtype", "layers", "formats", "tied", "files", "file_sha256"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path} lacks {key!r}: re-save the checkpoint")
    for layer, entry in manifest["layers"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)
                and isinstance(entry.get("transposed"), bool)):
            raise CheckpointError(f"{manifest_path}: layer {layer!r} has no valid shape/transposed entry: "
                                  f"re-save the checkpoint")
        try:
            NMPattern.parse(entry.get("pattern", ""))
        except ValueError as exc:
            raise CheckpointError(f"{manifest_path}: layer {layer!r}: {exc}") from exc
    return manifest


def _location(folder: Path, manifest: Mapping, name: str) -> Path:
    """Where the file the index calls ``name`` is stored (its generation name until it is promoted)."""
    return folder / manifest.get("stored", {}).get(name, name)


def read_verified_bytes(folder: Path, manifest: Mapping, name: str) -> bytes:
    """The bytes of the index's file ``name``, checked against their sha256 (read once, used as read)."""
    path = _location(folder, manifest, name)
    expected = manifest["file_sha256"].get(name)
    if expected is None:
        raise CheckpointError(f"{folder / MANIFEST_NAME} has no checksum for {name}: re-save the checkpoint")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from exc
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path} fails its sha256 check: the file was altered or corrupted; re-save the "
                              f"checkpoint")
    return data


def read_verified_tensors(folder: Path, manifest: Mapping, name: str,
                          records: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
    """The tensors of the index's safetensors file ``name``, each checked against its record (dtype,
    shape, sha256), and the file's bytes against the file checksum, from one read."""
    from safetensors.torch import load as load_bytes

    path = _location(folder, manifest, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from exc
    header = _layout(data, path)
    missing = sorted(set(records) - set(header))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} listed in {MANIFEST_NAME} is not in the file")
    extra = sorted(set(header) - set(records))
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]!r} in the file is not listed in {MANIFEST_NAME}")
    try:
        tensors = load_bytes(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed files
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    for tensor_name, record in records.items():
        tensor = tensors[tensor_name]
        got = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        if got["dtype"] != record["dtype"] or got["shape"] != list(record["shape"]):
            raise CheckpointError(f"{path}: tensor {tensor_name!r} is {got['dtype']} {got['shape']}, the index says "
                                  f"{record['dtype']} {record['shape']}: the file was altered")
        if tensor_sha256(tensor) != record["sha256"]:
            raise CheckpointError(f"{path}: tensor {tensor_name!r} fails its sha256 check: the file was altered or "
                                  f"corrupted; re-save the checkpoint")
    if hashlib.sha256(data).hexdigest() != manifest["file_sha256"].get(name):
        raise CheckpointError(f"{path} fails its sha256 check (its header was altered): re-save the checkpoint")
    return tensors


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------

def owned_files(index: Mapping | None) -> set[str]:
    """Every name in the folder that an earlier save wrote (and a later one may replace or delete)."""
    if index is None:
        return set()
    return ({*index.get("files", []), *index.get("leftovers", []), *index.get("stored", {}).values(),
             MANIFEST_NAME})


def foreign_file_error(path: Path) -> CheckpointError:
    return CheckpointError(f"refusing to overwrite {path}: no earlier sparseforge save wrote it (another model's "
                           f"file?); choose another output folder")


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder a save could not or must not write: a file, a folder
    that is not writable, one holding another model's files, or a checkpoint without ``overwrite``."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder: choose another output folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{existing} is not writable: choose another output folder")
    if not target.is_dir():
        return target
    index = read_index(target)
    if index is not None and not overwrite:
        raise CheckpointError(f"{target} already holds a sparseforge checkpoint: pass --overwrite "
                              f"(overwrite=True) to replace it, or choose another output folder")
    ours = owned_files(index)
    foreign = sorted(p.name for p in target.iterdir()
                     if p.is_file() and _MODEL_FILES.match(p.name) and p.name not in ours)
    foreign = [f for f in foreign if f not in RUN_FILES]
    if foreign:
        raise foreign_file_error(target / foreign[0])
    return target


# ---------------------------------------------------------------------------------------------
# Crash-safe commit
# ---------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(target: Path, manifest: Mapping) -> None:
    """Swap ``manifest`` in as the folder's index: written beside it, synced, then one ``os.replace``."""
    tmp = target / f".{MANIFEST_NAME}.sparseforge-new"
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target / MANIFEST_NAME)


def make_staging(target: Path) -> Path:
    """A fresh staging folder inside ``target`` (a leftover one of ours is removed first)."""
    staging = target / STAGING_NAME
    if staging.exists() and not _remove_staging(staging):
        raise CheckpointError(f"{staging} was not written by sparseforge: move it away before saving here")
    staging.mkdir()
    (staging / STAGING_MARK).write_text("")
    return staging


def _remove_staging(staging: Path) -> bool:
    """Delete a staging folder if it is ours (marked, or empty); its mark goes last, so a folder an
    interrupted removal leaves is still recognised."""
    if not (staging / STAGING_MARK).is_file():
        with contextlib.suppress(OSError):
            staging.rmdir()  # created, not yet marked: empty
        return not staging.exists()
    for path in staging.iterdir():
        if path.name != STAGING_MARK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else os.unlink(path)
    os.unlink(staging / STAGING_MARK)
    staging.rmdir()
    return True


def remove_staging(target: Path) -> None:
    with contextlib.suppress(OSError):
        _remove_staging(target / STAGING_NAME)


def _generation_name(name: str, generation: int) -> str:
    return f".{name}.sparseforge-g{generation}"


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def clean_leftovers(target: Path, index: Mapping | None) -> None:
    """Delete what an interrupted save left: files an index owned but no longer names, and our
    temporary names the current index does not use. Nothing else is touched."""
    if index is None:
        live: set[str] = set()
        stale = set()
    else:
        live = {*index.get("files", []), *index.get("stored", {}).values()}
        stale = set(index.get("leftovers", [])) - live
    stale |= {p.name for p in target.iterdir() if _TEMP_NAME.match(p.name) and p.name not in live}
    for name in sorted(stale):
        if (target / name).is_file():
            _unlink_quietly(target / name)


def commit(target: Path, staging: Path, files: list[str], manifest: dict) -> None:
    """Replace the checkpoint in ``target`` by the staged ``files`` (the index, ``manifest``, last).

    Refuses to write over a file no earlier index wrote. ``files`` and ``manifest`` name the files
    by their usual names; ``manifest`` gets ``generation``, ``files`` and ``file_sha256``.
    """
    old = read_index(target)
    ours = owned_files(old)
    foreign = [f for f in files if (target / f).exists() and f not in ours]
    if foreign:
        raise foreign_file_error(target / foreign[0])
    clean_leftovers(target, old)
    generation = int(old.get("generation", 0)) + 1 if old else 1
    for name in files:
        fsync_file(staging / name)
    manifest = {**manifest, "generation": generation, "files": [*files, MANIFEST_NAME],
                "file_sha256": {name: file_sha256(staging / name) for name in files}}
    stored = {name: _generation_name(name, generation) for name in files}
    retired = sorted(ours - {MANIFEST_NAME} - set(files))  # the old checkpoint's files the new one drops
    moved: list[Path] = []
    try:
        for name in files:  # new names only: the old index and its files stay as they are
            os.replace(staging / name, target / stored[name])
            moved.append(target / stored[name])
        _fsync_dir(target)
        # From here the index names the new checkpoint, under its generation names.
        _write_index(target, {**manifest, "stored": stored, "leftovers": retired})
        moved = []
        _fsync_dir(target)
    finally:
        for path in moved:  # the new files of a commit that never happened
            with contextlib.suppress(OSError):
                _unlink_quietly(path)
    for name in files:  # each usual name in one os.replace, its generation copy untouched
        swap = target / f".{name}.sparseforge-swap"
        _unlink_quietly(swap)
        try:
            os.link(target / stored[name], swap)
        except OSError:  # a file system without hard links
            shutil.copyfile(target / stored[name], swap)
        os.replace(swap, target / name)
    _fsync_dir(target)
    _write_index(target, {**manifest, "leftovers": sorted({*retired, *stored.values()})})
    _fsync_dir(target)
    for name in [*retired, *stored.values()]:
        _unlink_quietly(target / name)
    _write_index(target, manifest)
    _fsync_dir(target)
