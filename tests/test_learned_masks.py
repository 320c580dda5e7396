"""The learned masks (gumbel, srste, loss_grad): exact N:M at the end, gradients against finite
differences, and resume equal to an uninterrupted run."""

import copy

import pytest
import torch

from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.anneal.gumbel import gumbel_noise, hard_choice, relaxed_mask, supports
from sparseforge_compile.anneal.srste import SRSTEEvidence
from sparseforge_compile.masks import MaskState, NMPattern, count_nm_violations
from sparseforge_compile.models import load_model
from sparseforge_compile.ops import apply_mask
from sparseforge_compile.pipeline import SparsifyConfig, sparsify

PATTERN = NMPattern(2, 4)
LEARNED = ("gumbel", "srste", "loss_grad")


def learned_config(kind: str, **anneal) -> SparsifyConfig:
    # A long soft phase and a fast mask so that flips happen in a dozen steps.
    base = dict(steps=12, batch_size=4, seqlen=64, log_every=4, lr=3e-3, teacher_data_ratio=0.0,
                warm_start="magnitude", mask_evidence=kind, anneal_end=0.5, harden_end=0.75, importance_every=2,
                mask_lr=0.5, prior_strength=0.5, srste_decay=2e-4)
    base.update(anneal)
    return SparsifyConfig(method="sparseforge", kernel_constraints=None, calib_samples=4, calib_seqlen=64,
                          budget_s=None, anneal=AnnealConfig.from_flat(base))


def test_config_checks_the_learned_options():
    assert AnnealConfig().evidence.mask_evidence == "obd"
    with pytest.raises(ValueError, match="mask_evidence"):
        AnnealConfig.from_flat({"mask_evidence": "oracle"})
    with pytest.raises(ValueError, match="fixed_mask"):
        AnnealConfig.from_flat({"mask_evidence": "gumbel", "fixed_mask": True})
    with pytest.raises(ValueError, match="mask_lr"):
        AnnealConfig.from_flat({"mask_lr": 0.0})


@pytest.mark.parametrize("kind", LEARNED)
def test_a_learned_mask_moves_and_hardens_to_exact_nm(data_dir, kind):
    loaded = load_model("tiny-llama")
    result = sparsify(loaded.model, learned_config(kind), tokenizer=loaded.tokenizer, data_dir=data_dir,
                      progress=False)
    assert result.anneal.steps == 12 and len(result.layers) == 14
    assert result.anneal.flips_vs_warm_start > 0  # the loss moved the mask
    for name in result.layers:
        weight = loaded.model.get_submodule(name).weight
        assert count_nm_violations(weight, PATTERN) == 0
        groups = (weight.reshape(-1, 4) != 0).sum(-1)
        assert (groups <= 2).all()


def test_gumbel_supports_and_hard_choice_are_exact_nm():
    s = supports(PATTERN)
    assert s.shape == (6, 4) and (s.sum(-1) == 2).all() and len({tuple(r.tolist()) for r in s}) == 6
    logits = torch.randn(50, 6)
    hard = hard_choice(logits, s)
    assert (hard.sum(-1) == 2).all()
    # At a low temperature without noise the relaxation is the hard choice.
    assert torch.allclose(relaxed_mask(logits * 100, None, 0.01, s), hard, atol=1e-6)


def test_gumbel_relaxation_gradient_matches_finite_differences():
    s = supports(PATTERN).double()
    gen = torch.Generator().manual_seed(0)
    noise = gumbel_noise((5, 6), gen, torch.device("cpu")).double()
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: (relaxed_mask(z, noise, 0.7, s) * weights).sum(), (logits,))


def test_sigmoid_mask_gradient_matches_finite_differences_at_a_fixed_cut():
    """The loss_grad mask: d mask / d score of sigmoid((score - cut) / T), the group cut held fixed."""
    ms = MaskState((3, 8), PATTERN).double()
    ms.set_scores(torch.randn(3, 8, dtype=torch.float64))
    ms.set_schedule(0.5, 0.0)
    weights = torch.randn(3, 8, dtype=torch.float64)
    ms.score.requires_grad_(True)
    (ms.soft_mask() * weights).sum().backward()
    cut = ms._thr.detach()
    score, h = ms.score.detach().clone(), 1e-6
    for i in range(3):
        for j in range(8):
            up, down = score.clone(), score.clone()
            up[i, j] += h
            down[i, j] -= h
            fd = ((torch.sigmoid((up - cut) / 0.5) - torch.sigmoid((down - cut) / 0.5)) * weights).sum() / (2 * h)
            assert ms.score.grad[i, j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)


def test_srste_gives_pruned_weights_the_dense_gradient_plus_decay():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 8))
    warm = torch.rand(6, 8).argsort(-1) < 4
    warm = warm.reshape(-1, 4).argsort(-1).argsort(-1).reshape(6, 8) < 2  # an exact 2:4 mask
    ms = MaskState((6, 8), PATTERN)
    cfg = AnnealConfig.from_flat({"mask_evidence": "srste", "srste_decay": 0.01})
    ev = SRSTEEvidence(cfg, {"w": ms}, {"w": warm}, {"w": lambda: weight})
    with torch.no_grad():
        weight.copy_(torch.where(warm, weight, 0.3))  # pruned weights off zero, to see the decay
    x = torch.randn(5, 8)
    target = torch.randn(5, 6)
    (mask,) = ev.make_masks([ms], leaf=False)
    ((x @ apply_mask(weight, mask).t() - target) ** 2).sum().backward()
    ev.after_backward(0)
    # The straight-through gradient: that of the effective weight w * m, for every weight.
    effective = (weight.detach() * warm).requires_grad_()
    ((x @ effective.t() - target) ** 2).sum().backward()
    expected = effective.grad + 0.01 * (~warm) * weight.detach()
    assert torch.allclose(weight.grad, expected, rtol=1e-5, atol=1e-6)


def _run_until(loaded, cfg, out_dir, data_dir, stop_after: int):
    from sparseforge_compile.anneal import Annealer

    original = Annealer.train_step

    def train_step(self):
        if self.step == stop_after:
            raise KeyboardInterrupt
        return original(self)

    Annealer.train_step = train_step
    try:
        sparsify(loaded.model, cfg, tokenizer=loaded.tokenizer, data_dir=data_dir, out_dir=out_dir, progress=False)
    finally:
        Annealer.train_step = original


@pytest.mark.parametrize("kind", LEARNED)
def test_a_learned_mask_resumes_exactly(tmp_path, data_dir, kind):
    # The checkpoint at step 4 lies inside the soft phase (steps 0-5): the mask's own state must resume.
    cfg = learned_config(kind, checkpoint_every=4)
    full = load_model("tiny-llama")
    r_full = sparsify(full.model, cfg, tokenizer=full.tokenizer, data_dir=data_dir, out_dir=tmp_path / "full",
                      progress=False)
    part = load_model("tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        _run_until(part, copy.deepcopy(cfg), tmp_path / "resumed", data_dir, stop_after=6)
    resumed = load_model("tiny-llama")
    r_resumed = sparsify(resumed.model, cfg, tokenizer=resumed.tokenizer, data_dir=data_dir,
                         out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert r_resumed.anneal.steps == 12
    assert r_resumed.anneal.flips_vs_warm_start == r_full.anneal.flips_vs_warm_start
    for name, p in full.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
