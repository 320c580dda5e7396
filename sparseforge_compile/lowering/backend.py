"""``torch.compile(model, backend="sparseforge")`` and :func:`compile`.

The backend takes the GraphModule Dynamo captured, lowers the Linear calls on hardened weights to
``sparseforge::sparse_linear`` (:class:`~sparseforge_compile.passes.lower_sparse.LowerSparseLinears`)
and hands the graph to Inductor, which compiles everything else (norms, rotary, activations,
attention) as it would for a dense model; ``mode="reduce-overhead"`` adds CUDA graphs as usual.

:func:`compile` lowers the model eagerly (module swap) and then compiles it with Inductor. That is
the default because the dense weights of lowered layers are freed (weight memory 0.5625x where no
token bucket needs dense), the kernel measurements run once, eagerly, before any tracing, and the
compiled graph only sees a custom op on buffers. The backend leaves the model's dense parameters in
place (they are the graph's inputs), so it saves time but no memory.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..masks import NMPattern
from ..passes.pipelines import lower_passes, run_stage
from .dispatch import DispatchConfig
from .lower import LoweringReport, lower_model

log = logging.getLogger(__name__)

# Backend options of ours (``torch.compile(..., options={...})``); the rest go to Inductor.
OWN_OPTIONS = ("sparseforge_pattern", "sparseforge_keep_dense", "sparseforge_max_bucket", "sparseforge_layout")


def _inductor_patches(mode: str | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    patches.update({k: v for k, v in (options or {}).items() if k not in OWN_OPTIONS})
    return patches


def sparseforge_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                        options: Mapping[str, Any] | None = None, *, pattern: NMPattern | str | None = None,
                        dispatch: DispatchConfig | None = None) -> Callable:
    """Dynamo backend: lower hardened Linear calls to the sparse op, then Inductor.

    ``options`` may carry ``sparseforge_pattern``, ``sparseforge_keep_dense``, ``sparseforge_max_bucket``
    and ``sparseforge_layout`` (``DispatchConfig.layout``: ``"cusparselt"``, ``"compact"``, ``"both"``);
    the other keys are Inductor config patches, as with Inductor.
    """
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    if dispatch is None:
        dispatch = DispatchConfig(keep_dense=options.get("sparseforge_keep_dense", "auto"),
                                  max_bucket=int(options.get("sparseforge_max_bucket", DispatchConfig.max_bucket)),
                                  layout=options.get("sparseforge_layout", DispatchConfig.layout))
    pattern = pattern if pattern is not None else options.get("sparseforge_pattern", "2:4")
    stage = run_stage(lower_passes(str(NMPattern.parse(pattern)), dispatch), gm, example_inputs=example_inputs)
    result = stage.results[0]
    log.info("sparseforge backend: %d sparse, %d dense-fallback Linear calls lowered",
             len(result.stats["sparse"]), len(result.stats["dense_fallback"]))
    return compile_fx(result.gm, list(example_inputs), config_patches=_inductor_patches(mode, options))


def compile(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False,
            options: Mapping[str, Any] | None = None, layers: Iterable[str] | Mapping[str, object] | None = None,
            pattern: NMPattern | str = "2:4", dispatch: DispatchConfig | None = None,
            via: str = "lower", backend: str | Callable = "inductor") -> nn.Module:
    """Compile a hardened model for 2:4 sparse tensor cores.

    ``via="lower"`` (default): :func:`lower_model` in place, then ``torch.compile`` with Inductor;
    the :class:`LoweringReport` is on the result as ``._sparseforge_report``. ``via="backend"``:
    ``torch.compile(model, backend="sparseforge")``, the model untouched. ``mode``, ``dynamic``,
    ``fullgraph`` and ``options`` are ``torch.compile``'s; ``backend`` (``via="lower"`` only) picks
    another Dynamo backend for the lowered model (``"eager"``/``"aot_eager"`` to debug).
    ``dispatch`` (:class:`DispatchConfig`) decides what lowered layers store and run: its ``layout``
    (``"compact"``: the decode layout alone, 0.5625x the dense bytes; ``"fp8"``: ``via="lower"`` only).
    """
    from ..inputs import require_module

    require_module(model, "compile")
    if via not in ("lower", "backend"):
        raise ValueError(f"compile(via={via!r}): use 'lower' (module swap, then Inductor) or 'backend'")
    if via == "backend":
        backend = functools.partial(sparseforge_backend, pattern=pattern, dispatch=dispatch)
        functools.update_wrapper(backend, sparseforge_backend)
        return torch.compile(model, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                             options=options)
    report: LoweringReport = lower_model(model, layers=layers, pattern=pattern, config=dispatch)
    log.info("%s", report.summary())
    if not report.layers:  # a dense model compiles as it is; say so rather than return it silently
        log.warning("compile: no Linear layer of %s holds %s weights, so nothing was lowered and it runs dense: "
                    "prune it first (sparseforge_compile.sparsify or `sparseforge-compile prune`)",
                    type(model).__name__, NMPattern.parse(pattern))
    compiled = torch.compile(model, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                             options=options)
    compiled._sparseforge_report = report
    return compiled
