"""Capture: trace a model into an FX GraphModule that trains the model's own parameters.

Mechanism: ``torch.export.export(..., strict=False)`` then ``ep.module()``. The graph reads every
weight with a ``get_attr`` node whose tensor *is* the original ``nn.Parameter`` (checked, and
re-bound by name if a torch version ever hands back copies), so training or editing the graph's
weights trains or edits the model.

* Hugging Face models are wrapped so that the graph's single output is the logits tensor, with
  ``use_cache=False``; the wrapper holds the model as ``model``, so graph attribute paths carry a
  ``"model."`` prefix over the original names (:meth:`CapturedGraph.original_name` strips it).
* Batch and sequence dims are exported as ``torch.export.Dim.AUTO``: one capture serves training
  batches and evaluation windows of other shapes. If a model cannot be exported with dynamic dims,
  capture falls back to static shapes and says so in ``CapturedGraph.notes``.
* The graph is captured in eval mode (dropout off, as annealing wants); ``train()``/``eval()`` on
  the graph module only flip flags, they do not re-trace.
* Position math (rotary frequencies) stays in fp32 when the graph runs under autocast, as the
  model's source has it (``passes/float32_positions.py``: export drops the autocast-off region).
* An untraceable construct raises :class:`CaptureError` naming the module and source line that
  failed, and the ways around it.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import CaptureError
from .graph_origin import META_KEY, ModelRef, original_name

log = logging.getLogger(__name__)

HF_PREFIX = "model."
HF_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
DEFAULT_BATCH, DEFAULT_SEQLEN = 2, 16  # sizes >= 2 so that export does not specialize them to 0/1




@dataclass
class CapturedGraph:
    """A captured model: the graph module and the map back to the original model."""

    gm: fx.GraphModule
    model: nn.Module
    input_names: list[str]
    params: dict[str, nn.Parameter]  # original qualified name -> the very Parameter the graph uses
    prefix: str = ""  # graph attribute path = prefix + original qualified name
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)  # input -> dims exported dynamic
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def original_name(self, target: str) -> str:
        """Qualified name in the original model of a graph ``get_attr`` target."""
        return original_name(self.gm, target)

    @property
    def dynamic(self) -> bool:
        return any(self.dynamic_dims.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph. A graph exported with positional inputs also takes them by name
        (``captured(input_ids=ids)``); whatever does not fit is left to the graph to reject."""
        if kwargs and not self.gm.meta.get(META_KEY, {}).get("kwargs"):
            positional = list(args)
            for name in self.input_names[len(args):]:
                if name not in kwargs:
                    break
                positional.append(kwargs.pop(name))
            args = tuple(positional)
        return self.gm(*args, **kwargs)


# ------------------------------------------------------------------------------ graph <-> model

# ---------------------------------------------------------------------------------- wrapping

def is_hf_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "vocab_size") and hasattr(config, "to_dict")


class LogitsOnly(nn.Module):
    """Calls a Hugging Face model without a KV cache and returns just the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids, "position_ids": position_ids}
        kwargs = {k: v for k, v in given.items() if v is not None}
        if hasattr(self.model.config, "use_cache"):
            kwargs["use_cache"] = False
        out = self.model(input_ids=input_ids, return_dict=True, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def default_example_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """A small batch: token ids from the config for HF models, else one batch for the first layer."""
    device = _model_device(model)
    if is_hf_model(model):
        ids = torch.randint(0, int(model.config.vocab_size), (DEFAULT_BATCH, DEFAULT_SEQLEN), device=device)
        return (ids,), {}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)), None)
    if isinstance(first, nn.Linear):
        return (torch.randn(DEFAULT_BATCH, first.in_features, device=device, dtype=first.weight.dtype),), {}
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (DEFAULT_BATCH, DEFAULT_SEQLEN), device=device),), {}
    raise CaptureError(
        f"cannot build example inputs for a {type(model).__name__}: it has no config and does not start with "
        f"an nn.Linear or nn.Embedding; pass example_inputs=(tensor, ...) to capture()"
    )


def _hf_positional(inputs: dict[str, Any]) -> tuple:
    """HF inputs as positional args in ``HF_INPUT_NAMES`` order, so the graph is called ``gm(ids, ...)``."""
    unknown = sorted(set(inputs) - set(HF_INPUT_NAMES))
    if unknown or "input_ids" not in inputs:
        raise CaptureError(f"capture of a Hugging Face model takes input_ids and optionally "
                           f"{', '.join(HF_INPUT_NAMES[1:])}; got {', '.join(sorted(inputs))}")
    last = max(HF_INPUT_NAMES.index(k) for k in inputs)
    return tuple(inputs.get(name) for name in HF_INPUT_NAMES[: last + 1])


def _normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    args, kwargs = _example_args(model, example_inputs)
    # A view as the example (ids[:, :16]) makes export guard on its base's size, and the graph then
    # rejects every input that is not such a view ("'NoneType' object has no attribute 'size'"):
    # export from copies.
    return (tuple(_own_storage(a) for a in args), {k: _own_storage(v) for k, v in kwargs.items()})


def _own_storage(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value._base is not None else value


def _example_args(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        return default_example_inputs(model)
    if isinstance(example_inputs, Mapping) and is_hf_model(model):
        return _hf_positional(dict(example_inputs)), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tensor, a tuple of tensors or a dict, "
                       f"not {type(example_inputs).__name__}")


def _dim_spec(value: Any, token_like: bool) -> dict[int, Any] | None:
    """Dynamic dims: batch always; sequence for token ids and for (batch, seq, feature) tensors."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    dims = [0]
    if value.dim() >= 2 and (token_like or not value.is_floating_point() or value.dim() >= 3):
        dims.append(1)
    return {d: torch.export.Dim.AUTO for d in dims}


