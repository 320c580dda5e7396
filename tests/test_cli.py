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
    (out / "README.md").write_text("my notes")  # the user's file survives a replacing prune
    again = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--out", str(out), "--device", "cpu",
             "--eval-windows", "0", "--quiet", "--data-dir", str(data_dir)]
    assert main(again) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "my notes" and (out / "sparseforge.json").is_file()


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


def test_a_masked_lm_prunes_with_calibration_and_skips_perplexity(tmp_path, capsys, data_dir):
    """BERT: Wanda calibrates every eligible layer, the MLM-head transform after the encoder blocks
    included; next-token perplexity does not apply, so prune says so and eval refuses in one line."""
    out = tmp_path / "bert"
    code = main(["prune", "--model", "tiny-bert", "--method", "wanda", "--out", str(out), "--device", "cpu",
                 "--quiet", "--data-dir", str(data_dir)])
    assert code == 0
    assert "perplexity skipped: BertForMaskedLM is not a causal language model" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned_layers"] == 13 and "pruned_ppl" not in summary
    for command in (["eval", "--data-dir", str(data_dir)], ["generate", "--prompt", "The cat"]):
        assert main([command[0], "--model", str(out), "--device", "cpu", *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "BertForMaskedLM is not a causal language model" in err[0]


def test_eval_windows_longer_than_the_position_table_are_refused(capsys, data_dir):
    code = main(["eval", "--model", "tiny-llama", "--device", "cpu", "--seqlen", "100000", "--data-dir",
                 str(data_dir)])
    assert code == 2
    assert "exceed LlamaForCausalLM's" in capsys.readouterr().err
