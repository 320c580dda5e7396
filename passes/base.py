"""Pass infrastructure: a result type, a base class with pre/post conditions and a stable uuid, and a
pipeline that runs passes in an explicit order.

A pass is a dataclass (its fields are its validated config) over a ``torch.fx.GraphModule`` with
one job. ``__call__`` checks ``requires(gm)``, runs ``run(gm, ...)``, times it and checks
``ensures(result)``; a broken condition raises :class:`PassConditionError` naming the pass.

Set ``SPARSEFORGE_DEBUG_GRAPHS=DIR`` to have :class:`PassManager` write each pass's graph before
and after into ``DIR`` (``NN_<pass>_before.txt`` / ``_after.txt``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

DEBUG_GRAPHS_ENV = "SPARSEFORGE_DEBUG_GRAPHS"


class PassConditionError(RuntimeError):
    """A pass's precondition or postcondition does not hold."""


@dataclass
class PassResult:
    """What a pass did: the (possibly new) graph module, whether it changed, and counters."""

    gm: fx.GraphModule
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def as_graph_module(gm_or_captured: Any) -> fx.GraphModule:
    """The GraphModule of a ``GraphModule`` or of anything holding one in ``.gm`` (a CapturedGraph)."""
    gm = getattr(gm_or_captured, "gm", gm_or_captured)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"expected a torch.fx.GraphModule or a CapturedGraph, got {type(gm_or_captured).__name__}: "
            f"capture the model first (sparseforge_compile.capture.capture(model))"
        )
    return gm


def module_paths(node: fx.Node) -> list[str]:
    """The qualified names of the modules whose code produced ``node`` (export's nn_module_stack)."""
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


SYM_SIZE = torch.ops.aten.sym_size.int


def depends_on_input_values(node: fx.Node, value_inputs: set[fx.Node] | None = None) -> bool:
    """True if some input placeholder reaches ``node`` other than through its size: False for what
    the graph computes from the inputs' shapes, parameters, buffers and constants alone (a causal
    mask, position ids, rotary frequencies). ``value_inputs``: the placeholders that count as inputs
    (in a region's subgraph, those fed by input values outside; None: all of them)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            if value_inputs is None or current in value_inputs:
                return True
            continue
        if current.op == "call_function" and current.target is SYM_SIZE:
            continue  # the sizes of the inputs are fine: positions depend on the sequence length
        stack.extend(current.all_input_nodes)
    return False


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


class GraphPass:
    """Base class of the graph passes. Subclasses are dataclasses and implement :meth:`run`."""

    def config(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def uuid(self) -> str:
        """Stable across runs and processes: a hash of the class and its config."""
        blob = json.dumps({"pass": f"{type(self).__module__}.{type(self).__qualname__}", "config": self.config()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise :class:`PassConditionError` if the pass cannot run on ``gm``."""

    def ensures(self, result: PassResult) -> None:
        """Raise :class:`PassConditionError` (or a more specific error) if the result is wrong."""

    def run(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: Any, *args: Any, **kwargs: Any) -> PassResult:
        gm = as_graph_module(gm)
        self.requires(gm)
        start = time.perf_counter()
        result = self.run(gm, *args, **kwargs)
        result.seconds = time.perf_counter() - start
        self.ensures(result)
        log.debug("%s (%s): modified=%s in %.3fs %s", self.name, self.uuid(), result.modified, result.seconds,
                  result.stats)
        return result


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    results: list[PassResult]
    passes: list[GraphPass] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def of(self, kind: type) -> PassResult:
        """The result of the pipeline's (first) pass of class ``kind``."""
        for graph_pass, result in zip(self.passes, self.results):
            if isinstance(graph_pass, kind):
                return result
        raise KeyError(f"no {kind.__name__} pass ran in this pipeline")


def _inputs_for(graph_pass: GraphPass, inputs: dict[str, Any]) -> dict[str, Any]:
    """The stage inputs a pass's ``run`` takes by name (an eligibility report, example inputs)."""
    import inspect

    params = inspect.signature(graph_pass.run).parameters
    return {k: v for k, v in inputs.items() if k in params}


class PassManager:
    """Runs passes in the given order, each on the previous one's output graph; inputs given to the call
    (``eligibility=...``, ``example_inputs=...``) reach the passes whose ``run`` names them."""

    def __init__(self, passes: Sequence[GraphPass], debug_dir: str | Path | None = None) -> None:
        self.passes = list(passes)
        env_dir = os.environ.get(DEBUG_GRAPHS_ENV)
        self.debug_dir = Path(debug_dir) if debug_dir else (Path(env_dir) if env_dir else None)

    def uuid(self) -> str:
        return hashlib.sha256("|".join(p.uuid() for p in self.passes).encode()).hexdigest()[:16]

    def _dump(self, index: int, graph_pass: GraphPass, when: str, gm: nn.Module) -> None:
        if self.debug_dir is None:
            return
        self.debug_dir.mkdir(parents=True, exist_ok=True)
        path = self.debug_dir / f"{index:02d}_{graph_pass.name}_{when}.txt"
        path.write_text(f"# {graph_pass.name} uuid={graph_pass.uuid()} config={graph_pass.config()}\n"
                        f"{gm.graph}\n")

    def __call__(self, gm: Any, **inputs: Any) -> PipelineResult:
        gm = as_graph_module(gm)
        results = []
        for index, graph_pass in enumerate(self.passes):
            self._dump(index, graph_pass, "before", gm)
            result = graph_pass(gm, **_inputs_for(graph_pass, inputs))
            self._dump(index, graph_pass, "after", result.gm)
            log.info("pass %d %s: %.3fs, modified=%s", index, graph_pass.name, result.seconds, result.modified)
            results.append(result)
            gm = result.gm
        return PipelineResult(gm=gm, results=results, passes=list(self.passes))
