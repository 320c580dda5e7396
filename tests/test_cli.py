import json

from sparseforge_compile.cli import main


def test_eval_prints_table_and_writes_json(tmp_path, capsys, data_dir):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", "tiny-llama", "--device", "cpu", "--seqlen", "128", "--max-windows", "2",
                 "--quiet", "--data-dir", str(data_dir), "--json", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("WikiText-2 test perplexity on a subset (2/")
    result = json.loads(out.read_text())
    assert result["windows"] == 2 and result["subset"] is True
    assert 1.0 < result["ppl"] < 1e4


def test_user_errors_are_one_line(capsys, tmp_path):
    code = main(["eval", "--model", "no-such-model", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model" in err[0]
    code = main(["eval", "--model", "tiny-llama", "--device", "cpu", "--data-dir", str(tmp_path / "missing")])
    assert code == 2
    assert "data directory" in capsys.readouterr().err


def test_prune_one_shot_writes_model_report_and_summary(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    code = main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--out", str(out), "--device", "cpu",
                 "--eval-windows", "1", "--quiet", "--data-dir", str(data_dir)])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("WikiText-2 test perplexity (1/")
    for name in ("sparseforge.json", "sparseforge.compact.safetensors", "model.safetensors", "report.json",
                 "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned_layers"] == 14 and summary["pruned_ppl"] > 1


def test_prune_unstructured_saves_the_hf_layout(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = main(["prune", "--model", "tiny-llama", "--method", "wanda", "--pattern", "none", "--sparsity", "0.5",
                 "--out", str(out), "--device", "cpu", "--eval-windows", "0", "--quiet", "--calib-samples", "2",
                 "--calib-seqlen", "64", "--data-dir", str(data_dir)])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out / "hf-unstructured")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 1e-6
