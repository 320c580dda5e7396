"""UseCausalAttention: the exported causal mask becomes is_causal=True, and only when it is causal."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge_compile.capture import capture
from sparseforge_compile.models import load_model
from sparseforge_compile.passes.causal_attention import SDPA, UseCausalAttention


def _sdpa_nodes(gm):
    return list(gm.graph.find_nodes(op="call_function", target=SDPA))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"])
def test_decoders_get_is_causal_and_the_same_logits(name):
    model = load_model(name).model
    ids = torch.randint(0, 256, (2, 16))
    captured = capture(model, (ids,))
    result = UseCausalAttention()(captured.gm)
    nodes = _sdpa_nodes(captured.gm)
    assert result.stats["rewritten"] == len(nodes) == model.config.num_hidden_layers
    assert result.stats["erased_nodes"] > 0
    for node in nodes:
        assert node.kwargs["is_causal"] is True and len(node.args) == 3 and "attn_mask" not in node.kwargs
    for shape in [(2, 16), (3, 29)]:  # other batch and sequence sizes too (dynamic dims kept)
        other = torch.randint(0, 256, shape)
        torch.testing.assert_close(captured.gm(other), model(input_ids=other, use_cache=False).logits)


def test_bidirectional_attention_is_kept_with_a_reason():
    model = load_model("tiny-bert").model
    captured = capture(model, (torch.randint(0, 256, (2, 16)),))
    result = UseCausalAttention()(captured.gm)
    assert result.stats["rewritten"] == 0 and not result.modified
    assert all("not the plain causal pattern" in why for why in result.stats["kept"].values())


class WindowAttention(nn.Module):
    """Attention with a shape-only mask that is *not* causal: a sliding window of 3."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        n = x.shape[1]
        i = torch.arange(n, device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PaddedAttention(nn.Module):
    """Causal attention whose mask also reads an input (padding): its values decide the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & keep[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_window_mask_or_a_mask_from_inputs_is_kept():
    window = capture(WindowAttention(), (torch.randn(2, 10, 8),))
    result = UseCausalAttention()(window.gm)
    assert result.stats["rewritten"] == 0
    assert "not the plain causal pattern" in next(iter(result.stats["kept"].values()))
    padded = capture(PaddedAttention(), (torch.randn(2, 10, 8), torch.ones(2, 10)))
    result = UseCausalAttention()(padded.gm)
    assert result.stats["rewritten"] == 0
    assert "depends on input values" in next(iter(result.stats["kept"].values()))
