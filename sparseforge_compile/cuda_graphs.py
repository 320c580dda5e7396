"""CUDA-graph capture, one way for every user: teacher decode (``distill.GraphedDecoder``), the training
loop's teacher forward (``distill.GraphedForward``) and kernel timing (``sparse_linear.graph_times_ms``).

Work that must not happen inside a capture (compilation, cuBLAS/cuSPARSELt handles and workspaces,
lazy allocations) happens in warm-up calls on a side stream first, as the CUDA-graph docs prescribe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def warm_up(fn: Callable[[], object], times: int = 1) -> None:
    """Run ``fn`` ``times`` times on a side stream, ordered after and before the current stream's work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def capture(fn: Callable[[], T], warmup: int = 1, pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """``warmup`` side-stream calls of ``fn``, then one captured call: the graph and that call's output
    (graph memory: each replay overwrites it). The capture records work but runs none: replay once
    before reading the output."""
    if warmup:
        warm_up(fn, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
