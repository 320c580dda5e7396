"""Position math stays fp32 in the captured graph under autocast (passes/float32_positions.py).

The bug it guards against: transformers 5.1x computes the rotary angles as a matmul inside an
autocast-off region that export drops, so the graph ran that matmul in bf16 under the training
loop's autocast (0.19 nats of KL to fp32 on SmolLM2 beyond position 128, benchmarks/graph_numerics.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.graph_numerics import (
    autocast_off_if_on,  # what transformers' maybe_autocast(enabled=False) does
)
from sparseforge_compile.capture import capture
from sparseforge_compile.evaluate import logits_of
from sparseforge_compile.models import tiny_model
from sparseforge_compile.passes.float32_positions import KeepPositionMathInFloat32, float32_matmul


class RotaryToy(nn.Module):
    """Embedding, rotary angles from a position matmul, a Linear: the smallest model with the bug."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 32)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None, None, :].float()
        with autocast_off_if_on(ids.device.type):
            angles = (self.inv_freq[None, :, None] @ positions).transpose(1, 2)
        rot = torch.cat((angles, angles), dim=-1).cos()
        return self.proj(x * rot) + (x @ x.transpose(1, 2)).mean(-1, keepdim=True)  # an activation matmul too


def _pinned_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The autocast-off matmuls of ``gm`` and of its regions' subgraphs."""
    return [n for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
            for n in sub.graph.nodes if n.target is float32_matmul]


class NoGradRotaryToy(RotaryToy):
    """The angles in a ``torch.no_grad`` function, as transformers 5.1x's rotary ``forward`` is: export
    puts them in a ``wrap_with_set_grad_enabled`` region, a subgraph of their own."""

    @torch.no_grad()
    def angles(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with autocast_off_if_on(positions.device.type):
            return torch.cat(((self.inv_freq[None, :, None] @ positions).transpose(1, 2),) * 2, dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None, None, :].float()
        return self.proj(x * self.angles(x, positions).cos()) + (x @ x.transpose(1, 2)).mean(-1, keepdim=True)


def _bf16(fn, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args).float()


def test_position_matmul_is_pinned_and_activation_matmul_is_not():
    model = RotaryToy().eval()
    ids = torch.randint(0, 64, (2, 300))
    exported = torch.export.export(model, (ids,), strict=False).module()
    raw = KeepPositionMathInFloat32()  # on a plain export, to see both the bug and the fix
    eager, before = _bf16(model, ids), _bf16(exported, ids)
    # The bug, reproduced: the position matmul in bf16 puts late positions' angles off.
    assert (before - eager)[:, 256:].abs().max() > 0.05
    result = raw(exported)
    assert len(result.stats["pinned"]) == 1
    pinned = [n for n in exported.graph.nodes if n.target is float32_matmul]
    assert len(pinned) == 1  # x @ x^T reads the input's values: left to autocast
    torch.testing.assert_close(_bf16(exported, ids), eager, rtol=0, atol=0)
    with torch.no_grad():  # fp32 unchanged
        torch.testing.assert_close(exported(ids), model(ids), rtol=0, atol=0)


def test_position_matmul_in_a_no_grad_region_is_pinned():
    """The GPU machine's bug as it really was: the matmul inside export's no_grad region."""
    model = NoGradRotaryToy().eval()
    ids = torch.randint(0, 64, (2, 300))
    exported = torch.export.export(model, (ids,), strict=False).module()
    regions = [n for n in exported.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    assert regions, "export no longer makes a region of a no_grad function: this test checks nothing"
    assert (_bf16(exported, ids) - _bf16(model, ids))[:, 256:].abs().max() > 0.05  # the bug
    result = KeepPositionMathInFloat32()(exported)
    assert len(result.stats["pinned"]) == 1 and "/" in result.stats["pinned"][0]
    assert len(_pinned_nodes(exported)) == 1  # x @ x^T, in the top graph, still left to autocast
    torch.testing.assert_close(_bf16(exported, ids), _bf16(model, ids), rtol=0, atol=0)


def test_matmul_on_input_values_inside_a_region_is_left_to_autocast():
    """A region's placeholder fed by the inputs' values counts as input: its matmuls are not pinned."""

    class ValuesInRegion(nn.Module):
        @torch.no_grad()
        def gram(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x.transpose(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gram(x).sum(-1)

    exported = torch.export.export(ValuesInRegion(), (torch.randn(2, 8, 4),), strict=False).module()
    assert not KeepPositionMathInFloat32()(exported).stats["pinned"]


def test_capture_keeps_hf_rotary_in_fp32_under_autocast(rotary_51x):
    model = tiny_model("tiny-llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 600))
    captured = capture(model, ids[:, :16])
    assert _pinned_nodes(captured.gm)
    torch.testing.assert_close(_bf16(captured.gm, ids), _bf16(lambda x: logits_of(model, x), ids), rtol=0, atol=0)


@pytest.mark.parametrize("toy", [RotaryToy, NoGradRotaryToy])
def test_pinned_matmul_stays_fp32_when_the_graph_is_compiled(toy):
    """The loop compiles the graph on a GPU: Dynamo must keep the autocast-off region (aot_eager: the
    same tracing as Inductor, without code generation)."""
    torch._dynamo.reset()
    model = toy().eval()
    ids = torch.randint(0, 64, (2, 300))
    gm = capture(model, ids).gm
    compiled = torch.compile(gm, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(_bf16(compiled, ids), _bf16(model, ids), rtol=0, atol=0)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"])
def test_the_graph_computes_what_the_model_computes_under_autocast(name: str, device: str):
    """SparseForge trains the captured graph under bf16 autocast and the peer the model itself: the two
    must be one function there too, with this machine's transformers (fp32 equality is test_capture's)."""
    model = tiny_model(name).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 300), device=device)
    captured = capture(model, ids[:, :16])
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        graph, plain = captured.gm(ids).float(), logits_of(model, ids).float()
    torch.testing.assert_close(graph, plain, rtol=0, atol=0)
