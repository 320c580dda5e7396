"""Capture: the graph equals eager exactly, shares the model's parameters, and serves other shapes."""

import pytest
import torch
from torch import nn

from sparseforge_compile.capture import CapturedGraph, capture
from sparseforge_compile.errors import CaptureError
from sparseforge_compile.models import tiny_model

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt", "tiny-bert"]


def eager_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_capture_equals_eager_and_shares_parameters(name):
    model = tiny_model(name)
    captured = capture(model)
    assert isinstance(captured, CapturedGraph)
    assert captured.input_names == ["input_ids"]
    assert captured.dynamic_dims == {"input_ids": [0, 1]}, captured.notes
    if name == "tiny-bert":  # 512 position embeddings bound the sequence dim
        assert captured.notes == ["input_ids dim 1 is dynamic up to 512 (a limit of the model, e.g. its "
                                  "position embeddings)"]

    # Exactly equal in fp32, at shapes other than the example's (dynamic batch and sequence).
    with torch.no_grad():
        for shape in [(3, 21), (1, 7), (2, 16)]:
            ids = torch.randint(0, model.config.vocab_size, shape)
            out = captured.gm(ids)
            assert isinstance(out, torch.Tensor)
            assert torch.equal(out, eager_logits(model, ids)), (name, shape)
        assert torch.equal(captured(input_ids=ids), out)  # by name too

    # Every graph parameter IS a parameter of the model, and the name map points back to it.
    originals = dict(model.named_parameters(remove_duplicate=False))
    assert captured.params.keys() == originals.keys()
    for target, param in captured.gm.named_parameters(remove_duplicate=False):
        fqn = captured.original_name(target)
        assert originals[fqn] is param, (target, fqn)
    if name == "tiny-opt":
        check_training_the_graph_trains_the_model(model, captured)


def check_training_the_graph_trains_the_model(model: nn.Module, captured: CapturedGraph) -> None:
    ids = torch.randint(0, 256, (2, 8))
    captured.gm(ids).float().logsumexp(-1).mean().backward()
    weight = model.model.decoder.layers[0].fc1.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    before = weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, weight)
    with torch.no_grad():  # the graph sees the update: it reads the same Parameter
        assert torch.equal(captured.gm(ids), eager_logits(model, ids))
    captured.gm.train()  # flags only; must not raise (ep.module() forbids it by default)
    captured.gm.eval()


def test_plain_mlp_capture():
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    captured = capture(mlp)
    assert captured.prefix == ""
    assert list(captured.dynamic_dims.values()) == [[0]]
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(captured(x), mlp(x))
    assert captured.gm.get_parameter("0.weight") is mlp[0].weight
    assert captured.original_name("2.weight") == "2.weight"


def test_static_capture_says_so():
    mlp = nn.Sequential(nn.Linear(8, 8))
    captured = capture(mlp, (torch.randn(4, 8),), dynamic=False)
    assert not captured.dynamic
    assert any("static" in note for note in captured.notes)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: untraceable
            return x * 2
        return x


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.proj(x))


def test_untraceable_construct_names_module_and_fix():
    with pytest.raises(CaptureError) as info:
        capture(_Net(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "gate (_DataDependent)" in message
    assert "if x.sum() > 0" in message
    assert "torch.where" in message and 'attn_implementation="eager"' in message and "exclude" in message


def test_bad_example_inputs():
    with pytest.raises(CaptureError, match="input_ids"):
        capture(tiny_model("tiny-llama"), {"pixel_values": torch.zeros(1)})
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(nn.Sequential(nn.ReLU()))


def test_a_view_as_the_example_input_captures_a_graph_for_any_input():
    """ids[:, :16] as the example once made export guard on the view's base, and the graph then refused
    every plain tensor ("'NoneType' object has no attribute 'size'"); export's own guards still hold."""
    model = tiny_model("tiny-llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    captured = capture(model, ids[:, :16])
    with torch.no_grad():
        assert torch.equal(captured.gm(ids.clone()), eager_logits(model, ids))
    bert = capture(tiny_model("tiny-bert").eval())
    with pytest.raises(AssertionError, match=r"input_ids.size\(\)\[1\] <= 512"):
        bert.gm(torch.zeros(1, 600, dtype=torch.long))
