"""Sparse checkpoints: save a hardened N:M model, load it back straight into the lowered form.

One folder holds up to two weight formats next to one index, ``sparseforge.json``:

- ``hf``: the Hugging Face ``save_pretrained`` layout with the pruned zeros in place. Plain
  ``transformers`` loads it without this package.
- ``compact``: ``sparseforge.compact.safetensors``. Each N:M weight is stored as its kept values
  (N/M of the elements, same dtype) plus packed in-group positions (ceil(log2 M) bits per kept value,
  a bit stream, LSB first); every other tensor is stored dense. For 2:4 that is 0.5625x the dense bytes
  in bf16 and 0.53125x in fp32.

The index records the N:M pattern and provenance of every pruned layer and a sha256 of every stored
tensor, so a truncated or altered file is an error naming the tensor, never a half-loaded model.
Weights are read and written with safetensors only (no pickle). Writes go to a staging folder first
and are renamed into place, the index last.

A pruned weight's zeros come back as +0.0 from the compact format: the sign of a pruned zero is not
stored (it never changes a product). Every other bit round-trips.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import CheckpointError
from .layers import grouped_weight, is_conv1d, stored_weight
from .masks import NMPattern, count_nm_violations

if TYPE_CHECKING:
    from .sparse_linear import DispatchConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "sparseforge.json"
COMPACT_NAME = "sparseforge.compact.safetensors"
FORMAT_NAME = "sparseforge-checkpoint"
FORMAT_VERSION = 1
FORMATS = ("hf", "compact")
VALUES_SUFFIX = ".nm_values"
INDICES_SUFFIX = ".nm_indices"

# safetensors header dtype names <-> torch dtypes (the ones a model checkpoint holds).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ---------------------------------------------------------------------------------------------
# Index packing and N:M compression
# ---------------------------------------------------------------------------------------------

def index_bits(m: int) -> int:
    """Bits per in-group position: ceil(log2(M)) (0 for M == 1, where the position is implied)."""
    return (int(m) - 1).bit_length()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits (bits <= 8) into a uint8 bit stream, LSB first.

    Value i occupies stream bits [i*bits, (i+1)*bits); the stream is padded with zeros to whole bytes,
    so the result has ceil(len * bits / 8) bytes (4 values per byte for 2-bit positions).
    """
    if not 0 <= bits <= 8:
        raise ValueError(f"pack_bits packs 0..8 bits per value, not {bits}")
    flat = values.reshape(-1)
    count = flat.numel()
    if bits == 0 or count == 0:
        return torch.zeros(0, dtype=torch.uint8, device=flat.device)
    if int(flat.max()) >= (1 << bits) or int(flat.min()) < 0:
        raise ValueError(f"values must lie in [0, {1 << bits}) to fit in {bits} bits")
    if 8 % bits == 0:  # whole values per byte (1, 2, 4, 8 bits): stay in uint8
        per = 8 // bits
        lanes = torch.nn.functional.pad(flat.to(torch.uint8), (0, -count % per)).reshape(-1, per)
        out = lanes[:, 0].clone()
        for k in range(1, per):
            out |= lanes[:, k] << (k * bits)
        return out
    # Eight values of `bits` bits fill exactly `bits` bytes: build each 8-value word, emit its bytes.
    octets = torch.nn.functional.pad(flat.to(torch.int64), (0, -count % 8)).reshape(-1, 8)
    word = octets[:, 0].clone()
    for k in range(1, 8):
        word |= octets[:, k] << (k * bits)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(bits)], dim=1).reshape(-1)
    return out[: (count * bits + 7) // 8].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as uint8."""
    expected = (count * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"packed indices: expected {expected} uint8 bytes for {count} values of {bits} bits, "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        lanes = [(packed >> (k * bits)) & mask for k in range(8 // bits)]
        return torch.stack(lanes, dim=1).reshape(-1)[:count]
    groups = torch.nn.functional.pad(packed.to(torch.int64), (0, -packed.numel() % bits)).reshape(-1, bits)
    word = groups[:, 0].clone()
    for i in range(1, bits):
        word |= groups[:, i] << (8 * i)
    out = torch.stack([(word >> (k * bits)) & mask for k in range(8)], dim=1).reshape(-1)
    return out[:count].to(torch.uint8)


@dataclass(frozen=True)
class CompressedNM:
    """An N:M weight as kept values ``[rows, cols/M*N]`` and packed in-group positions."""

    values: torch.Tensor
    indices: torch.Tensor  # uint8 bit stream, see pack_bits
    shape: tuple[int, int]  # of the grouped (rows, cols) matrix, groups along cols
    pattern: NMPattern

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def compress_nm(weight: torch.Tensor, pattern: NMPattern, name: str = "weight") -> CompressedNM:
    """Values and positions of an exact N:M matrix (groups of M along the last dim).

    Each group keeps its nonzeros plus, if it has fewer than N, its lowest-index zeros, so every group
    stores exactly N values. Raises if any group holds more than N nonzeros.
    """
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: compact N:M storage needs a 2-D weight, got shape {tuple(weight.shape)}")
    if pattern.m > 256:
        raise CheckpointError(f"{name}: compact storage takes M <= 256 (8-bit positions), not {pattern}")
    rows, cols = weight.shape
    pattern.check_divides(cols, name)
    groups = weight.detach().reshape(-1, pattern.m)
    nonzero = groups != 0
    counts = nonzero.sum(dim=-1)
    violations = int((counts > pattern.n).sum())
    if violations:
        raise CheckpointError(
            f"{name} {tuple(weight.shape)}: {violations} groups of {pattern.m} hold more than {pattern.n} nonzeros, "
            f"so it is not {pattern} sparse; harden the model first or leave this layer out of `layers`")
    # A hardened group has exactly N nonzeros: keep those. Groups with fewer (zeros among the kept
    # weights) also keep their lowest-index zeros; they are few, so a sort over them is cheap.
    keep = nonzero.clone()
    short = (counts < pattern.n).nonzero().squeeze(1)
    if short.numel():
        order = torch.sort(nonzero[short].to(torch.int8), dim=-1, descending=True, stable=True).indices
        keep[short] = torch.zeros_like(nonzero[short]).scatter_(1, order[:, : pattern.n], True)
    # Row-major order of the kept entries is ascending position within each group.
    positions = keep.nonzero()[:, 1].to(torch.uint8)
    values = groups[keep].reshape(rows, cols // pattern.m * pattern.n)
    indices = pack_bits(positions, index_bits(pattern.m))
    return CompressedNM(values=values, indices=indices, shape=(rows, cols), pattern=pattern)


def decompress_nm(packed: CompressedNM, name: str = "weight") -> torch.Tensor:
    """The dense ``shape`` matrix of a :class:`CompressedNM`, zeros (+0.0) where pruned."""
    rows, cols = packed.shape
    n, m = packed.pattern.n, packed.pattern.m
    if cols % m or tuple(packed.values.shape) != (rows, cols // m * n):
        raise CheckpointError(f"{name}: values of shape {tuple(packed.values.shape)} do not match a {rows}x{cols} "
                              f"{packed.pattern} weight (expected {(rows, cols // m * n)})")
    try:
        positions = unpack_bits(packed.indices, index_bits(m), packed.values.numel()).reshape(-1, n).long()
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    if n > 1 and bool((positions[:, 1:] <= positions[:, :-1]).any()) or bool((positions >= m).any()):
        raise CheckpointError(f"{name}: packed positions are not strictly increasing in-group indices below "
                              f"M={m}; the file is corrupt")
    groups = torch.zeros(rows * cols // m, m, dtype=packed.values.dtype, device=packed.values.device)
    groups.scatter_(1, positions, packed.values.reshape(-1, n))
    return groups.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Which layers are N:M
# ---------------------------------------------------------------------------------------------

def detect_nm_layers(model: nn.Module, pattern: NMPattern | str) -> dict[str, dict]:
    """Every Linear / Conv1D whose weight is exactly ``pattern`` sparse (holds no group with > N nonzeros)."""
    pattern = NMPattern.parse(pattern)
    found: dict[str, dict] = {}
    for name, module in model.named_modules():
        transposed = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or transposed):
            continue
        grouped = grouped_weight(module.weight, transposed)
        if grouped.shape[-1] % pattern.m == 0 and count_nm_violations(grouped, pattern) == 0:
            found[name] = {"pattern": str(pattern), "transposed": transposed}
    return found


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def resolve_layers(model: nn.Module, layers: Mapping[str, Mapping] | Iterable[str] | None = None,
                   pattern: NMPattern | str | None = None) -> dict[str, dict]:
    """The pruned layers to record: ``layers`` if given, else ``model._sparseforge_layers``, else (only
    when ``pattern`` is given) those detected by :func:`detect_nm_layers`.

    Every entry is checked: the module exists, has a 2-D weight, and the weight is exactly N:M.
    """
    source = layers if layers is not None else getattr(model, "_sparseforge_layers", None)
    if source is None:
        if pattern is None:
            raise CheckpointError(
                "the model records no N:M layers (no model._sparseforge_layers): harden it with the sparsify "
                "pipeline, or pass layers={name: {'pattern': '2:4'}} or pattern='2:4' to detect them")
        source = detect_nm_layers(model, pattern)
    if not isinstance(source, Mapping):
        default = str(NMPattern.parse(pattern or "2:4"))
        source = {name: {"pattern": default} for name in source}
    if not source:
        raise CheckpointError("no N:M layers to save: the model has no pruned Linear layers")
    resolved: dict[str, dict] = {}
    for name, entry in source.items():
        entry = dict(entry or {})
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"layer {name!r} listed as N:M is not a submodule of the model") from exc
        weight = stored_weight(module)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CheckpointError(f"layer {name!r} ({type(module).__name__}) has no 2-D weight to store as N:M")
        layer_pattern = NMPattern.parse(entry.get("pattern") or pattern or "2:4")
        transposed = bool(entry.get("transposed", is_conv1d(module)
                                    or getattr(module, "transposed_source", False)))
        grouped = grouped_weight(weight, transposed)
        layer_pattern.check_divides(grouped.shape[-1], name)
        violations = count_nm_violations(grouped, layer_pattern)
        if violations:
            raise CheckpointError(
                f"layer {name!r} {tuple(weight.shape)}: {violations} groups hold more than {layer_pattern.n} "
                f"nonzeros of {layer_pattern.m}, so it is not {layer_pattern} sparse; harden it first or leave "
                f"it out of the N:M layers")
        kept = int((grouped != 0).sum())
        resolved[name] = {**{k: _jsonable(v) for k, v in entry.items()}, "pattern": str(layer_pattern),
                          "transposed": transposed, "shape": list(weight.shape),
                          "density": kept / weight.numel()}
    return resolved


# ---------------------------------------------------------------------------------------------
# Tensor hashing and safetensors file checks
# ---------------------------------------------------------------------------------------------

def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, the bytes safetensors stores)."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def _tensor_record(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "sha256": tensor_sha256(tensor)}


def _safetensors_layout(path: Path) -> dict[str, dict]:
    """The header of a safetensors file, checked against the file's size (names the cut tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes): not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated: header claims {header_len} bytes, file has {size}")
        try:
            header = json.loads(f.read(header_len))
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


def _read_verified(path: Path, records: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, each checked against its index record (dtype, shape, sha256)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    header = _safetensors_layout(path)
    missing = sorted(set(records) - set(header))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} listed in {MANIFEST_NAME} is not in the file")
    extra = sorted(set(header) - set(records))
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]!r} in the file is not listed in {MANIFEST_NAME}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed files
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    for name, record in records.items():
        tensor = tensors[name]
        got = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        if got["dtype"] != record["dtype"] or got["shape"] != list(record["shape"]):
            raise CheckpointError(f"{path}: tensor {name!r} is {got['dtype']} {got['shape']}, the index says "
                                  f"{record['dtype']} {record['shape']}: the file was altered")
        if tensor_sha256(tensor) != record["sha256"]:
            raise CheckpointError(f"{path}: tensor {name!r} fails its sha256 check: the file was altered or "
                                  f"corrupted; re-save the checkpoint")
    return tensors


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

@dataclass
class SaveReport:
    """What :func:`save` wrote. ``format_bytes``: bytes of each format's weight files."""

    path: Path
    formats: tuple[str, ...]
    format_bytes: dict[str, int]
    total_bytes: int
    layers: int
    dtype: str
    pruned_dense_bytes: int  # the pruned weights stored dense
    pruned_compact_bytes: int | None = None  # the same weights as values + packed positions
    files: list[str] = field(default_factory=list)

    @property
    def pruned_ratio(self) -> float | None:
        if self.pruned_compact_bytes is None or not self.pruned_dense_bytes:
            return None
        return self.pruned_compact_bytes / self.pruned_dense_bytes

    def as_dict(self) -> dict:
        return {"path": str(self.path), "formats": list(self.formats), "format_bytes": self.format_bytes,
                "total_bytes": self.total_bytes, "layers": self.layers, "dtype": self.dtype,
                "pruned_dense_bytes": self.pruned_dense_bytes, "pruned_compact_bytes": self.pruned_compact_bytes,
                "pruned_ratio": self.pruned_ratio, "files": self.files}


@contextlib.contextmanager
def _without_dequantized_gguf_state(model: nn.Module) -> Iterator[None]:
    """Hide a GGUF quantizer left on a model whose weights are already dequantized floats.

    A model loaded from GGUF keeps ``config.quantization_config`` and ``hf_quantizer``, and
    ``save_pretrained`` then refuses it. Other quantizers hold non-float weights: refuse those.
    """
    config = getattr(model, "config", None)
    quant_config = getattr(config, "quantization_config", None) if config is not None else None
    quantizer = getattr(model, "hf_quantizer", None)
    methods = {str(getattr(getattr(q, "quant_method", None), "value", getattr(q, "quant_method", None))).lower()
               for q in (quant_config, getattr(quantizer, "quantization_config", None)) if q is not None}
    if methods - {"gguf"}:
        raise CheckpointError(f"the model is quantized ({', '.join(sorted(methods))}); sparse checkpoints store "
                              f"plain float weights: dequantize it first")
    saved = {"quantization_config": quant_config, "hf_quantizer": quantizer,
             "is_quantized": getattr(model, "is_quantized", None)}
    try:
        if quant_config is not None:
            del config.quantization_config
        if quantizer is not None:
            model.hf_quantizer = None
        if saved["is_quantized"]:
            model.is_quantized = False
        yield
    finally:
        if quant_config is not None:
            config.quantization_config = quant_config
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if saved["is_quantized"] is not None:
            model.is_quantized = saved["is_quantized"]


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied tensors: every name sharing storage with an earlier name -> that earlier name."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise CheckpointError(f"the model mixes parameter dtypes {sorted(map(str, dtypes))}: cast it to one dtype "
                              f"before saving")
    return dtypes.pop()


def _check_saveable(model: nn.Module) -> None:
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise CheckpointError(f"save needs a Hugging Face PreTrainedModel, got {type(model).__name__}; pass the "
                              f"model itself, not a captured GraphModule or wrapper (a plain nn.Module: save its "
                              f"state_dict, e.g. safetensors.torch.save_model; its pruned weights hold the zeros)")


def _save_hf(model: nn.Module, staging: Path, state: Mapping[str, torch.Tensor]) -> dict:
    with _without_dequantized_gguf_state(model):
        model.save_pretrained(str(staging), safe_serialization=True)
    files = sorted(p.name for p in staging.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"save_pretrained wrote no model*.safetensors into {staging}")
    tensors: dict[str, dict] = {}
    from safetensors.torch import load_file

    for file in files:
        for name, tensor in load_file(str(staging / file)).items():
            # What is on disk must be the model's bytes: catches a save that altered a tensor.
            if name in state and tensor_sha256(state[name]) != tensor_sha256(tensor):
                raise CheckpointError(f"save_pretrained wrote tensor {name!r} with different bytes than the model")
            tensors[name] = {**_tensor_record(tensor), "file": file}
    weight_files = files + sorted(p.name for p in staging.glob("model*.safetensors.index.json"))
    return {"files": weight_files, "tensors": tensors,
            "bytes": sum((staging / f).stat().st_size for f in weight_files)}


def _save_compact(model: nn.Module, staging: Path, state: Mapping[str, torch.Tensor], layers: Mapping[str, dict],
                  aliases: Mapping[str, str]) -> dict:
    from safetensors.torch import save_file

    pruned_weights = {f"{name}.weight": name for name in layers}
    for alias, target in aliases.items():
        if alias in pruned_weights or target in pruned_weights:
            raise CheckpointError(f"N:M layer weight {alias!r} is tied to {target!r}: the compact format cannot store "
                                  f"a tied pruned weight; leave tied layers (lm_head) out of pruning")
    tensors: dict[str, torch.Tensor] = {}
    pruned_dense = pruned_compact = 0
    for name, tensor in state.items():
        if name in aliases:
            continue
        tensor = tensor.detach().to("cpu")
        layer = pruned_weights.get(name)
        if layer is None:
            tensors[name] = tensor.contiguous()
            continue
        entry = layers[layer]
        grouped = grouped_weight(tensor, entry["transposed"]).contiguous()
        packed = compress_nm(grouped, NMPattern.parse(entry["pattern"]), name)
        tensors[name + VALUES_SUFFIX] = packed.values
        tensors[name + INDICES_SUFFIX] = packed.indices
        pruned_dense += tensor.numel() * tensor.element_size()
        pruned_compact += packed.nbytes
    missing = sorted(set(pruned_weights) - set(state))
    if missing:
        raise CheckpointError(f"N:M weight {missing[0]!r} is not in the model's state_dict")
    save_file(tensors, str(staging / COMPACT_NAME), metadata={"format": "pt", "sparseforge": f"compact-v{FORMAT_VERSION}"})
    return {"file": COMPACT_NAME, "tensors": {n: _tensor_record(t) for n, t in tensors.items()},
            "bytes": (staging / COMPACT_NAME).stat().st_size, "pruned_dense_bytes": pruned_dense,
            "pruned_bytes": pruned_compact}


def _save_config(model: nn.Module, staging: Path) -> None:
    """config.json (+ generation_config.json) for a folder whose weights are compact only."""
    with _without_dequantized_gguf_state(model):
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(staging))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(staging))


def _tokenizer_kind(tokenizer: object, staging: Path) -> str | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(staging))
        return "hf"
    if type(tokenizer).__name__ == "ByteTokenizer":
        return "byte"
    raise CheckpointError(f"cannot store a {type(tokenizer).__name__} tokenizer: it has no save_pretrained")


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"tool": "sparseforge-compile", "tool_version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def _model_source(model: nn.Module) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def save(model: nn.Module, path: str | Path, *, tokenizer: object = None, formats: Iterable[str] = FORMATS,
         provenance: Mapping[str, object] | None = None, layers: Mapping[str, Mapping] | Iterable[str] | None = None,
         pattern: NMPattern | str | None = None) -> SaveReport:
    """Write a hardened N:M model to the folder ``path`` in ``formats`` ("hf", "compact") plus its index.

    ``layers`` names the N:M layers (default ``model._sparseforge_layers``; with neither, ``pattern``
    detects them). ``provenance`` (method, source_model, calibration, ...) is stored in the index and
    its ``method`` on every layer that records none. Files go in beside others already in ``path``;
    an earlier checkpoint there is replaced, but a file no earlier save wrote is never overwritten.
    """
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CheckpointError(f"unknown checkpoint format(s) {unknown or formats}: choose from {', '.join(FORMATS)}")
    _check_saveable(model)
    provenance = _jsonable(dict(provenance or {}))  # a value JSON cannot hold is kept as its str()
    dtype = _model_dtype(model)
    resolved = resolve_layers(model, layers, pattern)
    for entry in resolved.values():
        entry.setdefault("method", provenance.get("method"))
    state = model.state_dict()
    aliases = _aliases(state)
    target = Path(path).expanduser()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the checkpoint folder's mode
        manifest_formats: dict[str, dict] = {}
        if "hf" in formats:
            manifest_formats["hf"] = _save_hf(model, staging, state)
        else:
            _save_config(model, staging)
        if "compact" in formats:
            manifest_formats["compact"] = _save_compact(model, staging, state, resolved, aliases)
        tokenizer_kind = _tokenizer_kind(tokenizer, staging)
        versions = _versions()
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            **versions,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": provenance.get("source_model") or provenance.get("model") or _model_source(model),
            "architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
            "tokenizer": tokenizer_kind,
            "provenance": provenance,
            "layers": resolved,
            "tied": aliases,
            "formats": manifest_formats,
        }
        files = sorted(p.name for p in staging.iterdir()) + [MANIFEST_NAME]
        manifest["files"] = files
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in files:
            (staging / name).chmod(0o666 & ~_umask())
        _commit(staging, target, files)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    compact = manifest_formats.get("compact")
    pruned_dense = sum(int(torch.Size(e["shape"]).numel()) for e in resolved.values()) * dtype.itemsize
    return SaveReport(path=target, formats=formats,
                      format_bytes={k: v["bytes"] for k, v in manifest_formats.items()},
                      total_bytes=sum((target / f).stat().st_size for f in files), layers=len(resolved),
                      dtype=manifest["dtype"], pruned_dense_bytes=pruned_dense,
                      pruned_compact_bytes=compact["pruned_bytes"] if compact else None, files=files)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder: choose another output path")


