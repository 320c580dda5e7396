"""Eligibility: every weight matmul classified, each rejection rule hit by a crafted module."""

import json

import pytest
import torch
from torch import nn

from sparseforge_compile.capture import capture
from sparseforge_compile.masks import NMPattern
from sparseforge_compile.passes.eligibility import (
    KERNEL_SHAPE_RULES,
    analyze_eligibility,
    graph_to_digraph,
    kernel_shape_rule,
)


def verdicts(module: nn.Module, example: torch.Tensor, **kwargs) -> dict[str, tuple[bool, str | None]]:
    report = analyze_eligibility(capture(module, (example,)), **kwargs)
    return {info.name: (info.eligible, info.reason_code) for info in report.layers}


class TwoLayer(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_input_dim_not_divisible_by_m():
    got = verdicts(TwoLayer(18, 64, 32), torch.randn(2, 18), kernel_constraints=None)
    assert got == {"up": (False, "indivisible"), "down": (True, None)}
    # With M=2 the same 18-wide input divides.
    assert verdicts(TwoLayer(18, 64, 32), torch.randn(2, 18), pattern="1:2", kernel_constraints=None)["up"][0]


def test_below_sparse_kernel_shape_and_rule_is_configurable():
    module, x = TwoLayer(64, 8, 64), torch.randn(2, 64)
    # cuSPARSELt bf16 needs rows and cols in multiples of 16: the (8, 64) up projection fails, (64, 8) too.
    report = analyze_eligibility(capture(module, (x,)))
    assert [(i.name, i.reason_code) for i in report.layers] == [("up", "kernel_shape"), ("down", "kernel_shape")]
    assert "out_features 8" in report.layer("up").reason and "in_features 8" in report.layer("down").reason
    assert "cuSPARSELt bf16" in report.kernel_rule
    # The rule off: only the mask math is checked.
    off = analyze_eligibility(capture(module, (x,)), kernel_constraints=None)
    assert all(i.eligible for i in off.layers) and "disabled" in off.kernel_rule
    # CUTLASS wants columns in multiples of 64: a 32-wide input passes cuSPARSELt but not CUTLASS.
    narrow = TwoLayer(32, 32, 32)
    assert verdicts(narrow, torch.randn(2, 32))["up"] == (True, None)
    assert verdicts(narrow, torch.randn(2, 32), kernel_constraints="cutlass")["up"] == (False, "kernel_shape")
    with pytest.raises(ValueError, match="kernel_constraints=None"):
        kernel_shape_rule("cusparselt", torch.float32)


def test_kernel_rules_are_data():
    rule = KERNEL_SHAPE_RULES[("cusparselt", torch.bfloat16)]
    assert (rule.row_multiple, rule.col_multiple, rule.pattern) == (16, 16, "2:4")
    assert rule.violation(576, 1536) is None and rule.violation(576, 1540) is not None


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mix(self.emb(ids)))


def test_tied_to_embedding():
    got = verdicts(TiedHead(), torch.randint(0, 64, (2, 5)))
    assert got == {"mix": (True, None), "head": (False, "tied")}


def test_excluded_by_user_pattern():
    module, x = TwoLayer(64, 64, 64), torch.randn(2, 64)
    assert verdicts(module, x, exclude=("do*",)) == {"up": (True, None), "down": (False, "excluded")}
    assert verdicts(module, x, exclude="re:^u")["up"] == (False, "excluded")
    with pytest.raises(ValueError, match="regular expression"):
        verdicts(module, x, exclude=("re:(",))


class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.other = nn.Linear(32, 32)

    def forward(self, x):
        return self.other(self.lin(torch.relu(self.lin(x))))


def test_weight_shared_by_several_matmuls():
    report = analyze_eligibility(capture(SharedTwice(), (torch.randn(2, 32),)))
    assert [(i.name, i.reason_code) for i in report.layers] == [("lin", "shared"), ("lin", "shared"),
                                                                 ("other", None)]
    assert "shared by 2" in report.layers[0].reason


class RawMatmuls(nn.Module):
    """Weights read by mm/matmul: (in, out) on the right (as GPT-2 Conv1D), (out, in) on the left."""

    def __init__(self) -> None:
        super().__init__()
        self.right = nn.Parameter(torch.randn(32, 48))  # x @ W, W stored (in, out)
        self.left = nn.Parameter(torch.randn(16, 48))  # W @ h^T, W stored (out, in)

    def forward(self, x):
        h = torch.matmul(x, self.right)
        return torch.mm(self.left, h.t())


def test_raw_matmul_orientation():
    report = analyze_eligibility(capture(RawMatmuls(), (torch.randn(4, 32),)), kernel_constraints=None)
    shapes = {i.weight_fqn: (i.out_features, i.in_features, i.transposed) for i in report.layers}
    assert shapes == {"right": (48, 32, True), "left": (16, 48, False)}


def test_smollm2_shapes_are_eligible_and_untied_lm_head_stays_dense():
    """SmolLM2-135M's layer shapes (576 wide, 1536 MLP, 9/3 heads), 2 layers: 7 eligible per block.

    (The real model ties its head; untied here to check that an untied lm_head is kept dense too.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False)
    report = analyze_eligibility(capture(LlamaForCausalLM(cfg).eval()), pattern=NMPattern(2, 4))
    assert len(report.eligible) == 14 and {i.block for i in report.eligible} == {"model.layers.0", "model.layers.1"}
    assert report.layer("model.layers.0.self_attn.k_proj").shape == (192, 576)
    up = report.layer("model.layers.1.mlp.up_proj")
    assert (up.weight_fqn, up.out_features, up.in_features, up.transposed, up.block) == (
        "model.layers.1.mlp.up_proj.weight", 1536, 576, False, "model.layers.1")
    assert report.layer("lm_head").reason_code == "lm_head"
    assert report.counts() == {"matmuls": 15, "eligible": 14, "lm_head": 1}
    json.dumps(report.as_dict())  # JSON-able


def test_networkx_view_of_the_graph():
    captured = capture(TiedHead(), (torch.randint(0, 64, (2, 5)),))
    graph = graph_to_digraph(captured.gm)
    assert graph.number_of_nodes() == len(captured.gm.graph.nodes)
    weight = next(n for n in captured.gm.graph.find_nodes(op="get_attr") if n.target == "head.weight")
    readers = {graph.nodes[s]["target"] for s in graph.successors(weight.name)}
    assert readers == {"embedding.default", "linear.default"}
