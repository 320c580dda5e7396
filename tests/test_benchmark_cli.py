"""The benchmark scripts' own argument handling (their GPU runs are too costly to lose to a typo)."""


import pytest

from benchmarks import accuracy


def test_method_brackets_override_the_flags_and_anneal_options():
    args = accuracy.parse_args(["--batch-size", "16", "--anneal", "lr=1e-3", "--anneal", "seqlen=256"])
    overrides = accuracy.anneal_overrides(args.anneal)
    cfg = accuracy.anneal_config(args, overrides, "sparseforge[batch_size=64,lr=2e-4]")
    assert (cfg.runtime.batch_size, cfg.runtime.seqlen, cfg.runtime.lr) == (64, 256, 2e-4)
    plain = accuracy.anneal_config(args, overrides, "sparseforge")
    assert (plain.runtime.batch_size, plain.runtime.seqlen, plain.runtime.lr) == (16, 256, 1e-3)


def test_method_brackets_may_set_the_sampling_share_and_calibration_windows():
    args = accuracy.parse_args(["--teacher-sample-share", "0.2", "--calib-samples", "128"])
    spec = "sparseforge[teacher_sample_share=0.1,calib_samples=64,lr=5e-4]"
    assert accuracy.run_settings(args, spec) == {"teacher_sample_share": 0.1, "calib_samples": 64}
    assert accuracy.run_settings(args, "sparseforge") == {"teacher_sample_share": 0.2, "calib_samples": 128}
    assert accuracy.anneal_config(args, {}, spec).runtime.lr == 5e-4


def test_bad_method_settings_stop_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(accuracy, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match="unknown field 'batchsize'"):
        accuracy.main(["--methods", "sparseforge[batchsize=64]"])
    with pytest.raises(SystemExit, match=r"sparseforge\[t_start=0.01\]: need 0 < t_end"):
        accuracy.main(["--methods", "sparseforge[t_start=0.01]"])
    with pytest.raises(SystemExit, match=r"teacher_sample_share 1.5 must be in \[0, 1\)"):
        accuracy.main(["--methods", "sparseforge[teacher_sample_share=1.5]"])



def test_curves_paired_difference_at_equal_steps(tmp_path):
    import json

    from benchmarks import curves

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"step": s, "kl": 1.0 + s / 100, "loss": 1.0, "lr": 0.1}) + "\n"
                         for s in range(10, 110, 10)))
    b.write_text("".join(json.dumps({"step": s, "kl": 1.0, "loss": 1.0, "lr": 0.2}) + "\n"
                         for s in range(20, 120, 20)))  # logs every 20: steps 20..100 are common
    rows = curves.paired(a, b, [0, 50])
    assert [r["steps"] for r in rows] == ["1-40", "51-100"] and [r["n"] for r in rows] == [2, 3]
    assert rows[0]["kl_a_minus_b"] == 0.3 and rows[1]["kl_a_minus_b"] == 0.8 and rows[1]["loss_a_minus_b"] == 0
    assert (rows[1]["lr_a"], rows[1]["lr_b"]) == (0.1, 0.2)


def test_curves_summarize_quarter_points_and_the_last_tenth(tmp_path):
    import json

    from benchmarks import curves

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": 10 * (i + 1), "loss": 10.0 - i, "ce": 5.0, "kl": float(i)}) + "\n"
                            for i in range(20)))
    rows = curves.summarize(path)
    assert [r["point"] for r in rows] == ["first", "1/4", "1/2", "3/4", "last", "mean of last 2"]
    assert rows[1]["step"] == 60 and rows[-2]["kl"] == 19.0
    assert rows[-1]["kl"] == 18.5 and "ce_real" not in rows[-1]
    assert "steps_per_s" not in rows[1]  # no elapsed_s logged
    path.write_text("".join(json.dumps({"step": 10 * (i + 1), "kl": 1.0, "elapsed_s": 2.0 * (i + 1) + 30 * (i >= 10)})
                            + "\n" for i in range(20)))
    rows = curves.summarize(path)  # 5 steps/s, but 30 s lost between the 1/4 and the 1/2 point
    assert "steps_per_s" not in rows[0] and rows[1]["steps_per_s"] == 5.0 and rows[3]["steps_per_s"] == 5.0
    assert rows[2]["steps_per_s"] == round(50 / 40, 2)


