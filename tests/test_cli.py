import json

import pytest

from sparseforge_compile.cli import main


def test_eval_prints_table_and_writes_json(tmp_path, capsys, data_dir):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", "tiny-llama", "--device", "cpu", "--seqlen", "128", "--max-windows", "2",
                 "--quiet", "--data-dir", str(data_dir), "--json", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("WikiText-2 test perplexity on a subset (2/")
    result = json.loads(out.read_text())["wikitext2"]
    assert result["windows"] == 2 and result["subset"] is True
    # the answer, computed here without the evaluation code: next-token NLL of the first two windows
    import math

    import torch

    from sparseforge_compile.data import load_wikitext2
    from sparseforge_compile.models import load_model

    loaded = load_model("tiny-llama")
    ids = torch.tensor(loaded.tokenizer.encode(load_wikitext2("test", data_dir))[: 2 * 128]).view(2, 128)
    with torch.no_grad():
        logits = loaded.model(ids).logits[:, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).mean()
    assert result["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


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


# ------------------------------------------------------------------------------------ recipes

def _prune_args(*argv):
    from sparseforge_compile.cli import build_parser

    return build_parser().parse_args(["prune", "--out", "unused", *argv])


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["sparseforge", "sparsegpt+kd", "magnitude"])
def test_printed_recipe_reads_back_to_the_defaults(tmp_path, capsys, method):
    from sparseforge_compile.pipeline import SparsifyConfig
    from sparseforge_compile.recipe import build_config, read_recipe

    assert main(["recipe", "--method", method]) == 0
    printed = _write(tmp_path / "recipe.toml", capsys.readouterr().out)
    assert "[schedule]" in printed.read_text() and "# Peak learning rate" in printed.read_text()
    assert build_config(read_recipe(printed)) == SparsifyConfig(method=method)
    assert main(["recipe", "--method", method, "--out", str(tmp_path / "out.toml")]) == 0
    assert (tmp_path / "out.toml").read_text() == printed.read_text()


def test_a_recipe_sets_what_the_flags_leave_and_the_flags_win(tmp_path):
    from sparseforge_compile.prune_command import prune_config

    recipe = _write(tmp_path / "r.toml", 'method = "sparsegpt+kd"\nteacher_decode = "forward"\npattern = "none"\n'
                    'sparsity = 0.5\nexclude = ["lm_head"]\n[schedule]\nanneal_end = 0.1\nharden_end = 0.2\n'
                    '[runtime]\nlr = 1e-3\nseed = 5\n[loss]\nhidden_weight = 2\n')
    cfg = prune_config(_prune_args("--recipe", str(recipe), "--lr", "2e-3", "--method", "magnitude"), "cpu")
    assert cfg.method == "magnitude" and cfg.anneal.runtime.lr == 2e-3  # flags over the recipe
    assert cfg.pattern is None and cfg.sparsity == 0.5 and cfg.exclude == ("lm_head",) and cfg.teacher_decode == "forward"
    assert (cfg.anneal.schedule.anneal_end, cfg.anneal.runtime.seed, cfg.anneal.loss.hidden_weight) == (0.1, 5, 2.0)
    assert cfg.anneal.runtime.batch_size == 4 and cfg.calib_samples == 16  # the CPU sizing where neither says
    assert cfg.budget_s is None  # no budget unless one is given
    plain = prune_config(_prune_args(), "cpu")
    assert plain.method == "sparseforge" and plain.anneal.evidence.warm_start == "wanda"  # CPU_DEFAULTS


def test_a_yaml_recipe_reads_like_toml(tmp_path):
    pytest.importorskip("yaml")
    from sparseforge_compile.recipe import read_recipe

    recipe = _write(tmp_path / "r.yaml", "method: sparseforge\nbudget_s: null\nschedule:\n  steps: 40\n"
                                         "evidence:\n  prior_margin: 100\n")
    assert read_recipe(recipe) == {"method": "sparseforge", "budget_s": None, "steps": 40, "prior_margin": 100.0}


