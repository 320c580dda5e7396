"""Writing a hardened N:M model as a checkpoint folder: the Hugging Face layout (``hf``, plain
``transformers`` loads it) and/or the compact N:M file (``compact``), plus the index.

Weights are written with safetensors only (no pickle); every stored tensor's sha256 goes in the
index, and what ``save_pretrained`` wrote is checked against the model's bytes. The files are
committed into the folder by :func:`.store.commit`, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..layers import grouped_weight
from ..masks import NMPattern
from .format import INDICES_SUFFIX, VALUES_SUFFIX, compress_nm
from .selection import jsonable, resolve_layers
from .store import (
    COMPACT_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST_NAME,
    STAGING_MARK,
    check_output_dir,
    commit,
    make_staging,
    remove_staging,
    tensor_record,
    tensor_sha256,
)


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
            tensors[name] = {**tensor_record(tensor), "file": file}
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
    return {"file": COMPACT_NAME, "tensors": {n: tensor_record(t) for n, t in tensors.items()},
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

    from .. import __version__

    return {"tool": "sparseforge-compile", "tool_version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def _model_source(model: nn.Module) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def save(model: nn.Module, path: str | Path, *, tokenizer: object = None, formats: Iterable[str] = FORMATS,
         provenance: Mapping[str, object] | None = None, layers: Mapping[str, Mapping] | Iterable[str] | None = None,
         pattern: NMPattern | str | None = None, overwrite: bool = False) -> SaveReport:
    """Write a hardened N:M model to the folder ``path`` in ``formats`` ("hf", "compact") plus its index.

    ``layers`` names the N:M layers (default ``model._sparseforge_layers``; with neither, ``pattern``
    detects them). ``provenance`` (method, source_model, calibration, ...) is stored in the index and
    its ``method`` on every layer that records none. Files go in beside others already in ``path``;
    an earlier checkpoint there is replaced only with ``overwrite``, and a file no earlier save wrote
    is never written over or deleted. A crash at any point leaves the old checkpoint or the new one.
    """
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CheckpointError(f"unknown checkpoint format(s) {unknown or formats}: choose from {', '.join(FORMATS)}")
    _check_saveable(model)
    provenance = jsonable(dict(provenance or {}))  # a value JSON cannot hold is kept as its str()
    dtype = _model_dtype(model)
    resolved = resolve_layers(model, layers, pattern)
    for entry in resolved.values():
        entry.setdefault("method", provenance.get("method"))
    state = model.state_dict()
    aliases = _aliases(state)
    target = check_output_dir(path, overwrite)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        staging = make_staging(target)
        manifest_formats: dict[str, dict] = {}
        if "hf" in formats:
            manifest_formats["hf"] = _save_hf(model, staging, state)
        else:
            _save_config(model, staging)
        if "compact" in formats:
            manifest_formats["compact"] = _save_compact(model, staging, state, resolved, aliases)
        tokenizer_kind = _tokenizer_kind(tokenizer, staging)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            **_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": provenance.get("source_model") or provenance.get("model") or _model_source(model),
            "architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
            "tokenizer": tokenizer_kind,
            "provenance": provenance,
            "layers": resolved,
            "tied": aliases,
            "formats": manifest_formats,
        }
        files = sorted(p.name for p in staging.iterdir() if p.name != STAGING_MARK)
        commit(target, staging, files, manifest)
    finally:
        remove_staging(target)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if the failed save left it empty
    files = [*files, MANIFEST_NAME]
    compact = manifest_formats.get("compact")
    pruned_dense = sum(int(torch.Size(e["shape"]).numel()) for e in resolved.values()) * dtype.itemsize
    return SaveReport(path=target, formats=formats,
                      format_bytes={k: v["bytes"] for k, v in manifest_formats.items()},
                      total_bytes=sum((target / f).stat().st_size for f in files), layers=len(resolved),
                      dtype=manifest["dtype"], pruned_dense_bytes=pruned_dense,
                      pruned_compact_bytes=compact["pruned_bytes"] if compact else None, files=files)
