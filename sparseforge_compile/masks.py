"""N:M mask math: the pattern, the exact projection, the soft mask and its state module.

Groups are M consecutive elements along a weight's *input* dimension (the last dim of an
``nn.Linear`` weight), which is the layout sparse tensor cores read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input weights (2:4 is the tensor-core pattern)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or not 0 < self.n <= self.m:
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}: need integers with 0 < N <= M, e.g. 2:4")

    @classmethod
    def parse(cls, spec: str | NMPattern) -> NMPattern:
        if isinstance(spec, NMPattern):
            return spec
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
        if not match:
            raise ValueError(f"cannot parse sparsity pattern {spec!r}: write it as N:M, e.g. '2:4'")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_divides(self, in_features: int, layer: str = "layer") -> None:
        if in_features % self.m:
            raise ValueError(
                f"{layer}: input dim {in_features} is not divisible by M={self.m} of pattern {self}; "
                f"pick an M that divides it or exclude the layer"
            )


def _groups(t: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    if t.shape[-1] % pattern.m:
        raise ValueError(
            f"last dim {t.shape[-1]} of a {tuple(t.shape)} tensor is not divisible by M={pattern.m} ({pattern})"
        )
    return t.reshape(-1, pattern.m)


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Exact N:M boolean mask: the top-N scores of every M consecutive inputs.

    Ties go to the lower index (a stable descending sort), so the result is deterministic.
    NaN scores rank lowest.
    """
    groups = _groups(scores.detach(), pattern)
    groups = torch.nan_to_num(groups.float(), nan=-torch.inf)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, : pattern.n], True)
    return keep.reshape(scores.shape)


def count_nm_violations(weight: torch.Tensor, pattern: NMPattern) -> int:
    """Number of M-groups holding more than N nonzeros (0 for a valid N:M weight)."""
    nonzeros = (_groups(weight.detach(), pattern) != 0).sum(dim=-1)
    return int((nonzeros > pattern.n).sum())


