"""Where a captured graph came from: the model it was captured from (held weakly) and the original
names of its attributes. A leaf module, so that the passes can ask without importing the capture code."""

from __future__ import annotations

import weakref

from torch import fx, nn

META_KEY = "sparseforge"  # the key of this project's entry in a graph module's meta


def original_name(gm: fx.GraphModule, target: str) -> str:
    """Qualified name in the original model of a graph attribute (``get_attr`` target)."""
    info = getattr(gm, "meta", {}).get(META_KEY, {})
    names = info.get("names", {})
    if target in names:
        return names[target]
    prefix = info.get("prefix", "")
    return target[len(prefix):] if prefix and target.startswith(prefix) else target


def original_model(gm: fx.GraphModule) -> nn.Module | None:
    """The model a graph was captured from, if it is still alive (held weakly by the graph)."""
    ref = getattr(gm, "meta", {}).get(META_KEY, {}).get("model")
    return ref() if ref is not None else None


class ModelRef:
    """A weak reference to the captured model. A deep copy or a pickle of the graph drops it: the
    copy's parameters are no longer the model's, so passes must not treat the model as its owner."""

    def __init__(self, model: nn.Module | None) -> None:
        self._ref = weakref.ref(model) if model is not None else None

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> ModelRef:
        return ModelRef(None)

    def __reduce__(self) -> tuple:
        return ModelRef, (None,)
