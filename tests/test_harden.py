"""Hardening: exact N:M folded into the model's own weights, mask nodes gone, invariant enforced."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from sparseforge_compile.capture import capture
from sparseforge_compile.masks import MaskState, NMPattern, count_nm_violations, nm_mask
from sparseforge_compile.models import tiny_model
from sparseforge_compile.ops import APPLY_MASK
from sparseforge_compile.passes.base import PassManager
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.passes.harden import (
    REGISTRY_ATTR,
    Harden,
    NMInvariantError,
    check_nm_invariant,
    sparse_layers,
)
from sparseforge_compile.passes.insert_masks import InsertMasks


class AtenLinear(nn.Module):
    """One weight matmul as aten ops: linear (weight (out, in)) or mm (weight stored (in, out))."""

    def __init__(self, weight: torch.Tensor, transposed: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.transposed = transposed

    def forward(self, x):
        if self.transposed:
            return torch.ops.aten.mm.default(x, self.weight)
        return torch.ops.aten.linear.default(x, self.weight)


def tiny_graph(weight: torch.Tensor, transposed: bool = False) -> fx.GraphModule:
    """A graph in the same aten form capture() produces, traced in milliseconds."""
    return fx.symbolic_trace(AtenLinear(weight, transposed))


@pytest.fixture
def llama_masked():
    """A fresh masked tiny-llama per test: no test relies on what another did to it."""
    model = tiny_model("tiny-llama")
    captured = capture(model)
    return model, captured, InsertMasks()(captured)


def test_harden_llama_folds_into_the_model(llama_masked):
    model, captured, inserted = llama_masked
    up = model.model.layers[0].mlp.up_proj.weight
    dense_up = up.detach().clone()
    result = Harden()(captured)
    assert result.stats["hardened"] == 14 and result.stats["mean_density"] == 0.5
    assert not [n for n in captured.gm.graph.nodes if n.target is APPLY_MASK]
    assert not hasattr(captured.gm, "sparseforge_masks")
    # The original Parameter holds the 2:4 weight: magnitude top-2 of every 4 inputs (scores were |W|).
    assert count_nm_violations(up, NMPattern(2, 4)) == 0 and float((up != 0).float().mean()) == 0.5
    keep = inserted.masks["model.layers.0.mlp.up_proj"].hard_mask()
    assert torch.equal(up.detach(), dense_up * keep)
    assert captured.gm.get_parameter("model.model.layers.0.mlp.up_proj.weight") is up
    registry = sparse_layers(model)
    assert len(registry) == 14 and registry["model.layers.0.mlp.up_proj"] == {
        "pattern": "2:4", "weight_fqn": "model.layers.0.mlp.up_proj.weight", "transposed": False,
        "out_features": 128, "in_features": 64}
    assert check_nm_invariant(model) == 14
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(captured.gm(ids), model(input_ids=ids, use_cache=False).logits)


def test_gpt2_conv1d_through_the_passes():
    """GPT-2 Conv1D (weight stored (in, out), run by addmm): classified, masked transposed, hardened
    along the stored first dim."""
    model = tiny_model("tiny-gpt2")
    captured = capture(model)
    report = analyze_eligibility(captured)
    fc = report.layer("transformer.h.0.mlp.c_fc")
    assert (fc.transposed, fc.out_features, fc.in_features, fc.op, fc.eligible) == (True, 256, 64, "addmm.default",
                                                                                    True)
    assert report.counts() == {"matmuls": 9, "eligible": 8, "tied": 1}
    assert "transformer.wte" in report.layer("lm_head").reason

    result = InsertMasks()(captured, report)
    masked = [n for n in captured.gm.graph.nodes if n.target is APPLY_MASK]
    assert len(masked) == 8 and all(n.args[2] is True for n in masked)
    state = result.masks["transformer.h.0.mlp.c_fc"]
    assert state.score.shape == (256, 64)  # the mask is in (out, in) layout
    state.score.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 9))
    captured.gm(ids).float().pow(2).mean().backward()
    assert state.score.grad.shape == (256, 64) and state.score.grad.abs().sum() > 0
    # Same as eager on a copy whose Conv1D weights are multiplied by the transposed masks.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask_state in result.masks.items():
            reference.get_submodule(name).weight.mul_(mask_state().t())
        torch.testing.assert_close(captured.gm(ids), reference(input_ids=ids, use_cache=False).logits)

    Harden()(captured)
    weight = model.transformer.h[1].mlp.c_proj.weight  # stored (in=256, out=64)
    assert weight.shape == (256, 64)
    assert count_nm_violations(weight.t(), NMPattern(2, 4)) == 0
    assert count_nm_violations(weight, NMPattern(2, 4)) > 0  # the wrong axis is not 2:4
    assert sparse_layers(model)["transformer.h.1.mlp.c_proj"]["transposed"] is True
    with torch.no_grad():
        assert torch.equal(captured.gm(ids), model(input_ids=ids, use_cache=False).logits)


def test_invariant_checker_catches_a_corrupted_weight(llama_masked):
    model, captured, _ = llama_masked
    Harden()(captured)
    assert check_nm_invariant(model, pattern="2:4") == 14
    gate = model.model.layers[1].mlp.gate_proj.weight
    with torch.no_grad():
        gate[3, :4] = 1.0  # one group of 4 now holds 4 nonzeros
    with pytest.raises(NMInvariantError) as info:
        check_nm_invariant(model, pattern="2:4")
    assert info.value.violations == [("model.layers.1.mlp.gate_proj", (128, 64), 1, 2048)]
    assert "model.layers.1.mlp.gate_proj (128, 64): 1 of 2048 groups" in str(info.value)


def test_harden_refuses_a_mask_that_is_not_n_m(monkeypatch):
    gm = tiny_graph(torch.randn(16, 32))
    InsertMasks(kernel_constraints=None)(gm)
    monkeypatch.setattr(MaskState, "hard_mask", lambda self: torch.ones_like(self.score, dtype=torch.bool))
    with pytest.raises(NMInvariantError, match=r"<root> \(16, 32\): 128 of 128 groups"):
        Harden()(gm)


def test_pipeline_with_debug_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_DEBUG_GRAPHS", str(tmp_path))
    gm = tiny_graph(torch.randn(8, 16), transposed=True)
    run = PassManager([InsertMasks("1:4", kernel_constraints=None), Harden()])(gm)
    assert [r.stats.get("masks_inserted", r.stats.get("hardened")) for r in run.results] == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_InsertMasks_after.txt", "00_InsertMasks_before.txt",
                                                           "01_Harden_after.txt", "01_Harden_before.txt"]
    assert "apply_mask" in (tmp_path / "00_InsertMasks_after.txt").read_text()
    assert "apply_mask" not in (tmp_path / "01_Harden_after.txt").read_text()
    assert getattr(gm, REGISTRY_ATTR) == {"": {"pattern": "1:4", "weight_fqn": "weight", "transposed": True,
                                               "out_features": 16, "in_features": 8}}


def expected_keep(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Top-N of each M-group by score, ties to the lower index (written independently of nm_mask)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for row in range(scores.shape[0]):
        for start in range(0, scores.shape[1], pattern.m):
            group = scores[row, start:start + pattern.m].tolist()
            order = sorted(range(pattern.m), key=lambda j: (-group[j], j))
            for j in order[: pattern.n]:
                keep[row, start + j] = True
    return keep


@st.composite
def hardening_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m))
    out_features = draw(st.integers(1, 6))
    in_features = m * draw(st.integers(1, 4))
    values = st.one_of(st.just(0.0), st.integers(-2, 2).map(float), st.floats(-3, 3, allow_nan=False, width=32))
    size = out_features * in_features
    weight = torch.tensor(draw(st.lists(values, min_size=size, max_size=size))).reshape(out_features, in_features)
    scores = torch.tensor(draw(st.lists(values, min_size=size, max_size=size))).reshape(out_features, in_features)
    return NMPattern(n, m), weight, scores, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(hardening_cases())
def test_hardening_property_exact_nm_top_n_by_score(case):
    pattern, weight, scores, transposed = case
    stored = weight.t().contiguous() if transposed else weight.clone()
    gm = tiny_graph(stored, transposed)
    masks = InsertMasks(pattern, init="ones", kernel_constraints=None)(gm).masks
    (state,) = masks.values()
    state.set_scores(scores)
    Harden()(gm)
    hardened = gm.weight.detach()
    linear_layout = hardened.t() if transposed else hardened
    assert count_nm_violations(linear_layout, pattern) == 0
    keep = expected_keep(scores, pattern)
    assert torch.equal(linear_layout, torch.where(keep, weight, torch.zeros_like(weight)))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 8), data=st.data(), rows=st.integers(1, 5), groups=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_nm_projection_keeps_exactly_n_per_group(m, data, rows, groups, dtype, seed):
    """The N:M projection of any scores (ties, zeros, NaN) keeps exactly N of every M."""
    n = data.draw(st.integers(1, m - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=gen).round().to(dtype)  # rounding makes ties
    scores[torch.rand(scores.shape, generator=gen) < 0.1] = float("nan")
    keep = nm_mask(scores, NMPattern(n, m))
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert (keep.reshape(-1, m).sum(-1) == n).all()
    weight = torch.randn(rows, groups * m, generator=gen).to(dtype).masked_fill(~keep, 0)
    assert count_nm_violations(weight, NMPattern(n, m)) == 0