def group_thresholds(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Per-group cut between the N-th and (N+1)-th largest score, broadcast to the weight's shape.

    With N == M every weight is kept, so the cut sits below the group's minimum.
    """
    groups = _groups(scores.detach(), pattern)
    if (pattern.n, pattern.m) == (2, 4):
        # The mean of the middle two of four, without a sort: it runs on every score update.
        cut = 0.5 * (groups.sum(-1, keepdim=True) - groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True))
        return cut.expand_as(groups).reshape(scores.shape)
    top = torch.sort(groups, dim=-1, descending=True).values
    if pattern.n == pattern.m:
        cut = top[:, -1:] - 1.0
    else:
        cut = 0.5 * (top[:, pattern.n - 1 : pattern.n] + top[:, pattern.n : pattern.n + 1])
    return cut.expand_as(groups).reshape(scores.shape)


def soft_nm_mask(scores: torch.Tensor, pattern: NMPattern, temperature: float | torch.Tensor) -> torch.Tensor:
    """sigmoid((score - group threshold) / T): tends to the exact N:M mask as T -> 0.

    Differentiable in ``scores`` (the threshold is held constant, as a straight-through cut).
    """
    return torch.sigmoid((scores - group_thresholds(scores, pattern)) / temperature)


# Below sigmoid(-30) ~ 1e-13 a mask value is exactly 0: far below, sigmoid gives fp32 denormals
# (around z = -88), and a CPU matmul over weights times denormals ran 100x slower (a 4-minute step).
SOFT_CUTOFF = 30.0


class MaskState(nn.Module):
    """The mask of one Linear while it anneals; the graph calls it to get the mask to apply.

    State: ``score`` (a parameter so that the masked graph is differentiable in it), ``temperature``
    of the soft mask, ``blend`` in [0, 1] moving from the soft mask (0) to the exact N:M projection of
    the scores (1), ``grad_ema``, an EMA of the gradient of the loss with respect to the mask, filled
    by a hook while ``collecting`` is on, and ``importance``, a curvature estimate the training loop
    keeps (``1/2 H_ii w_ii^2``).

    Why the mask gradient: dL/dm_ij = g_ij * w_ij (g the gradient of the effective weight) is the
    first-order change of the loss when the weight is added or removed, at no extra backward cost.
    While collecting, the last mask tensor handed to the graph is kept in ``last_mask`` so that the
    loop can take other gradients (the Fisher probe) with respect to it.

    The group threshold and the hard projection depend only on ``score``; they are cached and
    recomputed when the score tensor changes (its version counter), not on every forward. Schedule
    values are mirrored as Python floats so a forward never synchronizes with the device.
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], pattern: NMPattern, layer: str = "") -> None:
        super().__init__()
        pattern.check_divides(int(weight_shape[-1]), layer or "layer")
        self.pattern = pattern
        self.layer = layer
        self.score = nn.Parameter(torch.ones(weight_shape), requires_grad=False)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("blend", torch.tensor(0.0))
        self.register_buffer("importance", torch.zeros(weight_shape), persistent=True)
        self.register_buffer("grad_ema", torch.zeros(weight_shape), persistent=True)
        # Updates folded into each EMA so far, for Adam-style bias correction (x / (1 - beta^k)).
        self.register_buffer("updates", torch.zeros(2, dtype=torch.long), persistent=True)
        self.register_buffer("fed", None, persistent=False)
        self.importance_beta = 0.9
        self.collecting = False
        self.hook_enabled = True
        self.last_mask: torch.Tensor | None = None
        self._updates = [0, 0]  # Python mirror of ``updates`` (no device sync in the hook)
        self._t = 1.0
        self._blend = 0.0
        self._cache_key: tuple | None = None
        self._thr: torch.Tensor | None = None
        self._margin: torch.Tensor | None = None
        self._hard: torch.Tensor | None = None
        self._hard_f: torch.Tensor | None = None

    # Plain Python state the loop sets for all ~200 layers every step: stored directly, because
    # nn.Module.__setattr__ (checks for parameters, buffers, submodules) was milliseconds of host
    # time a step on SmolLM2, and compiled steps are host-bound on a GPU (benchmarks/results/profile/).
    _PLAIN_ATTRS = frozenset({"collecting", "hook_enabled", "last_mask", "_t", "_blend", "_cache_key", "_thr",
                              "_margin", "_hard", "_hard_f"})

    def __setattr__(self, name: str, value: object) -> None:
        if name in MaskState._PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, pattern={self.pattern}, shape={tuple(self.score.shape)}"

    # -- state -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_scores(self, scores: torch.Tensor) -> None:
        self.score.copy_(scores.to(self.score.dtype))

    @torch.no_grad()
    def set_hard(self, mask: torch.Tensor) -> None:
        """Pin the mask to a given binary mask (one-shot methods): score 1 where kept, 0 where pruned."""
        self.score.copy_(mask.to(self.score.dtype))
        self.set_schedule(self._t, 1.0)

    @torch.no_grad()
    def set_schedule(self, temperature: float, blend: float) -> None:
        if temperature <= 0:
            raise ValueError(f"{self.layer}: temperature must be > 0, got {temperature}")
        # Python floats only: the loop calls this every step for every layer, and two device fills per
        # layer per step were hundreds of kernel launches. The buffers catch up when state is saved.
        self._t, self._blend = float(temperature), float(min(max(blend, 0.0), 1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._t, self._blend = float(self.temperature), float(self.blend)
        self._updates = [int(v) for v in self.updates.tolist()]
        self._cache_key = None

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        with torch.no_grad():
            self.updates.copy_(torch.tensor(self._updates))
            self.temperature.fill_(self._t)
            self.blend.fill_(self._blend)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _refresh(self) -> None:
        score = self.score  # one nn.Module attribute lookup: this runs for every layer every step
        key = (score.data_ptr(), score._version, score.device)
        if key != self._cache_key:
            with torch.no_grad():
                self._thr = group_thresholds(score, self.pattern)
                self._margin = score - self._thr  # what the soft mask needs, one kernel per step
            self._hard = self._hard_f = None  # projected lazily: the soft phase never needs them
            self._cache_key = key

    # -- views -------------------------------------------------------------------------------
    def hard_mask(self) -> torch.Tensor:
        self._refresh()
        if self._hard is None:
            self._hard = nm_mask(self.score, self.pattern)
        return self._hard

    def _hard_float(self) -> torch.Tensor:
        self._refresh()
        if self._hard_f is None:
            self._hard_f = self.hard_mask().to(self.score.dtype)
        return self._hard_f

    def soft_mask(self) -> torch.Tensor:
        self._refresh()
        if self.score.requires_grad and torch.is_grad_enabled():
            z = (self.score - self._thr) / self._t  # differentiable in the scores
            return torch.sigmoid(z).masked_fill(z < -SOFT_CUTOFF, 0.0)
        z = self._margin * (1.0 / self._t)
        return torch.sigmoid(z).masked_fill_(z < -SOFT_CUTOFF, 0.0)

    def undecided_groups(self, tol: float = 0.1) -> torch.Tensor:
        """How many groups have some value of the mask in use between tol and 1 - tol (a device
        tensor: the loop sums all layers before it synchronizes once)."""
        with torch.no_grad():
            mask = _groups(self._mixed(), self.pattern)
            return ((mask > tol) & (mask < 1 - tol)).any(dim=-1).sum()

    def undecided_fraction(self, tol: float = 0.1) -> float:
        """Fraction of groups where some value of the mask in use sits between tol and 1 - tol."""
        return float(self.undecided_groups(tol)) / max(self.score.numel() // self.pattern.m, 1)

    def entropy(self) -> float:
        """Mean binary entropy (bits) of the mask in use: 0 when fully hardened."""
        with torch.no_grad():
            p = self._mixed().clamp(1e-7, 1 - 1e-7)
            h = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            return float(h.mean())

    def _mixed(self) -> torch.Tensor:
        if self._blend <= 0.0:
            return self.soft_mask()
        hard = self._hard_float()
        if self._blend >= 1.0:
            return hard
        soft = self.soft_mask()
        return soft + self._blend * (hard - soft)

    # -- the graph's call ----------------------------------------------------------------------
    def _accumulate(self, grad: torch.Tensor) -> None:
        if self.hook_enabled:
            with torch.no_grad():
                self.grad_ema.lerp_(grad.float(), 1 - self.importance_beta)
                self._updates[0] += 1

    def corrected(self, which: str) -> torch.Tensor:
        """``grad_ema`` or ``importance`` divided by 1 - beta^k (k updates so far): unbiased early on."""
        k = self._updates[0 if which == "grad_ema" else 1]
        value = getattr(self, which)
        return value / (1 - self.importance_beta**k) if k else value

    def make_mask(self, leaf: bool = False) -> torch.Tensor:
        """The mask in use now; while ``collecting``, a leaf of the autograd graph whose gradient
        feeds ``grad_ema`` and is kept in ``last_mask`` for other gradients (the Fisher probe).
        ``leaf=True`` makes it a gradient-taking leaf on every step, so that a compiled graph sees
        one input signature whether or not this step collects."""
        return self.as_leaf(self._mixed(), leaf)

    def as_leaf(self, mask: torch.Tensor, leaf: bool = False) -> torch.Tensor:
        """``mask`` as :meth:`make_mask` hands it out: a gradient-taking leaf with the evidence hook
        while ``collecting`` (or with ``leaf``), as is otherwise."""
        if (self.collecting or leaf) and torch.is_grad_enabled():
            if not mask.requires_grad:
                mask = mask.detach().requires_grad_()
            if self.collecting:
                mask.register_hook(self._accumulate)
                self.last_mask = mask
        return mask

    def feed(self, mask: torch.Tensor | None) -> None:
        """Hand the graph this mask on its next forwards (None: compute it in the forward).

        The training loop makes every layer's mask eagerly and feeds it, so that the graph itself
        is pure tensor code that ``torch.compile`` traces whole: the mask arrives as an input (a
        buffer), and the caching, hooks and Python state of :meth:`make_mask` stay outside it.
        """
        self._buffers["fed"] = mask  # the registered buffer, without nn.Module.__setattr__'s checks

    def forward(self) -> torch.Tensor:
        if self.fed is not None:
            return self.fed
        return self.make_mask()


@torch.no_grad()
def add_importances(states: list[MaskState], values: list[torch.Tensor]) -> None:
    """Fold one curvature estimate per layer into each ``importance`` EMA (weight 1 - importance_beta),
    all layers in a few multi-tensor kernels (one lerp per beta: the loop gives all layers the same)."""
    by_beta: dict[float, list[int]] = {}
    for i, ms in enumerate(states):
        by_beta.setdefault(ms.importance_beta, []).append(i)
    for beta, index in by_beta.items():
        torch._foreach_lerp_([states[i].importance for i in index], [values[i].float() for i in index], 1 - beta)
    for ms in states:
        ms._updates[1] += 1


def make_masks(states: list[MaskState], leaf: bool = False) -> list[torch.Tensor]:
    """Every layer's :meth:`MaskState.make_mask` at once, with multi-tensor (``torch._foreach_*``)
    kernels: a handful of launches for all layers instead of four or five per layer (on SmolLM2's 210
    layers that was ~1000 launches, milliseconds of host time, per soft-phase step). Same values as
    the per-layer path: entries with ``z < -SOFT_CUTOFF`` are exactly 0."""
    out: list[torch.Tensor | None] = [None] * len(states)
    groups: dict[tuple[float, float, torch.device], list[int]] = {}
    for i, ms in enumerate(states):
        if ms.score.requires_grad and torch.is_grad_enabled():
            out[i] = ms.make_mask(leaf)  # differentiable in the scores: the per-layer path
        else:
            groups.setdefault((ms._t, ms._blend, ms.score.device), []).append(i)
    with torch.no_grad():
        for (t, blend, _), index in groups.items():
            batch = [states[i] for i in index]
            if blend >= 1.0:
                masks = [ms._hard_float() for ms in batch]
            else:
                for ms in batch:
                    ms._refresh()
                z = torch._foreach_mul([ms._margin for ms in batch], 1.0 / t)
                masks = torch._foreach_sigmoid(z)
                keep = torch._foreach_add(z, SOFT_CUTOFF)  # sign(sign(z + c) + 1): 1 where z >= -c, else 0
                torch._foreach_sign_(keep)
                torch._foreach_add_(keep, 1.0)
                torch._foreach_sign_(keep)
                torch._foreach_mul_(masks, keep)
                if blend > 0.0:  # soft + blend * (hard - soft), as the per-layer path computes it
                    step = torch._foreach_sub([ms._hard_float() for ms in batch], masks)
                    torch._foreach_mul_(step, blend)
                    torch._foreach_add_(masks, step)
            for i, mask in zip(index, masks):
                out[i] = mask
    for i in (i for index in groups.values() for i in index):
        out[i] = states[i].as_leaf(out[i], leaf)
    return out  # type: ignore[return-value]
