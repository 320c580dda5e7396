"""Lowering hardened N:M layers to sparse kernels: the ``sparseforge::sparse_linear`` op and the
:class:`SparseLinear` module (``sparse_linear``), the measured dense-versus-sparse dispatch
(``dispatch``, raw kernels in ``kernels``), eager module swapping (``lower``), the
``torch.compile`` backend (``backend``) and CUDA-graph helpers (``cuda_graphs``)."""

from .dispatch import DispatchConfig
from .lower import LayerLowering, LoweringReport, lower_model
from .sparse_linear import SparseLinear

__all__ = ["DispatchConfig", "LayerLowering", "LoweringReport", "SparseLinear", "lower_model"]
