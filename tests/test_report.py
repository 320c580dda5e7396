"""Inspection report: plain, masked (annealing) and hardened models; no-eligible models; graph files; CLI."""

import json

import pytest
import torch
from torch import nn

from sparseforge_compile import inspect
from sparseforge_compile.capture import capture
from sparseforge_compile.cli import main
from sparseforge_compile.lowering.sparse_linear import SparseLinear
from sparseforge_compile.masks import NMPattern
from sparseforge_compile.models import tiny_model
from sparseforge_compile.passes.harden import Harden, check_nm_invariant
from sparseforge_compile.passes.insert_masks import InsertMasks
from sparseforge_compile.report import compressed_fraction


def test_compressed_bytes_of_2_4_bf16():
    assert compressed_fraction(NMPattern(2, 4), torch.bfloat16) == 0.5625
    assert compressed_fraction(NMPattern(4, 8), torch.float16) == 0.5 + 4 * 3 / (8 * 16)


def test_report_through_the_pipeline_states(tmp_path):
    model = tiny_model("tiny-llama")
    captured = capture(model)
    plain = inspect(captured)
    assert (plain.totals["matmuls"], plain.totals["eligible"], plain.totals["hardened"]) == (15, 14, 0)
    head = next(r for r in plain.rows if r["name"] == "lm_head")
    assert head["reason_code"] == "tied" and "tied" in str(plain)
    eligible = [r for r in plain.rows if r["eligible"]]
    assert plain.totals["flops_saved_per_token"] == sum(r["shape"][0] * r["shape"][1] for r in eligible)
    assert plain.totals["weight_bytes_saved"] == pytest.approx(
        sum(r["shape"][0] * r["shape"][1] * 2 * (1 - 0.5625) for r in eligible))
    assert all(r["density"] == 1.0 and r["status"] == "eligible" for r in eligible)
    json.dumps(plain.as_dict())

    # Annealing state: masks in the graph, undecided groups and entropy from each MaskState.
    masks = InsertMasks()(captured).masks
    q = masks["model.layers.0.self_attn.q_proj"]
    q.set_schedule(1e-6, 0.0)  # a nearly binary soft mask
    annealing = inspect(captured)
    row = next(r for r in annealing.rows if r["name"] == "model.layers.0.self_attn.q_proj")
    assert row["status"] == "masked" and row["undecided"] == q.undecided_fraction() < 0.05
    assert row["entropy"] == q.entropy() and annealing.totals["masked"] == 14
    files = annealing.write_graph(tmp_path / "graph.png")
    assert [f.name for f in files] == ["graph.dot", "graph.png"] and files[1].stat().st_size > 10_000
    dot = files[0].read_text()
    assert dot.count("apply_mask\\n") == 14 and "#fb8072" in dot  # mask nodes highlighted

    # Hardened: density 0.5 and zero N:M violations (the registry lives on the original model).
    Harden()(captured)
    hardened = inspect(captured)
    rows = [r for r in hardened.rows if r["eligible"]]
    assert hardened.totals["hardened"] == 14
    assert all(r["status"] == "hardened" and r["density"] == 0.5 and r["nm_violations"] == 0 for r in rows)
    assert "hardened 2:4" in hardened.table()

    # Lowered: a layer swapped for a sparse module (weight in buffers) is listed from the registry.
    mlp = model.model.layers[1].mlp
    mlp.up_proj = SparseLinear.from_dense(mlp.up_proj.weight, None, "2:4", layer="model.layers.1.mlp.up_proj")
    lowered = inspect(model)
    row = next(r for r in lowered.rows if r["name"] == "model.layers.1.mlp.up_proj")
    assert (row["status"], row["density"], row["nm_violations"], lowered.totals["lowered"]) == ("lowered", 0.5, 0, 1)
    assert check_nm_invariant(model) == 14  # the lowered layer is checked through its materialized weight


def test_report_without_eligible_layers_says_so():
    odd = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    report = inspect(odd)
    assert report.totals["eligible"] == 0 and report.totals["flops_saved_per_token"] == 0
    assert "no eligible layer" in str(report)
    no_matmul = inspect(nn.Sequential(nn.LayerNorm(8)), example_inputs=(torch.randn(2, 8),))
    assert no_matmul.rows == [] and "no matmul with a parameter weight" in str(no_matmul)


def test_cli_report(tmp_path, capsys):
    out_json, out_dot = tmp_path / "r.json", tmp_path / "g.dot"
    code = main(["report", "--model", "tiny-gpt2", "--exclude", "*.mlp.*", "--json", str(out_json),
                 "--graph", str(out_dot)])
    assert code == 0
    text = capsys.readouterr().out
    assert "excluded by pattern '*.mlp.*'" in text and "weight matmuls: 9, eligible: 4" in text
    payload = json.loads(out_json.read_text())
    assert payload["model"] == "tiny-gpt2" and len(payload["layers"]) == 9
    assert out_dot.read_text().startswith("digraph")
    assert main(["report", "--model", "tiny-gpt2", "--pattern", "3:2"]) == 2


def test_annealing_curves_png_has_its_four_panels(tmp_path):
    """The prune's anneal_curves.png: loss, temperature/blend, undecided fraction and flips, per-layer density."""
    import matplotlib.image

    from sparseforge_compile.report import plot_curves

    history = [{"step": s, "loss": 1.0 / s, "kl": 0.8 / s, "ce": 3.0, "ce_real": 3.1, "teacher_ce_real": 3.0,
                "temperature": 0.3 * 0.9 ** s, "blend": min(s / 10, 1.0), "undecided": max(0.5 - s / 20, 0.0),
                "flips": s} for s in range(1, 21)]
    path = tmp_path / "anneal_curves.png"
    plot_curves(history, {"layers.0.q_proj": 0.5, "layers.0.k_proj": 0.5, "lm_head": 1.0}, path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] == 700 and image.shape[1] == 1100  # 11 x 7 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # drawn, not blank
