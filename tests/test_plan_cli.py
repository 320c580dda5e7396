"""``sparseforge-compile plan`` and ``prune --nproc`` (torchrun, gloo processes on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_digest import synthetic_data

from sparseforge_compile.cli import main
from sparseforge_compile.memory_plan import GIB, ModelShape, format_plan, model_shape, plan_modes
from sparseforge_compile.models import tiny_model


def test_plan_prints_the_models_plan_and_mode(capsys):
    assert main(["plan", "--model", "tiny-llama", "--gpus", "2", "--batch-size", "2", "--seqlen", "16",
                 "--gpu-memory-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert model_shape("tiny-llama") == ModelShape.of(tiny_model("tiny-llama"))
    expected = format_plan(plan_modes(ModelShape.of(tiny_model("tiny-llama")), 2, 2, 16), "ddp", GIB)
    assert expected in out and "mode: ddp" in out


def test_plan_of_the_llama_7b_shape(capsys):
    assert main(["plan", "--model", "llama-7b-shape", "--gpus", "8", "--batch-size", "4", "--seqlen", "512",
                 "--gpu-memory-gib", "80"]) == 0
    assert "mode: fsdp2" in capsys.readouterr().out
    # One GPU holds neither a replica nor a shard of it: one line naming the fix, exit 2.
    assert main(["plan", "--model", "llama-7b-shape", "--gpus", "1", "--gpu-memory-gib", "80"]) == 2
    assert "use more GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("method,parallel", [("sparsegpt+kd", "auto"), ("sparseforge", "fsdp2")])
def test_prune_nproc_runs_under_torchrun(tmp_path, method, parallel):
    data = synthetic_data(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparseforge_compile.cli", "prune", "--model", "tiny-llama", "--nproc", "2",
           "--device", "cpu", "--method", method, "--steps", "2", "--batch-size", "1", "--seqlen", "32",
           "--calib-samples", "2", "--calib-seqlen", "32", "--eval-windows", "0", "--data-dir", str(data),
           "--parallel", parallel, "--out", str(out), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                **__import__("os").environ})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained on 2 processes, 1 sequences each per step" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_tokens"] == 2 * 2 * 32  # steps x global batch x seqlen
    assert (out / "metrics.jsonl").read_text().count("\n") >= 1


def test_batch_size_auto_is_a_setting_of_flags_and_recipes(tmp_path, capsys):
    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.cli import build_parser
    from sparseforge_compile.prune_command import prune_config
    from sparseforge_compile.recipe import build_config

    args = build_parser().parse_args(["prune", "--batch-size", "auto", "--out", str(tmp_path / "o")])
    assert prune_config(args, "cuda").anneal.runtime.batch_size == "auto"
    assert build_parser().parse_args(["prune", "--batch-size", "48", "--out", "o"]).batch_size == 48
    assert build_config({"batch_size": "auto"}, source="r.toml").anneal.runtime.batch_size == "auto"
    with pytest.raises(ValueError, match="batch_size must be >= 1 or auto, got 'most'"):
        AnnealConfig.from_flat({"batch_size": "most"})
    assert main(["prune", "--model", "tiny-llama", "--batch-size", "0", "--steps", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "batch_size must be >= 1 or auto, got 0" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny-llama", "--gpu-memory-gib", "1"]) == 0
    assert "largest batch per GPU in 80% of it (--batch-size auto): ddp " in capsys.readouterr().out


def test_sparsify_fixes_an_auto_batch_before_the_run_records_it(tmp_path):
    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.models import ByteTokenizer
    from sparseforge_compile.pipeline import SparsifyConfig, sparsify

    anneal = AnnealConfig.from_flat(dict(steps=1, batch_size="auto", seqlen=16, warm_start="magnitude",
                                         teacher_data_ratio=0.0, compile="off", autocast="off"))
    result = sparsify(tiny_model("tiny-llama"), SparsifyConfig(budget_s=None, anneal=anneal), tokenizer=ByteTokenizer(),
                      data_dir=synthetic_data(tmp_path / "data"), out_dir=tmp_path / "out", progress=False)
    assert result.batch_size == 32 and result.summary()["batch_size"] == 32  # the CPU's: memory is the host's
    assert result.anneal.tokens == 32 * 16
