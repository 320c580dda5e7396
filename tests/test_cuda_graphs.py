"""The one CUDA-graph capture helper: warm-ups on a side stream, then a capture whose replays recompute."""

import pytest
import torch

from sparseforge_compile.cuda_graphs import capture


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_warms_up_then_replays_with_new_inputs():
    x = torch.ones(8, device="cuda")
    calls = []

    def fn():
        calls.append(torch.cuda.current_stream())
        return x * 2

    graph, out = capture(fn, warmup=2)
    assert len(calls) == 3 and calls[0] != torch.cuda.current_stream()  # warm-ups ran on a side stream
    x.copy_(torch.arange(8.0, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, torch.arange(8.0, device="cuda") * 2)
