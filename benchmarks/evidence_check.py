"""Do the flip criteria predict what a flip does to the loss? Predicted against measured, on a proxy, CPU.

    python -m benchmarks.evidence_check [--model tiny-llama-x8] [--steps 40] [--top 10,100,1000]
    python -m benchmarks.evidence_check --model smollm2-135m --layers 4 --steps 40

SparseForge flips a 2:4 group's support when its evidence says the loss would drop. This trains the
annealing loop for ``--steps`` steps with no flips (an unbeatable margin: the evidence EMAs fill, the
mask stays SparseGPT's), then, for each criterion, takes the ``--top`` groups it ranks most worth
flipping (predicted gain > 0), applies those flips to the student at once and measures the held-out
KL to the dense teacher before and after (no training in between: what the local criteria model).

Criteria: ``obd`` (the loop's evidence: a pruned weight revived at its latent value, the dropped one's
cost ``1/2 H w^2``, diagonal curvature from the Fisher probes), ``group_obs`` (every support costed with
the group re-fitted, off-diagonals from the input correlation, the loop's mask-gradient EMA, the new
support at its Newton values; ``hessian.group_support_costs``; not offered by the loop: measured
harmful, see results/evidence_check_*.json), ``_rows`` variants (the curvature K-FAC-smoothed to one
output factor per row), ``_clean`` (the gradient of ``--grad-batches`` fresh batches) and ``random`` (as many random flips, each group to a random other
support, revived weights at their latent values), the floor any criterion has to beat.
Rows: criterion, flips, predicted and measured change of the held-out KL (negative: better).
"""

from __future__ import annotations

import argparse
import copy

import torch
from tabulate import tabulate

from benchmarks.anneal_tiny import PROXIES, load_proxy
from benchmarks.common import write_results
from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.capture import capture
from sparseforge_compile.config import SparsifyConfig
from sparseforge_compile.distill import kd_loss
from sparseforge_compile.evaluate import logits_of
from sparseforge_compile.hessian import SUPPORTS_2_OF_4, group_input_correlation, group_support_costs
from sparseforge_compile.layers import weight_of
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.training import prepare_training


def heldout_kl(model, windows, t_logits) -> float:
    with torch.no_grad():
        return float(kd_loss(logits_of(model.eval(), windows), t_logits, windows, ce_weight=0.0)[0])


@torch.no_grad()
def input_correlations(annealer, teacher, batches: int = 4) -> dict[str, torch.Tensor]:
    """Each masked layer's group input correlations (hessian.group_input_correlation) on the dense
    teacher's inputs over the first training batches."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args) -> None:
            blocks = group_input_correlation(args[0])
            sums[name] = blocks if name not in sums else sums[name] + blocks
        return record

    handles = [teacher.get_submodule(n).register_forward_pre_hook(hook(n)) for n in annealer.masks]
    try:
        for i in range(batches):
            logits_of(teacher, annealer.batches.batch(i))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def row_curvature(annealer, name: str, ms, correlation: torch.Tensor) -> torch.Tensor:
    """1/2 H_ii w_i^2 with H_ii = G_r A_ii (K-FAC: the row's output factor times the input's second moment),
    G_r the row median of the probes' H_ii / A_ii: one noisy number per weight becomes one per row."""
    w = annealer.weight_views[name]().detach().float()
    a = correlation.diagonal(dim1=-2, dim2=-1).reshape(-1)  # (in,)
    h = 2 * annealer.evidence.curvature(name, ms) / w.square().clamp_min(1e-30)
    g_row = (h / a.clamp_min(1e-30)).median(dim=1, keepdim=True).values
    return 0.5 * g_row * a * w.square()


def clean_mask_gradients(annealer, pruned, teacher, transposed, batches: int, first: int = 10_000) -> dict:
    """dL/dm of the KL to the teacher, averaged over ``batches`` fresh training batches at this point:
    the loop's EMA of a few batch gradients, with far less noise (``_clean`` criteria)."""
    model = copy.deepcopy(pruned).train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: model.get_submodule(n).weight for n in annealer.masks}
    for p in params.values():
        p.requires_grad_(True)
    for i in range(batches):
        ids = annealer.batches.batch(first + i)
        with torch.no_grad():
            t_logits = logits_of(teacher, ids)
        (kd_loss(logits_of(model, ids), t_logits, ids, ce_weight=0.0)[0] / batches).backward()
    out = {}
    for name in annealer.masks:
        g = params[name].grad
        g = g.t() if transposed[name] else g
        out[name] = annealer.weight_views[name]().detach().float() * g  # dL/dm = w * dL/du
    return out