def _dynamic_shapes(root: nn.Module, args: tuple, kwargs: dict, hf: bool) -> dict[str, Any]:
    """Per-argument dynamic dims, keyed by the forward's parameter names (export's convention)."""
    signature = inspect.signature(root.forward)
    bound = signature.bind(*args, **kwargs).arguments
    shapes: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(_dim_spec(v, hf) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: _dim_spec(v, hf) for k, v in value.items()}
        else:
            shapes[name] = _dim_spec(value, hf)
    return shapes


# ------------------------------------------------------------------------------ failure report

_TORCH_DIR = os.path.dirname(torch.__file__)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def _failure_site(exc: BaseException, model: nn.Module) -> tuple[str | None, str | None]:
    """(qualified name of the innermost model submodule on the stack, the failing source line)."""
    module_names = {id(m): name for name, m in model.named_modules()}
    module, line = None, None
    for err in reversed(_exception_chain(exc)):  # the original error is last in the chain
        tb = err.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in module_names:
                name = module_names[id(owner)]
                module = f"{name or '<root>'} ({type(owner).__name__})"
            if not frame.f_code.co_filename.startswith(_TORCH_DIR):
                text = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
                if text:
                    line = f"{os.path.basename(frame.f_code.co_filename)}:{tb.tb_lineno}: {text}"
            tb = tb.tb_next
    return module, line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _capture_error(exc: BaseException, model: nn.Module) -> CaptureError:
    module, line = _failure_site(exc, model)
    message = " ".join(_first_line(e) for e in _exception_chain(exc)[:2]).lower()
    fixes = []
    if "data-dependent" in message or "guard" in message:
        fixes.append("data-dependent Python control flow: rewrite it with torch.where/torch.cond")
    if "cache" in message or "past_key_values" in message:
        fixes.append("call the model with use_cache=False and no past_key_values")
    if any(k in message for k in ("attention", "sdpa", "flash", "flex")):
        fixes.append('load the model with attn_implementation="eager"')
    fixes += ['for Hugging Face models, load with attn_implementation="eager" (capture already passes '
              'use_cache=False)', "or exclude the construct: replace that module with a traceable equivalent"]
    where = f" in module {module}" if module else ""
    at = f" at {line}" if line else ""
    return CaptureError(
        f"cannot capture {type(model).__name__}: torch.export failed{where}{at} ({_first_line(exc)}). "
        f"Ways around it: {'; '.join(fixes)}"
    )


# ----------------------------------------------------------------------------------- capture

