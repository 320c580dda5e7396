"""The pass pipeline, declared once: the ordered passes of each stage, run through :class:`PassManager`
(``SPARSEFORGE_DEBUG_GRAPHS=DIR`` dumps every pass's graph before and after).

    capture   export -> KeepPositionMathInFloat32                     (capture.capture)
    prepare   UseCausalAttention                                       (trained methods, before the graph check)
    mask      InsertMasks [-> TapBlockOutputs]                         (one mask node per eligible weight)
    compile   [OutlineRepeatedBlocks] | InlineMaskOps                  (what torch.compile is handed)
    harden    Harden                                                   (masks folded into N:M weights, checked)
    lower     LowerSparseLinears                                       (hardened matmuls -> sparse kernels)

Each function returns a stage's passes for a configuration; :func:`run_stage` runs them on a graph with the
stage's inputs (the eligibility report, example inputs), which reach the passes whose ``run`` takes them.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .base import GraphPass, PassManager, PipelineResult


def capture_passes() -> list[GraphPass]:
    from .float32_positions import KeepPositionMathInFloat32

    return [KeepPositionMathInFloat32()]


def prepare_passes() -> list[GraphPass]:
    from .causal_attention import UseCausalAttention

    return [UseCausalAttention()]


def mask_passes(pattern: Any, blocks: tuple[str, int] | None = None) -> list[GraphPass]:
    """Mask nodes for ``pattern``; with ``blocks`` (the block list's path and length) also the taps that
    record each block's output for the layer-wise loss."""
    from .insert_masks import InsertMasks
    from .tap_blocks import TapBlockOutputs

    passes: list[GraphPass] = [InsertMasks(pattern)]
    if blocks is not None:
        passes.append(TapBlockOutputs(*blocks))
    return passes


def outline_passes(blocks: tuple[str, int]) -> list[GraphPass]:
    from .outline_blocks import OutlineRepeatedBlocks

    return [OutlineRepeatedBlocks(*blocks)]


def inline_passes(copy: bool = True) -> list[GraphPass]:
    from .inline_masks import InlineMaskOps

    return [InlineMaskOps(copy=copy)]


def harden_passes() -> list[GraphPass]:
    from .harden import Harden

    return [Harden()]


def lower_passes(pattern: str = "2:4", dispatch: Any = None) -> list[GraphPass]:
    """Lowering with ``dispatch`` (a ``lowering.DispatchConfig``; None: its defaults)."""
    from .lower_sparse import LowerSparseLinears

    return [LowerSparseLinears(pattern=pattern, **({"dispatch": dispatch} if dispatch is not None else {}))]


STAGES = ("capture", "prepare", "mask", "compile", "harden", "lower")


def run_stage(passes: list[GraphPass], gm: fx.GraphModule | Any, **inputs: Any) -> PipelineResult:
    """One stage's passes in order on ``gm`` (or a CapturedGraph), with the stage's inputs."""
    return PassManager(passes)(gm, **inputs)