def candidates(annealer, criterion: str, gen: torch.Generator, correlations: dict, clean: dict | None = None,
               limit: int = 1000) -> list[tuple[float, str, int, int, torch.Tensor]]:
    """(predicted loss change, layer, row, group, new 4 effective weights) for the ``limit`` groups of each
    layer whose best alternative support the criterion predicts to lower the loss most (random: random
    groups, each to a random other support), best first."""
    out = []
    index = torch.tensor(SUPPORTS_2_OF_4)
    for name, ms in annealer.masks.items():
        w = annealer.weight_views[name]().detach().float()
        mask = ms.hard_mask()
        rows, cols = w.shape
        latent = w.reshape(rows, cols // 4, 4)
        grouped = mask.reshape(rows, cols // 4, 4)
        present = (grouped[..., index[:, 0]] & grouped[..., index[:, 1]]).float().argmax(-1)
        rowwise = "_rows" in criterion
        grad = clean[name] if criterion.endswith("_clean") else ms.corrected("grad_ema")
        curvature = (row_curvature(annealer, name, ms, correlations[name]) if rowwise
                     else annealer.evidence.curvature(name, ms))
        if criterion.startswith("group_obs"):
            costs, steps = group_support_costs(mask, grad, curvature,
                                               torch.sign(w), correlations[name], refits=True)
        else:  # obd: keeping T loses the saliency 1/2 H w^2 of what it drops, regains what it revives
            curv = curvature.reshape(rows, cols // 4, 4)
            costs = -(curv[..., index[:, 0]] + curv[..., index[:, 1]])  # E_T - E_S = sum_S D - sum_T D
            steps = None
        current = costs.gather(-1, present[..., None]).squeeze(-1)
        if criterion == "random":
            choice = (present + torch.randint(1, 6, present.shape, generator=gen)) % 6
            gain = -torch.rand(current.shape, generator=gen)  # a random order, every group a candidate
        else:
            masked = costs.clone()
            masked.scatter_(-1, present[..., None], float("inf"))
            best, choice = masked.min(-1)
            gain = best - current  # predicted change of the loss (negative: better)
        order = torch.argsort(gain.reshape(-1))[:limit]  # only the best ``limit`` of a layer can be picked
        for flat in order.tolist():
            r, g = divmod(flat, gain.shape[1])
            if gain[r, g] >= 0:
                break
            keep = index[choice[r, g]]
            new = torch.zeros(4)
            if criterion.startswith("group_obs"):
                old = grouped[r, g].float()
                new[keep] = latent[r, g, keep] * (old[keep] + steps[r, g, choice[r, g]])
            else:
                new[keep] = latent[r, g, keep]
            out.append((float(gain[r, g]), name, r, g, new))
    out.sort(key=lambda c: c[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama-x8", choices=sorted(PROXIES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=40, help="training steps before the check (no flips)")
    p.add_argument("--top", default="10,100,1000")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--criteria", default="obd,obd_rows,group_obs,group_obs_rows,group_obs_rows_clean,random")
    p.add_argument("--grad-batches", type=int, default=32, help="fresh batches behind the _clean criteria's gradient")
    p.add_argument("--hidden-weight", type=float, default=3.0,
                   help="the loop's layer-wise loss weight (its curvature is not in the Fisher probes)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    proxy = load_proxy(args.model, args.layers)
    base, teacher, train = proxy.base, proxy.teacher, proxy.train
    heldout, calib, t_logits = proxy.heldout, proxy.calib, proxy.t_logits
    calib_n, calib_len = calib.shape
    student = copy.deepcopy(teacher)
    acfg = AnnealConfig.from_flat(dict(steps=args.steps * 4, teacher_data_ratio=0.0, warm_start="sparsegpt",
                                       seed=args.seed, prior_margin=1e6,
                                       **{"hidden_weight": args.hidden_weight, **train}))
    cfg = SparsifyConfig(method="sparseforge", kernel_constraints=None, calib_samples=calib_n,
                         calib_seqlen=calib_len, budget_s=None, anneal=acfg)
    captured = capture(student, (calib[:2, :32],))
    report = analyze_eligibility(captured, "2:4", kernel_constraints=None)
    layers = [i.name for i in report.layers if i.eligible]
    transposed = {i.name: i.transposed for i in report.layers if i.eligible}
    annealer = prepare_training(student, cfg, captured, report, layers, transposed, calib, base.tokenizer,
                                progress=False).annealer
    student.train()
    for _ in range(args.steps):
        annealer.train_step()
    assert annealer.flips() == 0
    # The student as the loop has it: latent weights under the hard mask.
    pruned = copy.deepcopy(student)
    with torch.no_grad():
        for name, ms in annealer.masks.items():
            weight_of(pruned, name, transposed[name]).mul_(ms.hard_mask())
    before = heldout_kl(pruned, heldout, t_logits)
    gen = torch.Generator().manual_seed(args.seed)
    correlations = input_correlations(annealer, teacher)
    clean = (clean_mask_gradients(annealer, pruned, teacher, transposed, args.grad_batches)
             if any(c.endswith("_clean") for c in args.criteria.split(",")) else None)
    rows = []
    for criterion in args.criteria.split(","):
        limit = max(int(t) for t in args.top.split(","))
        ranked = candidates(annealer, criterion, gen, correlations, clean, limit=limit)
        for top in [int(t) for t in args.top.split(",")]:
            chosen = ranked[:top]
            if len(chosen) < top:
                continue
            flipped = copy.deepcopy(pruned)
            with torch.no_grad():
                for _, name, r, g, new in chosen:
                    weight_of(flipped, name, transposed[name])[r, 4 * g : 4 * g + 4] = new
            after = heldout_kl(flipped, heldout, t_logits)
            rows.append({"model": proxy.name,
                         "steps": args.steps, "hidden_weight": args.hidden_weight, "criterion": criterion, "flips": top,
                         "predicted_change": round(sum(c[0] for c in chosen), 6) if criterion != "random" else None,
                         "heldout_kl_before": round(before, 6), "heldout_kl_after": round(after, 6),
                         "measured_change": round(after - before, 6)})
            print(tabulate(rows[-1:], headers="keys"), flush=True)
    write_results("evidence_check", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