def _previous_files(target: Path) -> list[str]:
    """The files an earlier save wrote into ``target`` (from its index), [] if none."""
    manifest = target / MANIFEST_NAME
    if not manifest.exists():
        return []
    try:
        files = json.loads(manifest.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    # Only plain file names in the folder; an index never makes us touch anything else.
    return [f for f in files if isinstance(f, str) and Path(f).name == f]


def _commit(staging: Path, target: Path, files: list[str]) -> None:
    """Move the staged files into ``target``: one rename for a new folder; else file by file, the index
    last, after dropping the old index (so a crash never pairs an index with other files). A file of
    the folder that no earlier save wrote (another model's weights) is never overwritten."""
    if not target.exists():
        os.replace(staging, target)
        return
    old_files = _previous_files(target)
    foreign = [f for f in files if (target / f).exists() and f not in old_files]
    if foreign:
        raise CheckpointError(f"refusing to overwrite {target / foreign[0]}: no earlier sparseforge save wrote it "
                              f"(another model's file?); choose another output folder")
    (target / MANIFEST_NAME).unlink(missing_ok=True)
    for name in files:
        if name != MANIFEST_NAME:
            os.replace(staging / name, target / name)
    for stale in set(old_files) - set(files):
        (target / stale).unlink(missing_ok=True)
    os.replace(staging / MANIFEST_NAME, target / MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

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
                              f"save); a plain Hugging Face folder loads with load_model instead")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}): re-save the checkpoint") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path} is not a {FORMAT_NAME} index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('format_version')}; this "
                              f"sparseforge-compile reads version {FORMAT_VERSION}: upgrade it")
    for key in ("architecture", "dtype", "layers", "formats", "tied"):
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


