"""The state dict of a lowered layer is its dense weight (in the source layout) and bias, whatever it stores
inside: a lowered model saves and loads like the model it came from."""

from __future__ import annotations

import torch
from torch import Tensor


class DenseStateDict:
    """Mixin for a module with ``materialize_weight()``, ``transposed_source``, ``bias`` and
    ``_install(weight, bias)``; ``_install_target(weight)`` says the device and dtype a loaded weight takes."""

    def _install_target(self, weight: Tensor) -> tuple[torch.device, torch.dtype]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        weight = self.materialize_weight()
        weight = weight.t() if self.transposed_source else weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        weight = weight.t() if self.transposed_source else weight
        bias = state_dict.get(prefix + "bias")
        device, dtype = self._install_target(weight)
        try:
            self._install(weight.to(device=device, dtype=dtype),
                          None if bias is None else bias.to(device=device, dtype=dtype))
        except (ValueError, RuntimeError) as exc:
            error_msgs.append(str(exc))
