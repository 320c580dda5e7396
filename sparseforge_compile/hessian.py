"""Second-order information for the annealing loop and its evidence checks.

``hutchinson_diagonal``: Hutchinson's estimate of the Hessian diagonal of a loss.

``group_support_costs``: the loss change of each 2:4 support of a group with the group re-fitted
(group-local OBS), the model ``benchmarks/evidence_check.py`` tests flip criteria against.
"""

from __future__ import annotations

import torch


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

