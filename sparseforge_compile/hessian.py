"""Second-order information for pruning.

``LayerInputStats``: running statistics of the inputs one linear layer sees over calibration
tokens: the Gram matrix ``H = 2 X X^T`` that SparseGPT uses as the Hessian of the layer-wise
squared error, and the per-feature input norms ``||X_j||_2`` that Wanda weighs |W| by.

``group_support_costs``: the loss change of each 2:4 support of a group with the group re-fitted
(group-local OBS), the model ``benchmarks/evidence_check.py`` tests flip criteria against.
"""

from __future__ import annotations

import torch


class LayerInputStats:
    """Accumulates one layer's calibration inputs, batch by batch, in fp32.

    Both statistics are running averages over calibration *sequences*, updated exactly as the
    SparseGPT and Wanda reference implementations do (``H *= n / (n + b); n += b; H += 2/n X X^T``),
    so a rescaled copy of theirs; the scale cancels in both algorithms (damping is relative to the
    mean diagonal, Wanda compares within a row). ``feature_norms()`` undoes the scale.

    Inputs are ``(batch, seq, in_features)`` (a batch of ``batch`` sequences) or
    ``(tokens, in_features)`` (counted as one sequence, as the references do; OPT flattens its MLP
    inputs). Unrolled, the update is ``H = 2/n * sum over all tokens of x x^T`` whatever the batch
    sizes, so every token weighs the same; only the overall scale depends on the counting.
    """

    def __init__(self, in_features: int, *, gram: bool = True, norms: bool = True,
                 device: torch.device | str | None = None, layer: str = "layer") -> None:
        if not (gram or norms):
            raise ValueError(f"{layer}: LayerInputStats needs at least one of gram=True or norms=True")
        self.in_features = int(in_features)
        self.layer = layer
        self.device = torch.device(device) if device is not None else None
        self.nsamples = 0  # calibration sequences seen
        self.ntokens = 0
        self._want_gram = gram
        self._want_norms = norms
        self._gram: torch.Tensor | None = None
        self._sq_norms: torch.Tensor | None = None  # running mean over sequences of sum_t x_tj^2

    def _allocate(self, device: torch.device) -> None:
        dev = self.device or device
        if self._want_gram:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=dev)
        if self._want_norms:
            self._sq_norms = torch.zeros(self.in_features, dtype=torch.float32, device=dev)

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer}: input of shape {tuple(inputs.shape)} has {inputs.shape[-1]} features, "
                f"the layer takes {self.in_features}"
            )
        batch = inputs.shape[0] if inputs.dim() == 3 else 1
        x = inputs.reshape(-1, self.in_features)
        if self._gram is None and self._sq_norms is None:
            self._allocate(x.device)
        target = self._gram.device if self._gram is not None else self._sq_norms.device
        x = x.to(device=target, dtype=torch.float32)
        keep = self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.ntokens += x.shape[0]
        if self._gram is not None:
            # One fused kernel for H <- keep * H + (2 / n) X^T X.
            self._gram.addmm_(x.t(), x, beta=keep, alpha=2.0 / self.nsamples)
        if self._sq_norms is not None:
            self._sq_norms.mul_(keep).add_(x.square().sum(dim=0), alpha=1.0 / self.nsamples)

    def _require(self, what: str, value: torch.Tensor | None) -> torch.Tensor:
        if self.nsamples == 0:
            raise RuntimeError(
                f"{self.layer}: no calibration inputs reached this layer, so it has no {what}; check that "
                f"the layer is used in the forward pass"
            )
        if value is None:
            raise RuntimeError(f"{self.layer}: {what} was not requested when the statistics were created, or was "
                               f"already handed over (take_hessian) or freed")
        return value

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n * sum X X^T`` over the calibration tokens, ``(in, in)`` fp32 (n = sequences)."""
        return self._require("Hessian", self._gram)

    def feature_norms(self) -> torch.Tensor:
        """``||X_j||_2`` of every input feature j over all calibration tokens, fp32 ``(in,)``."""
        return (self._require("input norms", self._sq_norms) * self.nsamples).sqrt()

    def take_hessian(self) -> torch.Tensor:
        """Hand the Hessian over (the caller may modify it in place) and drop this object's reference."""
        h = self.hessian
        self._gram = None
        return h

    def free(self) -> None:
        self._gram = None
        self._sq_norms = None


