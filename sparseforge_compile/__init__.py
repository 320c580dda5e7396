"""SparseForge-compile: dense LLM -> 2:4 (N:M) semi-structured sparse model on sparse tensor cores."""

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
