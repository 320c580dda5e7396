"""Loading a checkpoint folder back, straight into the lowered form.

Only the files the index names are read, each once, and what is used is exactly what was checked
against its sha256: the weights from the verified bytes, the config and tokenizer from verified
copies in a private folder (so a file changed on disk after the check is never what is loaded).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CheckpointError
from ..layers import grouped_weight, stored_weight
from ..masks import NMPattern, count_nm_violations
from .format import INDICES_SUFFIX, VALUES_SUFFIX, CompressedNM, decompress_nm
from .store import FORMATS, MANIFEST_NAME, read_manifest, read_verified_bytes, read_verified_tensors

if TYPE_CHECKING:
    from ..loaded import LoadedModel
    from ..lowering.dispatch import DispatchConfig

log = logging.getLogger(__name__)


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


def _weight_files(manifest: Mapping) -> set[str]:
    formats = manifest["formats"]
    names = set(formats.get("hf", {}).get("files", []))
    if "compact" in formats:
        names.add(formats["compact"]["file"])
    return names


def _side_files(folder: Path, manifest: Mapping, into: Path) -> None:
    """The verified config, generation config and tokenizer files, copied under their usual names."""
    for name in manifest["files"]:
        if name != MANIFEST_NAME and name not in _weight_files(manifest):
            (into / name).write_bytes(read_verified_bytes(folder, manifest, name))


def _compact_state(folder: Path, manifest: Mapping) -> dict[str, torch.Tensor]:
    """The compact file's tensors with every N:M weight expanded back to dense."""
    record = manifest["formats"]["compact"]
    stored = read_verified_tensors(folder, manifest, record["file"], record["tensors"])
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


def _hf_state(folder: Path, manifest: Mapping) -> dict[str, torch.Tensor]:
    by_file: dict[str, dict] = {}
    for name, tensor in manifest["formats"]["hf"]["tensors"].items():
        by_file.setdefault(tensor["file"], {})[name] = {k: v for k, v in tensor.items() if k != "file"}
    state: dict[str, torch.Tensor] = {}
    for file, records in by_file.items():
        state.update(read_verified_tensors(folder, manifest, file, records))
    return state


def _build(folder: Path, manifest: Mapping, state: dict[str, torch.Tensor], side: Path,
           dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(side), local_files_only=True, trust_remote_code=False)
    config._name_or_path = str(folder)
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
    if (side / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(side), trust_remote_code=False)
    return model


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
    """Swap the N:M layers for SparseLinear modules (``lowering.lower.lower_model``) -> its LoweringReport.
    ``dispatch``: a ``lowering.dispatch.DispatchConfig`` (default: measured dispatch)."""
    from ..lowering.lower import lower_model

    report = lower_model(model, layers={name: dict(entry) for name, entry in layers.items()}, config=dispatch)
    log.info("%s", report.summary())
    return report


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         format: str = "auto", lower: bool = True, dispatch: DispatchConfig | None = None) -> LoadedModel:
    """Load a checkpoint written by :func:`save` -> ``loaded.LoadedModel``.

    ``format``: "compact", "hf" or "auto" (compact when present). Every file read is checked against
    its sha256 in the index before the model is built. ``dtype`` None keeps the stored dtype. With
    ``lower`` the N:M layers come back as sparse modules (``lowering.lower.lower_model``) on ``device``,
    with ``dispatch`` (a ``lowering.dispatch.DispatchConfig``) deciding sparse vs dense per token count.
    """
    from ..loaded import DTYPES, ByteTokenizer, LoadedModel

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
    state = _compact_state(folder, manifest) if chosen == "compact" else _hf_state(folder, manifest)
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="sparseforge-load-") as side_dir:
        side = Path(side_dir)
        _side_files(folder, manifest, side)
        model = _build(folder, manifest, state, side, stored)
        if manifest.get("tokenizer") == "hf":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(side), local_files_only=True, trust_remote_code=False)
            tokenizer.name_or_path = str(folder)
    if manifest.get("tokenizer") == "byte":
        tokenizer = ByteTokenizer()
    _check_loaded(model, manifest, folder, check_nm=chosen == "hf")  # compact is N:M by construction
    model = model.to(device=device, dtype=target_dtype).eval()
    model._sparseforge_layers = {name: dict(entry) for name, entry in manifest["layers"].items()}
    if lower:
        lower_layers(model, manifest["layers"], dispatch)
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(path), source=f"{folder} ({chosen})")
