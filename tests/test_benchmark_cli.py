"""The benchmark scripts' own argument handling (their GPU runs are too costly to lose to a typo)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy


def test_method_brackets_override_the_flags_and_anneal_options():
    args = accuracy.parse_args(["--batch-size", "16", "--anneal", "lr=1e-3", "--anneal", "seqlen=256"])
    overrides = accuracy.anneal_overrides(args.anneal)
    cfg = accuracy.anneal_config(args, overrides, "sparseforge[batch_size=64,lr=2e-4]")
    assert (cfg.batch_size, cfg.seqlen, cfg.lr) == (64, 256, 2e-4)
    plain = accuracy.anneal_config(args, overrides, "sparseforge")
    assert (plain.batch_size, plain.seqlen, plain.lr) == (16, 256, 1e-3)


def test_bad_method_settings_stop_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(accuracy, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match="unknown field 'batchsize'"):
        accuracy.main(["--methods", "sparseforge[batchsize=64]"])
    with pytest.raises(SystemExit, match=r"sparseforge\[t_start=0.01\]: need 0 < t_end"):
        accuracy.main(["--methods", "sparseforge[t_start=0.01]"])



def test_curves_summarize_quarter_points_and_the_last_tenth(tmp_path):
    import json

    import curves

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": 10 * (i + 1), "loss": 10.0 - i, "ce": 5.0, "kl": float(i)}) + "\n"
                            for i in range(20)))
    rows = curves.summarize(path)
    assert [r["point"] for r in rows] == ["first", "1/4", "1/2", "3/4", "last", "mean of last 2"]
    assert rows[1]["step"] == 60 and rows[-2]["kl"] == 19.0
    assert rows[-1]["kl"] == 18.5 and "ce_real" not in rows[-1]