def _model_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise CheckpointError(f"transformers {transformers.__version__} has no model class {name}: install a "
                              f"transformers that does")
    return cls


def _empty_model(cls: type, config: object, dtype: torch.dtype) -> nn.Module:
    """The architecture with weights left uninitialized: every tensor is loaded next."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init, then overwritten
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the init above; the tied tensors are stored once
    return model


def _dense_state(folder: Path, manifest: Mapping) -> dict[str, torch.Tensor]:
    """The compact file's tensors with every N:M weight expanded back to dense."""
    record = manifest["formats"]["compact"]
    stored = _read_verified(folder / record["file"], record["tensors"])
    state: dict[str, torch.Tensor] = {}
    for layer, entry in manifest["layers"].items():
        name = f"{layer}.weight"
        values, indices = stored.pop(name + VALUES_SUFFIX, None), stored.pop(name + INDICES_SUFFIX, None)
        if values is None or indices is None:
            raise CheckpointError(f"{folder / record['file']}: N:M weight {name!r} has no values/indices")
        rows, cols = entry["shape"][::-1] if entry["transposed"] else entry["shape"]
        dense = decompress_nm(CompressedNM(values, indices, (rows, cols), NMPattern.parse(entry["pattern"])), name)
        state[name] = dense.t().contiguous() if entry["transposed"] else dense
    state.update(stored)
    return state


