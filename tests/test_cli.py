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
