"""The ``cuda_graphs`` setting: the compiled decoder blocks replayed as CUDA graphs train what the
compiled step trains; where graphs cannot run, the loop says so and compiles without them."""

from __future__ import annotations

import pytest
import torch
from test_anneal import _annealer

from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.anneal.compile import Compilation, Forwards
from sparseforge_compile.models import tiny_model

CUDA = torch.device("cuda")


def test_graphs_only_where_blocks_compile_on_cuda():
    on = AnnealConfig.from_flat({"cuda_graphs": "on"})
    assert on.graphs(CUDA) and not on.graphs(torch.device("cpu"))
    assert AnnealConfig().graphs(CUDA) and not AnnealConfig.from_flat({"cuda_graphs": "off"}).graphs(CUDA)
    assert not on.replace(compile="off").graphs(CUDA)
    assert on.replace(outline_blocks="off").graphs(CUDA)  # the teacher's blocks, beside a flat masked graph
    assert not on.replace(importance="hutchinson").graphs(CUDA)  # eager: double backward
    with pytest.raises(ValueError, match="cuda_graphs"):
        AnnealConfig.from_flat({"cuda_graphs": "auto-ish"})


def test_a_failed_graph_step_compiles_again_without_graphs(monkeypatch, caplog):
    """The fall-back order: graphs off first (blocks recompiled in the default mode), then the flat
    graph, then eager; the graphed steps that can fail (compile, record, replay) are all tried."""
    monkeypatch.setattr(AnnealConfig, "graphs", lambda self, device: True)
    modes = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (modes.append(kw.get("mode")), real(self, **kw)))
    model = tiny_model("tiny-llama", seed=0)
    cfg = AnnealConfig.from_flat({"compile": "on", "fixed_mask": True, "cuda_graphs": "on"})
    comp = Compilation(Forwards(model, model, model), cfg, torch.device("cpu"), regions=[model])
    assert comp.graphs and set(modes) == {"reduce-overhead"} and len(comp.blocks) == 2
    assert [comp.first_step() for _ in range(4)] == [True, True, True, False]
    modes.clear()
    comp.fall_back(RuntimeError("replay failed"))
    assert not comp.graphs and comp.compiled and set(modes) == {None} and len(comp.blocks) == 2
    assert "CUDA graphs failed (RuntimeError: replay failed)" in caplog.text
    assert comp.first_step() and not comp.first_step()
    comp.fall_back(RuntimeError("compile failed"))  # no outlined graph: eager
    assert not comp.compiled and comp.active.forward is model and not comp.blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["sparseforge", "sparsegpt+kd"])
def test_graphed_steps_train_what_compiled_steps_train(data_dir, method, caplog):
    """bf16 on CUDA, through the soft, hardening and plain phases (Fisher probes, block taps): the
    graph replays run the compiled blocks' own kernels, so losses and masks agree; no fall-back."""
    runs = {}
    for graphs in ("off", "on"):
        torch.manual_seed(0)
        annealer = _annealer(data_dir, method=method, device="cuda", steps=12, warm_start="wanda", hidden_weight=3.0,
                             compile="on", outline_blocks="regional", cuda_graphs=graphs, importance_every=2,
                             evidence_probes=1, prior_margin=0.5, anneal_end=0.3, harden_end=0.5)
        runs[graphs] = ([float(annealer.train_step()["loss"]) for _ in range(12)], annealer)
    assert runs["on"][1].compilation.graphs and not runs["off"][1].compilation.graphs, caplog.text[-2000:]
    assert runs["on"][0] == pytest.approx(runs["off"][0], rel=1e-3), runs
    for name, ms in runs["off"][1].masks.items():
        assert torch.equal(ms.hard_mask(), runs["on"][1].masks[name].hard_mask()), name
