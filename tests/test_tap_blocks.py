"""Block-output taps (layer-wise distillation): the graph pass, the hooks, and the loss."""

import pytest
import torch

from sparseforge_compile.capture import capture
from sparseforge_compile.distill import BlockOutputHooks, hidden_state_loss
from sparseforge_compile.models import load_model
from sparseforge_compile.passes.base import PassConditionError
from sparseforge_compile.passes.tap_blocks import (
    TAP_MODULE,
    TapBlockOutputs,
    block_recorder,
    remove_block_taps,
)


@pytest.mark.parametrize("name, blocks_path", [("tiny-llama", "model.layers"), ("tiny-gpt2", "transformer.h"),
                                               ("tiny-opt", "model.decoder.layers")])
def test_graph_taps_record_what_the_hooks_record(name, blocks_path):
    model = load_model(name).model
    ids = torch.randint(0, 256, (2, 12))
    captured = capture(model, (ids,))
    before = captured.gm(ids)
    n_blocks = len(model.get_submodule(blocks_path))
    result = TapBlockOutputs(blocks_path, n_blocks)(captured.gm)
    assert result.stats["taps"] == n_blocks
    recorder = block_recorder(captured.gm)
    recorder.enabled = True
    after = captured.gm(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # taps change no numerics
    from_graph = recorder.take()
    hooks = BlockOutputHooks(model)
    hooks.recorder.enabled = True
    model(input_ids=ids, use_cache=False)
    from_hooks = hooks.recorder.take()
    hooks.remove()
    assert len(from_graph) == len(from_hooks) == n_blocks
    for g, h in zip(from_graph, from_hooks):
        torch.testing.assert_close(g, h)
    assert remove_block_taps(captured.gm) == n_blocks and not hasattr(captured.gm, TAP_MODULE)
    torch.testing.assert_close(captured.gm(ids), before, rtol=0, atol=0)


def test_disabled_recorder_keeps_nothing_and_taps_survive_dead_code_elimination():
    model = load_model("tiny-llama").model
    ids = torch.randint(0, 256, (2, 8))
    captured = capture(model, (ids,))
    TapBlockOutputs("model.layers", 2)(captured.gm)
    captured.gm.graph.eliminate_dead_code()
    captured.gm.recompile()
    captured.gm(ids)
    recorder = block_recorder(captured.gm)
    assert recorder.outputs == {}
    with pytest.raises(RuntimeError, match="recorded 0 of 2"):
        recorder.take()
    recorder.enabled = True
    captured.gm(ids)
    assert len(recorder.take()) == 2


def test_tapping_twice_or_a_missing_block_is_a_clear_error():
    model = load_model("tiny-llama").model
    captured = capture(model, (torch.randint(0, 256, (2, 8)),))
    with pytest.raises(PassConditionError, match=r"block\(s\) \[2, 3\]"):
        TapBlockOutputs("model.layers", 4)(captured.gm)
    TapBlockOutputs("model.layers", 2)(captured.gm)
    with pytest.raises(PassConditionError, match="already has block taps"):
        TapBlockOutputs("model.layers", 2)(captured.gm)


def test_hidden_state_loss_is_normalized_per_block():
    t = [torch.ones(2, 3, 4), 10 * torch.ones(2, 3, 4)]
    assert float(hidden_state_loss([x.clone() for x in t], t)) == 0.0
    # The same *relative* error in a small and a large block counts the same.
    s = [1.5 * t[0], 15 * torch.ones(2, 3, 4)]
    assert float(hidden_state_loss(s, t)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="1 student vs 2 teacher"):
        hidden_state_loss(s[:1], t)