def test_gpu_workers_get_the_remaining_flags_without_methods_out_and_gpus():
    argv = ["--methods", "a,b", "--gpus=2", "--out", "x.json", "--budget-minutes", "10", "--anneal", "lr=1e-3"]
    assert accuracy._without_options(argv, ("--methods", "--out", "--gpus", "--run-stem")) == [
        "--budget-minutes", "10", "--anneal", "lr=1e-3"]


def test_gpus_runs_methods_in_parallel_workers_and_merges_their_rows(tmp_path, monkeypatch, data_dir):
    """Two worker processes (on the CPU here: the parent only counts devices), rows back in the order
    asked, each marked with its worker's device; the scratch files are gone afterwards."""
    import json

    monkeypatch.setattr(accuracy.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "acc.json"
    assert accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", "magnitude,dense,wanda",
                          "--gpus", "2", "--seqlen", "64", "--max-windows", "2", "--calib-samples", "2",
                          "--calib-seqlen", "64", "--train-seqlen", "32", "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["magnitude", "dense", "wanda"]
    gpus = [r["gpu"] for r in rows]  # the third method takes whichever GPU frees first
    assert gpus[:2] == ["0", "1"] and gpus[2] in ("0", "1") and {r["parallel_gpus"] for r in rows} == {2}
    assert [r["pattern"] for r in rows] == ["2:4", "dense", "2:4"] and all(r["eval_windows"] == 2 for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.json", "acc.png"]


def test_isolation_is_on_by_default_only_for_two_trained_methods_on_a_gpu():
    def isolates(*argv: str) -> bool:
        args = accuracy.parse_args(list(argv))
        return accuracy.isolates(args, accuracy.split_methods(args.methods))

    assert isolates("--device", "cuda", "--methods", "sparsegpt+kd,sparseforge[lr=1e-3]")
    assert not isolates("--device", "cuda", "--methods", "dense,magnitude,wanda,sparsegpt,sparseforge")
    assert not isolates("--device", "cpu", "--methods", "sparsegpt+kd,sparseforge")
    assert isolates("--device", "cpu", "--methods", "dense,wanda", "--isolate")
    assert not isolates("--device", "cuda", "--methods", "sparsegpt+kd,sparseforge", "--no-isolate")


def test_isolate_runs_each_method_in_a_fresh_process_one_after_another(tmp_path, monkeypatch, data_dir):
    """Nothing a method leaves behind (allocator, compile caches, globals) reaches the next one's budget."""
    import json

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    out = tmp_path / "acc.json"
    assert accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", "wanda,dense", "--isolate",
                          "--seqlen", "64", "--max-windows", "2", "--calib-samples", "2", "--calib-seqlen", "64",
                          "--train-seqlen", "32", "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["wanda", "dense"]
    assert [(r["gpu"], r["parallel_gpus"]) for r in rows] == [("cpu", 1), ("cpu", 1)]
    assert "partial" not in json.loads(out.read_text())  # written partial after the first, whole at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.json", "acc.png"]


def test_gpus_stops_with_the_failed_workers_log(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match=r"(?s)2 of 2 workers failed.*GPU 0 \(dense\).*unknown model 'tiny-nope'"):
        accuracy.main(["--model", "tiny-nope", "--device", "cpu", "--methods", "dense,magnitude", "--gpus", "2",
                       "--out", str(tmp_path / "acc.json")])
    assert not (tmp_path / "acc.json").exists()  # nothing finished, nothing written


def test_gpus_keeps_the_rows_that_finished_when_a_worker_fails(tmp_path, monkeypatch, data_dir):
    import json

    monkeypatch.setattr(accuracy.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    out = tmp_path / "acc.json"
    # The second worker's method fails on the model (a 3:7 pattern divides none of its layers).
    with pytest.raises(SystemExit, match=r"1 of 2 workers failed.*the 1 finished rows"):
        accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", "dense,magnitude", "--pattern", "3:7",
                       "--gpus", "2", "--seqlen", "64", "--max-windows", "1", "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["partial"] and [r["method"] for r in saved["rows"]] == ["dense"]


def test_gpus_refuses_more_gpus_than_visible(monkeypatch, tmp_path):
    monkeypatch.setattr(accuracy.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="only 1 CUDA device"):
        accuracy.main(["--methods", "dense,magnitude", "--gpus", "2", "--out", str(tmp_path / "a.json")])


def test_a_trained_row_records_its_settings_and_the_curves_end(tmp_path, monkeypatch, data_dir):
    """A budget run through accuracy.py on the CPU (tiny model, 12 s): the bracket settings reach the
    prune, the row says so, and it carries the end of the training curve by data source."""
    import json

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    out = tmp_path / "acc.json"
    spec = "sparseforge[teacher_sample_share=0.3,calib_samples=2,warm_start=wanda]"
    assert accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", spec, "--budget-minutes", "0.2",
                          "--seqlen", "64", "--max-windows", "2", "--calib-samples", "4", "--calib-seqlen", "64",
                          "--train-seqlen", "32", "--batch-size", "4", "--quiet", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert (row["teacher_sample_share"], row["calib_samples"], row["budget_s"]) == (0.3, 2, 12.0)
    assert row["teacher_tokens"] > 0 and row["steps"] > 0
    assert {"train_kl_real_last_tenth", "train_kl_sampled_last_tenth", "train_ce_real_last_tenth",
            "train_teacher_ce_real_last_tenth"} <= set(row)
    run_dir = tmp_path / "runs" / "acc_sparseforge_teacher_sample_share_0.3_calib_samples_2_warm_start_wanda_"
    assert (run_dir / "metrics.jsonl").exists()


def test_graph_numerics_check_flags_a_trained_path_that_is_not_the_model():
    from benchmarks import graph_numerics

    rows = [{"path": "plain model", "kl_to_fp32": 0.0009}, {"path": "captured graph", "kl_to_fp32": 0.00091},
            {"path": "captured graph, position math not pinned", "kl_to_fp32": 0.19}]
    assert graph_numerics._mismatches(rows) == []  # the unpinned path is there to show the bug
    rows.append({"path": "+ masks (SparseForge's graph)", "kl_to_fp32": 0.145})
    assert graph_numerics._mismatches(rows) == ["+ masks (SparseForge's graph): KL 0.145 against the plain model's 0.0009"]


def test_compile_seconds_counts_compilation_since_the_reset():
    import torch

    assert accuracy.compile_seconds(reset=True) == {}
    assert set(accuracy.compile_seconds().values()) == {0.0}
    torch._dynamo.reset()
    torch.compile(lambda x: (x.sin() * 2).sum(), backend="aot_eager")(torch.randn(8))
    seconds = accuracy.compile_seconds()
    assert set(seconds) == set(accuracy.COMPILE_PHASES)
    assert seconds["compile_dynamo_s"] >= seconds["compile_aot_s"] >= 0
    assert torch._dynamo.utils.compilation_time_metrics["_compile.compile_inner"]  # a frame was timed
    frames = accuracy.compile_frames()
    assert frames.startswith("<lambda> (") and " x1 " in frames
    accuracy.compile_seconds(reset=True)
    assert accuracy.compile_frames() == ""


def test_compile_seconds_must_be_read_inside_the_cold_caches():
    """Leaving ``cold_compile_caches`` resets Dynamo, which clears its timings: read after it, every
    phase's compile seconds were 0."""
    import torch

    accuracy.compile_seconds(reset=True)
    with accuracy.cold_compile_caches(True):
        torch.compile(lambda x: (x.cos() * 3).sum(), backend="aot_eager")(torch.randn(8))
        timed = sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))
    assert timed > 0
    assert not torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner")


def test_step_time_runs_end_to_end_with_its_diagnostics(tmp_path, data_dir, monkeypatch):
    """step_time.py's rows, loop pace, host report and profile/trace on a tiny model (its GPU runs cost
    device time: a crash there is found here first)."""
    import gzip
    import json

    from benchmarks import step_time

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))  # its calibration windows
    out = tmp_path / "step_time.json"
    assert step_time.main(["--model", "tiny-llama", "--batch-sizes", "2", "--seqlen", "32", "--repeats", "2",
                           "--hidden-weights", "3", "--compile", "off", "--outline", "off",
                           "--sample-batches", "", "--profile", str(tmp_path / "prof" / "p"), "--trace",
                           "--host-report", str(tmp_path / "host" / "h"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    step = next(r for r in rows if r["bench"] == "train_step")
    for key in ("plain_kd_loop_ms", "anneal_soft_loop_ms", "anneal_final_loop_ms", "soft_over_kd_loop"):
        assert step[key] > 0
    report = (tmp_path / "host" / "h.plain_kd_off_hw3.txt").read_text()
    assert report.startswith("synchronizing calls in 3 steps: 0") and "ncalls" in report
    assert (tmp_path / "host" / "h.anneal_soft_off_hw3.txt").exists()
    with gzip.open(tmp_path / "prof" / "p.plain_kd_off_hw3.trace.json.gz") as f:
        assert json.load(f)["traceEvents"]


def test_sync_call_sites_counts_sync_warnings_only():
    """The host report's sync counter: a sync warning is counted by call site; the debug mode's own
    "prototype feature" notice (which the GPU run counted as a sync once) is not."""
    import warnings

    from benchmarks import step_time

    with step_time.synchronizing_call_sites(debug_mode=False) as sites:
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all ops", stacklevel=1)
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert sum(sites.values()) == 2 and len(sites) == 1
    assert next(iter(sites)).endswith("-> called a synchronizing CUDA operation")


def test_step_time_interleaved_times_each_loop_in_its_phase(tmp_path, data_dir, monkeypatch):
    """--timing interleaved: the peer's plain KD loop, plain KD with the same loss, and SparseForge's
    soft and hard loops, each timed for whole rounds inside its own phase of the schedule."""
    import json

    from benchmarks import step_time
    from sparseforge_compile.anneal import schedule

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    built, phases = [], []
    real_build = step_time.build

    def spy_build(*args, **kwargs):
        model, ann = real_build(*args, **kwargs)
        train_step = ann._train_step

        def recorded():  # the schedule point of every timed step, by loop
            phases.append((ann, schedule(ann.cfg, ann.step, ann.total_steps)))
            return train_step()
        ann._train_step = recorded
        built.append(ann)
        return model, ann

    monkeypatch.setattr(step_time, "build", spy_build)
    out = tmp_path / "st.json"
    assert step_time.main(["--model", "tiny-llama", "--batch-sizes", "2", "--seqlen", "32", "--hidden-weights", "3",
                           "--compile", "off", "--timing", "interleaved", "--rounds", "2", "--sample-batches", "",
                           "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["bench"] == "train_loop" and row["rounds"] == 2
    assert row["soft_over_plain_kd"] == pytest.approx(row["anneal_soft_ms"] / row["plain_kd_ms"], abs=2e-3)
    assert row["soft_over_same_loss"] == pytest.approx(row["anneal_soft_ms"] / row["plain_kd_same_loss_ms"], abs=2e-3)
    peer, same_loss, soft, final = built
    assert not peer.cfg.loss.hidden_weight and same_loss.cfg.loss.hidden_weight == 3 and same_loss.cfg.evidence.fixed_mask
    steps = 1 + (1 + 2) * step_time.INTERLEAVED_STEPS  # the compiling step, a warm-up round, 2 timed rounds
    for ann in built:
        assert sum(a is ann for a, _ in phases) == steps
    assert all(point.soft_phase for a, point in phases if a is soft)
    assert all(point.blend >= 1.0 for a, point in phases if a is final)


def test_host_overhead_times_every_loop_of_a_setting(tmp_path, data_dir, monkeypatch):
    import json

    from benchmarks import host_overhead

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    out = tmp_path / "host.json"
    assert host_overhead.main(["--layers", "2", "--repeats", "2", "--configs", "off/off", "--hidden-weights", "0,3",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"].split()[3] for r in rows] == ["hidden_weight=0", "hidden_weight=3"]
    assert all(r["plain_kd_ms"] > 0 and r["anneal_soft_ms"] > 0 and r["anneal_final_ms"] > 0 for r in rows)


def test_results_record_the_command_commit_and_settings(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    from benchmarks.common import ROOT, write_results

    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "x.py"), "--steps", "3"])
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="benchmarks.x")))
    path = write_results("x", [{"a": 1}], tmp_path / "x.json", settings={"steps": 3, "lr": 0.1})
    payload = json.loads(path.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert payload["commit"].startswith(head) and payload["settings"] == {"steps": 3, "lr": 0.1}
    assert payload["command"] == "python -m benchmarks.x --steps 3" and payload["rows"] == [{"a": 1}]


@pytest.mark.parametrize("script, bench", [("decode_table", "kernel"), ("fp8_table", "fp8"), ("generate", "generate"),
                                           ("e2e", "e2e")])
def test_gpu_benchmarks_run_end_to_end_with_smoke(script, bench, tmp_path):
    """Each GPU benchmark's --smoke on the CPU: tiny shapes, rows in the results schema (speed rows with
    dense_ms, sparse_ms, speedup), written where --out says."""
    import importlib
    import json

    module = importlib.import_module(f"benchmarks.{script}")
    out = tmp_path / f"{script}.json"
    extra = ["--layout", "compact", "--paths", "lower"] if script == "e2e" else []
    module.main(["--smoke", "--out", str(out), *extra])
    payload = json.loads(out.read_text())
    assert {"command", "device", "torch", "date", "rows"} <= set(payload) and "partial" not in payload
    rows = [r for r in payload["rows"] if r["bench"] == bench]
    assert rows and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0 for r in rows)
    if script == "decode_table":
        assert all(r["kernel"].startswith("decode") and r["memory_ratio"] == pytest.approx(0.53125, abs=1e-4) for r in rows)
        assert all(r["rel_err_vs_fp32"] < 1e-5 for r in rows)
    if script == "fp8_table":
        assert all(r["kernel"] == "fp8 emulated" and 0 < r["rel_err_vs_bf16"] < 0.1 for r in rows)
    if script == "generate":
        assert {r["layout"] for r in rows} == {"cusparselt", "compact"} and all(r["tokens_equal_dense"] for r in rows)
        assert {r["phase"] for r in rows} == {"prefill", "decode"}
    if script == "e2e":
        assert all(r["memory_ratio"] == pytest.approx(0.53125, abs=1e-4) and r["layout"] == "compact" for r in rows)
        assert {r["phase"] for r in rows} == {"prefill", "decode"} and all(r["logits_rel_err"] < 1e-5 for r in rows)


def test_smoke_writes_to_a_temporary_file_without_out():
    from benchmarks.common import RESULTS_DIR, results_path

    assert results_path("x", None, smoke=True).parent != RESULTS_DIR
    assert results_path("x", None, smoke=False) == RESULTS_DIR / "x.json"


def test_accuracy_rows_carry_lm_eval_metrics_for_every_method(tmp_path, monkeypatch):
    """dense and a one-shot peer on a synthetic data folder: each row holds lm-eval's acc / acc_norm."""
    import json

    pytest.importorskip("lm_eval")
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n\n" + "some words of text . " * 200)
    (tmp_path / "tasks" / "arc").mkdir(parents=True)
    docs = [{"id": str(i), "question": f"q{i}?", "choices": {"text": ["a", "bb"], "label": ["A", "B"]},
             "answerKey": "AB"[i % 2]} for i in range(3)]
    (tmp_path / "tasks/arc/ARC-Easy-validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("SPARSEFORGE_DATA", str(tmp_path))
    out = tmp_path / "acc.json"
    assert accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", "dense,magnitude", "--seqlen", "64",
                          "--max-windows", "2", "--tasks", "arc_easy", "--quiet", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["method"] for r in payload["rows"]] == ["dense", "magnitude"]
    assert all({"arc_easy_acc", "arc_easy_acc_norm"} <= set(r) for r in payload["rows"])
    assert payload["settings"]["tasks"] == "arc_easy"


def test_nproc_trains_each_method_data_parallel_and_rank_0_writes(tmp_path, monkeypatch, data_dir):
    """Under torchrun (2 gloo processes): a trained, a one-shot and the dense row, in order, each row once."""
    import json

    monkeypatch.setenv("SPARSEFORGE_DATA", str(data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "acc.json"
    assert accuracy.main(["--model", "tiny-llama", "--device", "cpu", "--methods", "sparsegpt+kd,wanda,dense",
                          "--nproc", "2", "--anneal", "steps=2", "--batch-size", "2", "--train-seqlen", "32",
                          "--seqlen", "64", "--max-windows", "2", "--calib-samples", "2", "--calib-seqlen", "64",
                          "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["nproc"]) for r in rows] == [("sparsegpt+kd", 2), ("wanda", 2), ("dense", 2)]
    assert rows[0]["steps"] == 2 and rows[0]["train_tokens"] == 2 * 2 * 2 * 32  # steps x ranks x batch x seqlen
    with pytest.raises(SystemExit, match="give one of them"):
        accuracy.main(["--nproc", "2", "--gpus", "2", "--out", str(tmp_path / "x.json")])
