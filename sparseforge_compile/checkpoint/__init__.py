"""Sparse checkpoints: save a hardened N:M model, load it back straight into the lowered form.

One folder holds up to two weight formats next to one index, ``sparseforge.json``:

- ``hf``: the Hugging Face ``save_pretrained`` layout with the pruned zeros in place. Plain
  ``transformers`` loads it without this package.
- ``compact``: ``sparseforge.compact.safetensors``, each N:M weight as kept values plus packed
  in-group positions (``format``); every other tensor dense.

The index records the N:M pattern and provenance of every pruned layer and a sha256 of every stored
file and tensor, so a truncated or altered file is an error naming it, never a half-loaded model.
``store`` owns the folder (index, checks, crash-safe commit), ``saving`` and ``loading`` the two
directions, ``selection`` which layers are N:M.
"""

from .format import CompressedNM, compress_nm, decompress_nm, index_bits, pack_bits, unpack_bits
from .loading import load, lower_layers
from .saving import SaveReport, save
from .selection import detect_nm_layers, resolve_layers
from .store import (
    COMPACT_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST_NAME,
    check_output_dir,
    is_checkpoint,
    read_manifest,
    safetensors_layout,
    tensor_sha256,
)

__all__ = ["COMPACT_NAME", "FORMATS", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "CompressedNM", "SaveReport",
           "check_output_dir", "compress_nm", "decompress_nm", "detect_nm_layers", "index_bits", "is_checkpoint",
           "load", "lower_layers", "pack_bits", "read_manifest", "resolve_layers", "safetensors_layout", "save",
           "tensor_sha256", "unpack_bits"]
