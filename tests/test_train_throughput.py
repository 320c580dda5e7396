"""benchmarks/train_throughput.py runs end to end on the CPU (--smoke: tiny model, gloo processes)."""

from __future__ import annotations

import json

from test_digest import synthetic_data

from benchmarks import train_throughput


def test_smoke_writes_settings_and_scaling_rows(tmp_path):
    data = synthetic_data(tmp_path / "data")
    path = train_throughput.main(["--smoke", "--methods", "sparseforge", "--data-dir", str(data),
                                  "--parallel", "fsdp2", "--out", str(tmp_path / "tp.json")])
    payload = json.loads(path.read_text())
    assert {"command", "commit", "settings", "device", "torch", "date", "rows"} <= payload.keys()
    rows = payload["rows"]
    assert [r.get("settings") for r in rows[:4]] == ["before", "graphs", "batch", "after"]
    assert [r["batch_per_gpu"] for r in rows[:4]] == [2, 2, 32, 32]  # batch auto is 32 off CUDA
    scaling = [r for r in rows if r["bench"] == "scaling"]
    assert [r["gpus"] for r in scaling] == [1, 2] and scaling[0]["speedup"] == 1.0
    assert {r["parallel"] for r in scaling} == {"fsdp2"}
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in rows)


def test_settings_are_checked_before_anything_runs(capsys):
    import pytest

    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--settings", "before,fastest"])
    assert "--settings fastest: choose from before, graphs, batch, after" in capsys.readouterr().err
    assert train_throughput.parse_args(["--settings", ""]).settings == ""
