"""SparseForge-compile: dense LLM -> 2:4 (N:M) semi-structured sparse model on sparse tensor cores."""

import importlib.util as _util
from pathlib import Path as _Path

# The repository's top-level passes/ ships as sparseforge_compile.passes: a checkout imported without
# installing it has no such subpackage, and would fail deep inside the first import that needs it.
if _util.find_spec(f"{__name__}.passes") is None:
    raise ImportError(f"{__name__} is imported from {_Path(__file__).parent}, which is not installed: run "
                      f"`pip install -e .` in {_Path(__file__).parent.parent} (its passes/ folder ships as "
                      f"{__name__}.passes)")

from .anneal import AnnealConfig
from .checkpoint import load, save
from .lowering.backend import compile
from .masks import NMPattern
from .models import load_model
from .pipeline import SparsifyConfig, sparsify
from .report import inspect

__version__ = "0.1.0"

__all__ = ["AnnealConfig", "NMPattern", "SparsifyConfig", "__version__", "compile", "inspect", "load",
           "load_model", "save", "sparsify"]