def _load_compact(folder: Path, manifest: Mapping, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    state = _dense_state(folder, manifest)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = _empty_model(_model_class(manifest["architecture"]), config, dtype)
    expected = set(model.state_dict())
    provided = set(state) | set(manifest["tied"])
    if expected - provided:
        raise CheckpointError(f"{folder}: tensor {sorted(expected - provided)[0]!r} of {manifest['architecture']} "
                              f"is not in the checkpoint")
    if provided - expected:
        raise CheckpointError(f"{folder}: checkpoint tensor {sorted(provided - expected)[0]!r} does not belong to "
                              f"{manifest['architecture']}")
    model.load_state_dict(state, strict=False)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model


def _load_hf(folder: Path, manifest: Mapping, dtype: torch.dtype) -> nn.Module:
    record = manifest["formats"]["hf"]
    by_file: dict[str, dict] = {}
    for name, tensor in record["tensors"].items():
        by_file.setdefault(tensor["file"], {})[name] = tensor
    for file, records in by_file.items():
        _read_verified(folder / file, records)
    return _model_class(manifest["architecture"]).from_pretrained(str(folder), dtype=dtype, local_files_only=True)


def _check_loaded(model: nn.Module, manifest: Mapping, folder: Path, check_nm: bool) -> None:
    """Tied tensors share storage again, and (``check_nm``) every N:M layer is N:M."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in manifest["tied"].items():
        if alias in params and target in params and params[alias] is not params[target]:
            raise CheckpointError(f"{folder}: {alias} should be tied to {target} but the loaded model does not tie "
                                  f"them (config.tie_word_embeddings false?)")
    if not check_nm:
        return
    for layer, entry in manifest["layers"].items():
        weight = stored_weight(model.get_submodule(layer))
        if count_nm_violations(grouped_weight(weight, entry["transposed"]), NMPattern.parse(entry["pattern"])):
            raise CheckpointError(f"{folder}: layer {layer!r} is not {entry['pattern']} sparse after loading")


def lower_layers(model: nn.Module, layers: Mapping[str, Mapping], dispatch: DispatchConfig | None = None):
    """Swap the N:M layers for SparseLinear modules (``lowering.lower_model``) -> its LoweringReport.
    ``dispatch``: a ``sparse_linear.DispatchConfig`` (default: measured dispatch)."""
    from .lowering import lower_model

    report = lower_model(model, layers={name: dict(entry) for name, entry in layers.items()}, config=dispatch)
    log.info("%s", report.summary())
    return report


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         format: str = "auto", lower: bool = True, dispatch: DispatchConfig | None = None):
    """Load a checkpoint written by :func:`save` -> ``models.LoadedModel``.

    ``format``: "compact", "hf" or "auto" (compact when present). Every tensor read is checked against
    its sha256 in the index before the model is built. ``dtype`` None keeps the stored dtype. With
    ``lower`` the N:M layers come back as sparse modules (``lowering.lower_model``) on ``device``,
    with ``dispatch`` (a ``sparse_linear.DispatchConfig``) deciding sparse vs dense per token count.
    """
    from .loaded import DTYPES, ByteTokenizer, LoadedModel

    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    available = manifest["formats"]
    chosen = ("compact" if "compact" in available else "hf") if format == "auto" else format
    if chosen not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}: use auto, {', '.join(FORMATS)}")
    if chosen not in available:
        raise CheckpointError(f"{folder} holds no {chosen!r} weights (it has: {', '.join(available)})")
    stored = getattr(torch, manifest["dtype"], None)
    if not isinstance(stored, torch.dtype):
        raise CheckpointError(f"{folder}: unknown stored dtype {manifest['dtype']!r} in {MANIFEST_NAME}")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    target_dtype = stored if dtype is None else DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = _load_compact(folder, manifest, stored) if chosen == "compact" else _load_hf(folder, manifest, stored)
    _check_loaded(model, manifest, folder, check_nm=chosen == "hf")  # compact is N:M by construction
    model = model.to(device=device, dtype=target_dtype).eval()
    model._sparseforge_layers = {name: dict(entry) for name, entry in manifest["layers"].items()}
    if lower:
        lower_layers(model, manifest["layers"], dispatch)
    tokenizer = None
    if manifest.get("tokenizer") == "hf":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    elif manifest.get("tokenizer") == "byte":
        tokenizer = ByteTokenizer()
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(path), source=f"{folder} ({chosen})")