@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _export(root: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> tuple[fx.GraphModule, list[str]]:
    ep = torch.export.export(root, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    gm = ep.module()
    # ep.module() forbids train()/eval(); restore nn.Module's (flags only: the graph is fixed).
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    strip_metadata_asserts(gm)
    from .passes.pipelines import capture_passes, run_stage  # passes import capture: lazily

    run_stage(capture_passes(), gm)
    return gm, _bounded_dims(ep)


def _bounded_dims(ep: torch.export.ExportedProgram) -> list[str]:
    """Notes on dynamic input dims that the model itself bounds (e.g. by its position embeddings)."""
    notes = []
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name not in ep.graph_signature.user_inputs:
            continue
        for dim, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            bounds = ep.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if bounds is not None and bounds.upper.is_Integer:  # a plain number, not int_oo
                notes.append(f"{node.name} dim {dim} is dynamic up to {bounds.upper} "
                             f"(a limit of the model, e.g. its position embeddings)")
    return notes


def strip_metadata_asserts(gm: fx.GraphModule) -> int:
    """Drop export's ``_assert_tensor_metadata`` checks, in nested graphs too; returns how many.

    They pin the dtypes seen at export, so the graph would refuse to run under autocast (torch
    2.11 puts them inside the rotary embedding's autocast-disabled region); they compute nothing.
    """
    removed = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in list(module.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
                module.graph.erase_node(node)
                removed += 1
        module.recompile()
    return removed


def _bind_parameters(gm: fx.GraphModule, model: nn.Module, prefix: str) -> dict[str, str]:
    """Make every graph parameter the original Parameter object; return graph target -> original name."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    by_name.update(dict(model.named_buffers(remove_duplicate=False)))
    names_of: dict[int, list[str]] = {}
    for name, tensor in by_name.items():
        names_of.setdefault(id(tensor), []).append(name)
    targets: dict[str, str] = {}
    for target, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        stripped = target[len(prefix):] if target.startswith(prefix) else target
        same = names_of.get(id(tensor))
        if same:
            targets[target] = stripped if stripped in same else same[0]
            continue
        original = by_name.get(stripped)
        if not isinstance(tensor, nn.Parameter):
            targets[target] = stripped
            continue
        if original is None or original.shape != tensor.shape:
            raise CaptureError(
                f"captured graph parameter {target} {tuple(tensor.shape)} has no counterpart {stripped!r} in the "
                f"model: the graph would not train the model's weights"
            )
        parent, _, leaf = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, original)
        targets[target] = stripped
    return targets


def _dynamic_dims(gm: fx.GraphModule) -> dict[str, list[int]]:
    dims = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims[node.name] = [i for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)]
    return dims


def capture(model: nn.Module, example_inputs: Any = None, *, dynamic: bool = True) -> CapturedGraph:
    """Trace ``model`` into a GraphModule sharing its parameters (see the module docstring).

    ``example_inputs``: a tensor, a tuple of positional tensors or a dict of keyword tensors; for a
    Hugging Face model a tensor means ``input_ids`` and ``None`` builds a small random batch.
    """
    start = time.perf_counter()
    hf = is_hf_model(model)
    root = LogitsOnly(model) if hf else model
    prefix = HF_PREFIX if hf else ""
    args, kwargs = _normalize_inputs(model, example_inputs)
    notes: list[str] = []
    with _eval_mode(model):
        gm = None
        if dynamic:
            try:
                gm, bounds = _export(root, args, kwargs, _dynamic_shapes(root, args, kwargs, hf))
                notes += bounds
            except Exception as exc:  # retried static below; reported if that fails too
                first = _first_line(exc)
                log.warning("dynamic-shape capture of %s failed (%s); retrying with static shapes",
                            type(model).__name__, first)
                notes.append(f"dynamic batch/sequence dims could not be exported ({first}); captured with static "
                             f"shapes: re-capture for inputs of other shapes")
        if gm is None:
            try:
                gm, _ = _export(root, args, kwargs, None)
            except Exception as exc:
                raise _capture_error(exc, model) from exc
    names = _bind_parameters(gm, model, prefix)
    gm.meta[META_KEY] = {"prefix": prefix, "names": names, "model": ModelRef(model), "hf": hf,
                         "kwargs": bool(kwargs)}
    input_names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    dyn = _dynamic_dims(gm)
    if not dynamic:
        shapes = {k: tuple(v.shape) for k, v in {**dict(zip(input_names, args)), **kwargs}.items()
                  if isinstance(v, torch.Tensor)}
        notes.append(f"static shapes by request: the graph accepts only inputs shaped {shapes}")
    elif not notes and not any(dyn.values()):
        notes.append("export specialized every input dim: the graph accepts only the example shapes")
    params = dict(model.named_parameters(remove_duplicate=False))
    return CapturedGraph(gm=gm, model=model, input_names=input_names, params=params, prefix=prefix,
                         dynamic_dims=dyn, notes=notes, seconds=time.perf_counter() - start)
