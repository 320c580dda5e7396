"""What the loop runs compiled: the masked graph, the teacher, the plain student and the loss.

The masked graph is compiled whole (export inlined its blocks) or, outlined, its shared block's body
alone with the graph around it eager (regional). The Hugging Face modules (teacher, plain student)
are compiled one decoder block at a time: all blocks of a model share one compiled artifact
(benchmarks/results/step_time_cpu_compile.json). With ``cuda_graphs`` on, the Hugging Face modules'
blocks replay as CUDA graphs (reduce-overhead): the teacher throughout, the student in the plain phase;
the loss and the masked graph do not (the loss's outputs outlive the next replay). A failure falls back
to compiling without graphs, then to the flat graph, then to eager, with one warning each.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..passes.outline_blocks import SharedBlock
from ..passes.pipelines import inline_passes, run_stage
from .config import AnnealConfig
from .loss import loss_terms

log = logging.getLogger(__name__)


@dataclass
class Forwards:
    """The loop's functions: masked graph, plain student (None: none), teacher and loss terms."""

    forward: Callable
    plain: Callable | None
    teacher: Callable
    loss_terms: Callable = loss_terms


def inlined_masks(forward: Callable, copy: bool = True) -> Callable:
    """What torch.compile gets for a masked graph: its ``apply_mask`` ops as plain multiplies, which
    Inductor fuses (with the bf16 cast) instead of calling the op back in Python for every layer
    (passes/inline_masks.py). ``copy``: rewrite a copy, leaving the graph hardening reads intact."""
    return run_stage(inline_passes(copy), forward).gm if isinstance(forward, fx.GraphModule) else forward


class Compilation:
    """The forwards the loop runs (``active``) and the eager ones they came from (``eager``).

    ``regions``: the modules behind the teacher and the plain student, whose decoder blocks are
    compiled one at a time; ``outlined``: the masked graph with its blocks outlined (regional)."""

    def __init__(self, eager: Forwards, cfg: AnnealConfig, device: torch.device,
                 regions: Sequence[nn.Module] = (), outlined: Callable | None = None) -> None:
        self.eager, self.active = eager, dataclasses.replace(eager)
        self.cfg, self.regions, self.outlined = cfg, list(regions), outlined
        self.blocks: list[nn.Module] = []
        self.compiled = cfg.compiles(device)
        self.graphs = self.compiled and cfg.graphs(device)
        # Steps a compiler failure can show in: the first compiles; graphed, the second records and the third replays.
        self.trials = (3 if self.graphs else 1) if self.compiled else 0
        if self.compiled:
            self._compile()

    def first_step(self) -> bool:
        """True for the first steps run compiled: those a compiler failure shows in."""
        if self.compiled and self.trials > 0:
            self.trials -= 1
            return True
        return False

    def step_begins(self) -> None:
        """Tell the CUDA graphs a new step starts: the previous step's block outputs may be overwritten."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def fall_back(self, exc: Exception) -> None:
        """After a failed compiled step: compile the flat graph instead of the outlined one, or run eagerly."""
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.graphs:
            log.warning("replaying the compiled blocks as CUDA graphs failed (%s); compiling without them", reason)
            self.graphs = False
            self.trials = 1
            self.active = dataclasses.replace(self.eager)
            self.uncompile_blocks()
            self._compile()
            return
        if self.outlined is not None:
            log.warning("compiling the outlined graph failed (%s); compiling it flat", reason)
            self.outlined = None
            self.active.forward = torch.compile(inlined_masks(self.eager.forward), dynamic=False)
            self.trials = 1
            return
        log.warning("torch.compile failed (%s); training eagerly (--compile off skips the attempt)", reason)
        self.active = dataclasses.replace(self.eager)
        self.uncompile_blocks()
        self.compiled = False

    def uncompile_blocks(self) -> None:
        """Blocks leave training eager: evaluation at other shapes must not recompile them."""
        for block in self.blocks:
            block._compiled_call_impl = None
        self.blocks = []

    def _compile(self) -> None:
        from ..errors import PruneError
        from ..layers import find_decoder_blocks

        compiled = functools.partial(torch.compile, dynamic=False)
        mode = "reduce-overhead" if self.graphs else None  # blocks only: their outputs die within the step
        if not self.cfg.evidence.fixed_mask:
            if self.outlined is not None:
                self.active.forward = inlined_masks(self.outlined, copy=False)  # eager around the blocks
                for module in self.active.forward.modules():
                    if isinstance(module, SharedBlock):
                        # Not graphed: recording it failed on an H100 (an input freed during recording
                        # but not in replay); the soft and hardening phases are a few % of the run.
                        module.compile_body()
            else:
                self.active.forward = compiled(inlined_masks(self.eager.forward))
        for model in self.regions:
            try:
                blocks = find_decoder_blocks(model)[1]
            except PruneError:
                continue
            for block in blocks:
                block.compile(dynamic=False, mode=mode)
                self.blocks.append(block)
        self.active.loss_terms = compiled(self.eager.loss_terms)
