"""Mask insertion: one apply_mask per eligible layer, differentiable in weights and scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge_compile.capture import capture
from sparseforge_compile.masks import MaskState, NMPattern
from sparseforge_compile.ops import APPLY_MASK
from sparseforge_compile.passes.base import PassConditionError
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.passes.insert_masks import InsertMasks, graph_masks, mask_parameters


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.odd = nn.Linear(128, 30)  # 30 rows: not a cuSPARSELt shape, stays dense
        self.down = nn.Linear(30 + 128, 64)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(torch.cat([self.odd(h), h], dim=-1))


def test_one_mask_per_eligible_layer_and_gradients():
    model = MLP()
    captured = capture(model, (torch.randn(3, 64),))
    report = analyze_eligibility(captured)
    assert [i.name for i in report.eligible] == ["up"]  # odd: kernel shape; down: 158 % 4 != 0
    result = InsertMasks("2:4")(captured.gm, report)
    assert result.modified and list(result.masks) == ["up"] and result.stats["masks_inserted"] == 1
    assert str(captured.gm.graph).count("sparseforge.apply_mask") == 1
    state = captured.gm.get_submodule("sparseforge_masks.up")
    assert isinstance(state, MaskState) and state is result.masks["up"] and graph_masks(captured) == result.masks
    assert torch.equal(state.score, model.up.weight.detach().abs())  # magnitude init

    # The masked graph computes x -> up with W * mask, and is differentiable in W and the scores.
    state.score.requires_grad_(True)
    x = torch.randn(5, 64)  # another batch size: the capture is dynamic
    out = captured.gm(x)
    mask = state().detach()
    h = torch.relu(F.linear(x, model.up.weight * mask, model.up.bias))
    expected = model.down(torch.cat([model.odd(h), h], dim=-1))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert model.up.weight.grad.abs().sum() > 0 and state.score.grad.abs().sum() > 0
    assert mask_parameters(captured) == [state.score]


def test_refuses_to_mask_twice_and_checks_config():
    captured = capture(MLP(), (torch.randn(2, 64),))
    InsertMasks()(captured)
    with pytest.raises(PassConditionError, match="already"):
        InsertMasks()(captured)
    with pytest.raises(ValueError):
        InsertMasks(init="random")
    with pytest.raises(ValueError):
        InsertMasks("5:4")


def test_pass_uuid_is_stable_and_config_sensitive():
    assert InsertMasks("2:4").uuid() == InsertMasks(NMPattern(2, 4)).uuid()
    assert InsertMasks("2:4").uuid() != InsertMasks("1:4").uuid()
    assert InsertMasks(exclude=("a*",)).uuid() != InsertMasks().uuid()


def test_apply_mask_op_registration():
    mask = torch.rand(8, 12, requires_grad=True)
    # Full check (schema, autograd, fake tensor, AOT dispatch) once; the cheap checks on the variants.
    torch.library.opcheck(APPLY_MASK, (torch.randn(12, 8, requires_grad=True), mask, True))
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(APPLY_MASK, (torch.randn(8, 12, requires_grad=True), mask, False), test_utils=quick)
    bf16 = torch.randn(8, 12, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(APPLY_MASK, (bf16, mask, False), test_utils=quick)


def test_soft_mask_has_no_denormals_at_low_temperature():
    """sigmoid(-88) is an fp32 denormal, and weights times denormals made a CPU training step take
    4 minutes: far-pruned entries are exactly 0 instead, in both the plain and the differentiable path."""
    from sparseforge_compile.masks import MaskState, NMPattern

    state = MaskState((16, 32), NMPattern(2, 4))
    state.set_scores(torch.randn(16, 32) * 6)
    for temperature in (0.3, 0.07, 0.05, 0.02):
        state.set_schedule(temperature, 0.0)
        for grad in (False, True):
            state.score.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                mask = state.soft_mask()
            tiny = (mask > 0) & (mask < torch.finfo(torch.float32).tiny * 1e20)
            assert not bool(tiny.any()), temperature
    state.score.requires_grad_(False)
    assert bool((state.soft_mask() == 0).any())


@pytest.mark.parametrize("temperature, blend", [(0.3, 0.0), (0.001, 0.0), (0.05, 0.4), (0.02, 1.0)])
def test_all_layers_masks_at_once_equal_the_per_layer_masks(temperature, blend):
    """make_masks (multi-tensor kernels for all layers) hands out exactly what make_mask does,
    including the exact zeros below the cutoff, the leaves and the evidence hook while collecting."""
    from sparseforge_compile.masks import MaskState, NMPattern, make_masks

    torch.manual_seed(0)
    states = []
    for k, shape in enumerate([(8, 16), (4, 32), (8, 16)]):
        ms = MaskState(shape, NMPattern(2, 4), f"layer{k}")
        ms.set_scores(torch.randn(shape) * 3)
        ms.set_schedule(temperature, blend)
        states.append(ms)
    states[1].collecting = True
    ref = [ms.make_mask(leaf=True) for ms in states]
    got = make_masks(states, leaf=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert all(m.requires_grad and m.is_leaf for m in got)
    assert states[1].last_mask is got[1] and states[0].last_mask is None
    (got[1] * torch.ones_like(got[1])).sum().backward()
    assert states[1]._updates[0] == 1  # the hook fed the gradient EMA