@pytest.mark.parametrize("text, message", [
    ("[runtime]\nlerning_rate = 1e-3\n", "unknown key runtime.lerning_rate"),
    ("[runtime]\nanneal_end = 0.1\n", r"unknown key runtime.anneal_end \(it belongs in \[schedule\]\)"),
    ("colour = 1\n", "unknown key colour"),
    ("[evidence]\nimportance = \"psychic\"\n", "importance 'psychic': choose one of fisher, hutchinson"),
    ("[runtime]\nlr = \"fast\"\n", "runtime.lr = 'fast': expected a number"),
    ("[schedule]\nanneal_end = 0.5\nharden_end = 0.2\n", "need 0 <= anneal_end"),
    ("[schedule\n", "not valid TOML"),
])
def test_a_bad_recipe_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, message):
    import re

    recipe = _write(tmp_path / "bad.toml", text)
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(recipe) in err[0] and re.search(message, err[0]), err


def test_a_bad_flag_value_is_one_line_naming_the_setting(tmp_path, capsys):
    recipe = _write(tmp_path / "ok.toml", "[runtime]\nseed = 1\n")
    assert main(["prune", "--recipe", str(recipe), "--warm-start", "bogus", "--out", str(tmp_path / "run"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prune flags: warm_start 'bogus'" in err[0], err


def test_prune_runs_from_a_recipe(tmp_path, data_dir):
    recipe = _write(tmp_path / "r.toml", 'method = "magnitude"\nexclude = ["*.mlp.down_proj"]\n')
    out = tmp_path / "run"
    assert main(["prune", "--model", "tiny-llama", "--recipe", str(recipe), "--out", str(out), "--device", "cpu",
                 "--eval-windows", "0", "--quiet", "--data-dir", str(data_dir)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "magnitude" and summary["config"]["exclude"] == ["*.mlp.down_proj"]
    assert summary["pruned_layers"] == 12  # two layers' down_proj kept dense


def test_eval_runs_lm_eval_tasks_from_the_data_folder(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    (tmp_path / "tasks" / "arc").mkdir(parents=True)
    docs = [{"id": str(i), "question": f"q{i}?", "choices": {"text": ["a", "bb"], "label": ["A", "B"]},
             "answerKey": "AB"[i % 2]} for i in range(3)]
    (tmp_path / "tasks/arc/ARC-Easy-validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny-llama", "--device", "cpu", "--tasks", "arc_easy", "--quiet",
                 "--data-dir", str(tmp_path), "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["tasks"]["arc_easy"]
    assert {"acc", "acc_norm"} <= set(scores) and "wikitext2" not in json.loads(out.read_text())
    assert "arc_easy" in capsys.readouterr().out


def _tiny_prune(tmp_path, *extra):
    return main(["prune", "--model", "tiny-llama", "--device", "cpu", "--method", "sparseforge", "--steps", "4",
                 "--batch-size", "2", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32",
                 "--eval-windows", "0", "--quiet", "--out", str(tmp_path / "out"), *extra])


def test_prune_calibrates_on_the_users_text(tmp_path):
    text = tmp_path / "domain.jsonl"
    text.write_text("".join(json.dumps({"text": f"domain sentence number {i} " * 20}) + "\n" for i in range(20)))
    assert _tiny_prune(tmp_path, "--calib-data", str(text), "--data-dir", str(tmp_path)) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["calib_data"] == [str(text)] and summary["steps"] == 4


def test_prune_without_a_data_folder_takes_c4_from_the_hub(tmp_path, monkeypatch):
    import datasets

    import sparseforge_compile.data as data

    monkeypatch.delenv("SPARSEFORGE_DATA", raising=False)
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    asked = []

    def stand_in(name, **kwargs):  # the hub's C4 shard, as the datasets library streams it
        asked.append(name)
        return iter({"text": f"web page {i} " * 40} for i in range(2000))

    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    assert _tiny_prune(tmp_path) == 0
    assert asked and asked[0] == "allenai/c4"


def test_magnitude_says_it_ignores_the_calibration_text(tmp_path, caplog):
    text = tmp_path / "domain.txt"
    text.write_text("a domain sentence\n" * 50)
    with caplog.at_level("WARNING", logger="sparseforge_compile.pipeline"):
        assert main(["prune", "--model", "tiny-llama", "--device", "cpu", "--method", "magnitude", "--eval-windows",
                     "0", "--quiet", "--calib-data", str(text), "--out", str(tmp_path / "out")]) == 0
    assert any("reads no calibration text" in r.getMessage() and str(text) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("command", ["eval", "report", "prune", "plan", "recipe", "generate"])
def test_every_commands_help_prints(command, capsys):
    """Help texts come from the settings' docstrings, where a '%' would break argparse's formatting."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: sparseforge-compile " + command in capsys.readouterr().out
