"""CUDA-graph capture, one way for every user: teacher decode (``distill.GraphedDecoder``) and kernel
timing (``lowering.dispatch.graph_times_ms``).

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


class HostSyncError(RuntimeError):
    """The function synchronizes with the host, so a CUDA graph cannot capture it."""


def check_no_host_syncs(fn: Callable[[], object], what: str = "the function") -> None:
    """Run ``fn`` once with CUDA sync debugging set to raise; a synchronizing call (``.item()``, a
    tensor in an ``if``) raises :class:`HostSyncError` naming it.

    Why before a capture: a sync inside ``torch.cuda.graph`` invalidates the capture, and the aborted
    capture leaves the CUDA generator in capture state, so every later random op in the process fails
    ("Offset increment outside graph capture", e.g. from transformers' packed-sequence check in an
    eager Hugging Face forward). Checked outside a capture, the caller can fall back.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        if "synchronizing" not in str(exc):
            raise
        raise HostSyncError(f"{what} synchronizes with the host, so it cannot be captured as a CUDA graph "
                            f"({str(exc).splitlines()[0]}); compile it whole (Dynamo traces such checks "
                            f"away) or run it without graphs") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)


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
