"""Group-local OBS costs of 2:4 supports (hessian.group_support_costs), what evidence_check.py tests."""

from __future__ import annotations

import torch

from sparseforge_compile.hessian import (
    SUPPORTS_2_OF_4,
    group_input_correlation,
    group_support_costs,
)


def _problem(seed: int = 0, rows: int = 3, cols: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)  # correlated inputs
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(cols // 4):
            mask[r, 4 * g + torch.randperm(4, generator=gen)[:2]] = True
    grad = torch.randn(rows, cols, generator=gen)
    curvature = torch.rand(rows, cols, generator=gen) + 0.1
    sign = torch.sign(torch.randn(rows, cols, generator=gen))
    return mask, grad, curvature, sign, group_input_correlation(x)


def test_costs_match_the_constrained_quadratic_solved_directly():
    mask, grad, curvature, sign, corr = _problem()
    costs, steps = group_support_costs(mask, grad, curvature, sign, corr, damp=0.01, refits=True)
    for r in range(mask.shape[0]):
        for g in range(mask.shape[1] // 4):
            cols = slice(4 * g, 4 * g + 4)
            d = 2 * curvature[r, cols]
            a = corr[g]
            rho = a / torch.sqrt(torch.outer(a.diagonal(), a.diagonal()))
            root = d.sqrt() * sign[r, cols]
            hm = torch.outer(root, root) * rho + torch.eye(4) * 0.01 * d.mean()
            e, m = grad[r, cols], mask[r, cols].float()
            for s, keep in enumerate(SUPPORTS_2_OF_4):
                drop = [i for i in range(4) if i not in keep]
                step = torch.zeros(4)
                step[drop] = -m[drop]
                step[list(keep)] = -torch.linalg.solve(hm[list(keep)][:, list(keep)],
                                                       e[list(keep)] + hm[list(keep)][:, drop] @ step[drop])
                expected = e @ step + 0.5 * step @ hm @ step
                torch.testing.assert_close(costs[r, g, s], expected, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(steps[r, g, s], step[list(keep)], rtol=1e-4, atol=1e-5)


def test_uncorrelated_inputs_without_gradient_cost_what_obd_says():
    """rho = I, e = 0: dropping kept weights costs their 1/2 Hm_ii m^2 = curvature, nothing re-fits."""
    mask, _, curvature, sign, _ = _problem(1)
    corr = torch.eye(4).expand(2, 4, 4).clone()
    costs = group_support_costs(mask, torch.zeros_like(curvature), curvature, sign, corr, damp=0.0)
    for s, keep in enumerate(SUPPORTS_2_OF_4):
        dropped = torch.ones(mask.shape[0], 2, 4, dtype=torch.bool)
        dropped[..., list(keep)] = False
        kept_dropped = (mask.reshape(-1, 2, 4) & dropped).float()
        expected = (kept_dropped * curvature.reshape(-1, 2, 4)).sum(-1)
        torch.testing.assert_close(costs[..., s], expected, rtol=1e-5, atol=1e-6)
