"""The stage pass lists, declared once, run through the PassManager on a tiny captured model."""

from __future__ import annotations

import torch

from sparseforge_compile.capture import capture
from sparseforge_compile.checkpoint import detect_nm_layers
from sparseforge_compile.masks import NMPattern
from sparseforge_compile.models import tiny_model
from sparseforge_compile.passes import pipelines
from sparseforge_compile.passes.eligibility import analyze_eligibility
from sparseforge_compile.passes.harden import Harden
from sparseforge_compile.passes.insert_masks import InsertMasks, apply_mask_nodes


def test_each_stage_lists_its_passes_in_order():
    names = {
        "capture": [p.name for p in pipelines.capture_passes()],
        "prepare": [p.name for p in pipelines.prepare_passes()],
        "mask": [p.name for p in pipelines.mask_passes("2:4", ("model.layers", 2))],
        "harden": [p.name for p in pipelines.harden_passes()],
        "lower": [p.name for p in pipelines.lower_passes()],
    }
    assert names == {"capture": ["KeepPositionMathInFloat32"], "prepare": ["UseCausalAttention"],
                     "mask": ["InsertMasks", "TapBlockOutputs"], "harden": ["Harden"], "lower": ["LowerSparseLinears"]}
    assert [p.name for p in pipelines.mask_passes("2:4")] == ["InsertMasks"]


def test_stages_mask_and_harden_a_captured_model_with_their_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_DEBUG_GRAPHS", str(tmp_path))
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 16))
    captured = capture(model, (ids,))
    report = analyze_eligibility(captured, NMPattern(2, 4))
    eligible = [info.name for info in report.layers if info.eligible]
    masked = pipelines.run_stage(pipelines.mask_passes("2:4"), captured.gm, eligibility=report)
    masks = masked.of(InsertMasks).masks
    assert sorted(masks) == sorted(eligible) and len(apply_mask_nodes(captured.gm)) == len(eligible)
    assert (tmp_path / "00_InsertMasks_before.txt").exists() and (tmp_path / "00_InsertMasks_after.txt").exists()
    for state in masks.values():
        state.set_hard(state.hard_mask())
    hardened = pipelines.run_stage(pipelines.harden_passes(), captured.gm)
    assert isinstance(hardened.passes[0], Harden) and not apply_mask_nodes(captured.gm)
    assert set(eligible) <= set(detect_nm_layers(model, "2:4"))  # every masked weight is now exactly 2:4
