"""Model structure, in one place: which modules are prunable layers (``nn.Linear`` and GPT-2's
``Conv1D``), their weights in ``(out, in)`` layout, and the repeated decoder blocks."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PruneError
from .masks import NMPattern


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the math below does not need it
        return None
    return Conv1D


def is_prunable(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out, in)`` view of the parameter's storage (in-place edits stick)."""
    weight = module.weight.data
    return weight.t() if is_conv1d(module) else weight


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the longest ``nn.ModuleList`` of one block class holding linear layers.

    LLaMA/Qwen2 ``model.layers``, GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, BERT
    ``encoder.layer``. Ties go to the outermost list.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or is_prunable(module[0]):
            continue
        if not any(is_prunable(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise PruneError(
            f"{type(model).__name__}: found no repeated block list (an nn.ModuleList of identical blocks "
            f"with linear layers); pass layers=[...] to name the layers to prune (magnitude only)"
        )
    return best


def default_prune_layers(model: nn.Module) -> list[str]:
    """Every Linear / Conv1D inside the decoder blocks (never the LM head or the embeddings)."""
    blocks_name, blocks = find_decoder_blocks(model)
    return [f"{blocks_name}.{name}" for name, module in blocks.named_modules() if is_prunable(module)]


def prunable_modules(model: nn.Module, layers: list[str] | None,
                     pattern: NMPattern | None) -> dict[str, nn.Module]:
    """The named layers (default: every Linear / Conv1D of the decoder blocks) as modules, each checked:
    prunable, not tied to another module's weight, its input width a multiple of the pattern's M."""
    names = default_prune_layers(model) if layers is None else list(layers)
    if not names:
        raise PruneError("no layers to prune: the layer list is empty")
    modules = dict(model.named_modules())
    owners: dict[int, list[str]] = {}  # weight -> the modules holding it (tied embeddings)
    for mod_name, module in modules.items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(mod_name)
    out: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            near = [n for n in modules if n.endswith(name.split(".")[-1])][:3]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise PruneError(f"layer {name!r} is not a module of {type(model).__name__}{hint}")
        module = modules[name]
        if not is_prunable(module):
            raise PruneError(
                f"layer {name!r} is a {type(module).__name__}; only nn.Linear and transformers Conv1D layers "
                f"can be pruned"
            )
        shared = [n for n in owners.get(id(module.weight), []) if n != name]
        if shared:
            raise PruneError(f"layer {name!r} shares its weight with {', '.join(shared)} (tied embeddings): pruning "
                             f"it would prune that too; leave it out, or untie the weights first")
        if pattern is not None:
            pattern.check_divides(int(weight_out_in(module).shape[1]), name)
        out[name] = module
    return out


def weight_of(model: nn.Module, layer: str, transposed: bool) -> torch.Tensor:
    """The layer's weight in (out_features, in_features) layout (a view for GPT-2's Conv1D)."""
    weight = model.get_submodule(layer).weight
    return weight.t() if transposed else weight


def stored_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight in its state_dict layout; a lowered SparseLinear gives its dense weight back."""
    if hasattr(module, "materialize_weight"):
        weight = module.materialize_weight()
        return weight.t() if getattr(module, "transposed_source", False) else weight
    return getattr(module, "weight", None)


def grouped_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as [out, in], the layout whose last dim the N:M groups run along."""
    return weight.t() if transposed else weight


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device