def hutchinson_diagonal(loss: torch.Tensor, weights: dict[str, torch.Tensor], *, seed: int = 0,
                        probes: int = 1) -> dict[str, torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal of ``loss``: E[(H v) * v], Rademacher ``v``.

    One double backward per probe (``loss`` must come from a graph built with double-backward
    support: eager attention, no fused SDPA kernels). Returns fp32 tensors shaped like the weights.
    """
    names = list(weights)
    tensors = [weights[n] for n in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in zip(names, tensors)}
    for k in range(probes):
        vs = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.device, t.dtype) for t in tensors]
        hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=k < probes - 1)
        for n, hv, v in zip(names, hvs, vs):
            out[n].add_((hv * v).float(), alpha=1.0 / probes)
    return out


# The six ways to keep 2 of a group of 4, and the two positions each drops.
SUPPORTS_2_OF_4 = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_DROPPED_2_OF_4 = tuple(tuple(i for i in range(4) if i not in keep) for keep in SUPPORTS_2_OF_4)


def group_input_correlation(inputs: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Sum over tokens of x_G x_G^T for every ``group`` consecutive input features: ``(in / group,
    group, group)`` in fp32, the diagonal blocks of the layer-input Gram that an N:M group couples."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    x = x.reshape(x.shape[0], -1, group)
    return torch.einsum("tgi,tgj->gij", x, x)


def group_support_costs(mask: torch.Tensor, grad: torch.Tensor, curvature: torch.Tensor, sign: torch.Tensor,
                        correlation: torch.Tensor, damp: float = 0.01,
                        refits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Loss change of every 2:4 support of every group, the group's weights re-fitted (group-local OBS).

    In mask coordinates (a weight's effective value is ``w * m``; ``m`` 1 kept, 0 pruned) the loss near
    the present point is ``e.d + 1/2 d.Hm.d`` with ``e = dL/dm`` (``grad``), ``Hm_ii = 2 * curvature``
    (``curvature`` = 1/2 H_ii w_i^2, what the Fisher probes measure) and, within a group, the
    off-diagonals from the inputs: ``Hm_ij = sqrt(Hm_ii Hm_jj) * rho_ij * sign(w_i w_j)``, ``rho`` the
    input correlation of the group's features (K-FAC's input factor; the measured Fisher diagonal stays
    as it is). Keeping support T drops the others (``d_j = -m_j``) and re-fits T's two weights
    along their own values (``d_T`` at the Newton solution): the cost is

        E_T = e_Z.d_Z + 1/2 d_Z.Hm_ZZ.d_Z - 1/2 b.Hm_TT^-1.b,   b = e_T + Hm_TZ.d_Z,  Z = not T

    With uncorrelated inputs and no gradient this is OBD's cost of the dropped kept weights. What the
    diagonal misses and this does not: a pruned weight whose input moves with a kept one's brings back
    little that the kept one (re-fitted) does not already carry, and a weight's gradient at the present
    point counts. ``mask``, ``grad``, ``curvature``, ``sign``: ``(rows, in)``; ``correlation``:
    ``(in / 4, 4, 4)`` (:func:`group_input_correlation`). Returns ``(rows, in / 4, 6)`` costs in loss
    units, the supports ordered as ``SUPPORTS_2_OF_4``; ``damp`` adds that share of the mean diagonal.
    ``refits``: also return each support's Newton step ``d_T`` for its two kept weights, ``(rows, in / 4,
    6, 2)``, in mask units (a kept weight's value becomes ``w * (1 + d)``, a revived one's ``w * d``).
    """
    rows, cols = mask.shape
    groups = cols // 4
    m = mask.float().reshape(rows, groups, 4)
    e = grad.float().reshape(rows, groups, 4)
    d = (2 * curvature.float()).clamp_min(0).reshape(rows, groups, 4)
    s = sign.float().reshape(rows, groups, 4)
    diag = correlation.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30)
    rho = correlation / (diag[..., :, None] * diag[..., None, :]).sqrt()
    root = d.sqrt() * s
    hm = root[..., :, None] * root[..., None, :] * rho  # (rows, groups, 4, 4)
    lam = damp * d.mean(dim=-1, keepdim=True).clamp_min(1e-30)  # (rows, groups, 1)
    hm = hm + torch.diag_embed(lam.expand(-1, -1, 4))
    keep = torch.tensor(SUPPORTS_2_OF_4, device=mask.device)
    drop = torch.tensor(_DROPPED_2_OF_4, device=mask.device)

    def pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (r, g, 4) -> (r, g, 6, 2)
        return t[..., idx]

    def block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # Hm[..., a, b] -> (r, g, 6, 2, 2)
        return hm[..., a[:, :, None], b[:, None, :]]

    d_z = -pick(m, drop)  # (r, g, 6, 2)
    e_z, e_t = pick(e, drop), pick(e, keep)
    h_zz, h_tz, h_tt = block(drop, drop), block(keep, drop), block(keep, keep)
    removed = (e_z * d_z).sum(-1) + 0.5 * torch.einsum("rgsi,rgsij,rgsj->rgs", d_z, h_zz, d_z)
    b = e_t + torch.einsum("rgsij,rgsj->rgsi", h_tz, d_z)
    a, c, dd = h_tt[..., 0, 0], h_tt[..., 0, 1], h_tt[..., 1, 1]
    det = (a * dd - c * c).clamp_min(1e-30)
    refit = (dd * b[..., 0] ** 2 - 2 * c * b[..., 0] * b[..., 1] + a * b[..., 1] ** 2) / det
    costs = removed - 0.5 * refit
    if not refits:
        return costs
    step = -torch.stack([dd * b[..., 0] - c * b[..., 1], a * b[..., 1] - c * b[..., 0]], dim=-1) / det[..., None]
    return costs, step

