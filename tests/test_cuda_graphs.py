"""The one CUDA-graph capture helper: warm-ups on a side stream, then a capture whose replays recompute."""

import pytest
import torch

from sparseforge_compile.lowering.cuda_graphs import HostSyncError, capture, check_no_host_syncs


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_syncs_are_found_before_a_capture():
    x = torch.ones(8, device="cuda")

    def syncs():
        return x * 2 if bool((x > 0).all()) else x  # a device value read on the host

    with pytest.raises(HostSyncError, match="the probe synchronizes with the host"):
        check_no_host_syncs(syncs, "the probe")
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
    check_no_host_syncs(lambda: x * 2)  # pure device work passes
    torch.randn(4, device="cuda")
