"""docs/reliability.md lists every bad input and fault the tests inject, with its outcome: the table is
rendered from the parametrized cases, and this test fails when a case is in the tests but not in the
table or the reverse. ``python tests/test_reliability_table.py`` rewrites the table."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- cases: begin (generated) -->", "<!-- cases: end -->"

# Fault-injection tests of the checkpoint format and its crash-safe save, with their outcome.
CHECKPOINT_FAULTS = {
    "test_checkpoint_commit.py::test_an_uninterrupted_save_counts_its_steps_and_commits":
        "the save commits with one atomic swap of the index",
    "test_checkpoint_commit.py::test_a_save_interrupted_at_every_step_loses_nothing":
        "a crash or an I/O error at any step leaves the old checkpoint loadable; nothing lost",
    "test_checkpoint_commit.py::test_a_save_without_overwrite_refuses_a_checkpoint":
        "one-line error (pass --overwrite); the old checkpoint untouched",
    "test_checkpoint_commit.py::test_a_leftover_staging_folder_of_someone_else_is_not_deleted":
        "a staging folder not ours is kept",
    "test_checkpoint_commit.py::test_a_crafted_index_path_is_a_one_line_error":
        "one-line error naming the index field; no file outside the folder read or written",
    "test_checkpoint_commit.py::test_the_checksum_covers_the_config_that_is_loaded":
        "an edited config.json is a one-line checksum error",
    "test_checkpoint_commit.py::test_a_changed_safetensors_header_is_caught":
        "an edited safetensors header is a one-line error",
    "test_checkpoint_commit.py::test_check_output_dir_refuses_what_a_save_could_not_or_must_not_write":
        "a file, an unwritable folder or another model's folder is refused before any work",
    "test_checkpoint_commit.py::test_cli_prune_checks_the_output_folder_before_any_work":
        "prune exits 2 with one line before loading the model",
    "test_checkpoint.py::test_compress_refuses_non_nm_weight": "a weight that is not N:M is refused",
    "test_checkpoint.py::test_flipped_byte_is_an_error_naming_the_tensor": "one-line error naming the tensor",
    "test_checkpoint.py::test_truncated_file_is_an_error_naming_a_cut_tensor": "one-line error naming a cut tensor",
    "test_checkpoint.py::test_missing_index_is_a_clear_error": "one-line error: not a sparse checkpoint",
    "test_checkpoint.py::test_altered_index_is_a_clear_error": "one-line error naming the altered entry",
    "test_checkpoint.py::test_non_nm_weight_is_refused_and_nothing_is_written": "refused; nothing written",
    "test_checkpoint.py::test_no_recorded_layers_needs_layers_or_pattern": "one-line error: pass layers or a pattern",
    "test_checkpoint.py::test_tied_pruned_weight_is_refused_for_compact": "refused for the compact format",
    "test_checkpoint.py::test_failed_save_keeps_the_old_checkpoint": "the old checkpoint stays loadable",
    "test_checkpoint.py::test_refuses_to_overwrite_another_model": "one-line error; the other model's files kept",
    "test_checkpoint.py::test_cli_generate_with_a_layout_and_refuses_it_for_dense_models":
        "--layout on a dense model is one line",
}
# The resume tests that are not parametrized by a list of cases, with what they check.
RESUME_TESTS = {
    "test_resume_without_a_checkpoint": ("resume without a checkpoint", "`--resume`",
                                         "one line: no checkpoint at …/state.pt"),
    "test_a_fresh_run_refuses_to_overwrite_an_unfinished_checkpoint": (
        "a fresh run into a folder with an unfinished checkpoint", "prune without `--resume`",
        "one line: pass --resume or delete the checkpoint; nothing overwritten, weights unchanged"),
    "test_the_crashed_run_kept_what_resume_needs": ("a crashed run", "interrupted training",
                                                    "keeps state.pt and run.json for --resume"),
    "test_a_finished_resume_drops_its_training_state_unless_kept": (
        "a finished run", "training to the end", "drops its optimizer state unless --keep-training-state"),
}
PARAMETRIZED_RESUME_TESTS = {"test_resume_refuses_another_run", "test_resume_refuses_a_damaged_checkpoint"}
FAULT_WORDS = ("error", "refus", "interrupt", "fail", "truncat", "flipped", "missing", "altered", "changed",
               "crafted", "leftover", "checksum", "needs")


def _readable(pattern: str) -> str:
    """An expected-message regex as text: what the one line says."""
    text = re.sub(r"\[0-9a-f\]\+", "HASH", re.sub(r"\\d\+", "N", pattern)).replace(".*", " … ").replace("\\", "")
    return " ".join(text.split()).replace("|", " or ")


def _cases() -> list[tuple[str, str, str, str]]:
    """(section, case, input, outcome) for every case the tests run."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_bad_inputs as bad
        import test_resume_identity as resume
    finally:
        sys.path.pop(0)
    rows = [("CLI", case, f"`sparseforge-compile {command}`", f"exit 2, one line: {_readable(message)}")
            for case, command, message in bad.CLI_CASES]
    rows += [("API", case, "Python API", f"raises, one line: {_readable(message)}") for case, _, message in bad.API_CASES]
    rows += [("resume", f"resume from {what}", "`--resume` / `sparsify(resume=True)`",
              f"one line: belongs to another run ({_readable(message)}); weights and folder unchanged")
             for what, *_, message in resume.MISMATCHES]
    rows += [("resume", f"resume from a checkpoint: {damage}", "`--resume`",
              "one line: damaged or missing, run again without --resume; weights unchanged")
             for damage in resume.DAMAGES]
    rows += [("resume", case, given, outcome) for case, given, outcome in RESUME_TESTS.values()]
    rows += [("checkpoint", name.split("::")[1].removeprefix("test_").replace("_", " "), f"`tests/{name}`", outcome)
             for name, outcome in CHECKPOINT_FAULTS.items()]
    return rows


def render() -> str:
    lines = [BEGIN, "", "| area | case | input | outcome |", "|---|---|---|---|"]
    lines += [f"| {a} | {c} | {i} | {o} |" for a, c, i, o in _cases()]
    return "\n".join([*lines, "", END])


def _table_in_doc() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text[text.index(BEGIN): text.index(END) + len(END)]


def test_every_case_is_in_the_table_and_every_row_is_a_case():
    assert _table_in_doc() == render(), "docs/reliability.md is out of step: run python tests/test_reliability_table.py"


def test_every_resume_test_is_in_the_table():
    tree = ast.parse((ROOT / "tests" / "test_resume_identity.py").read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert names == set(RESUME_TESTS) | PARAMETRIZED_RESUME_TESTS


def test_the_checkpoint_fault_tests_are_all_listed():
    listed = set(CHECKPOINT_FAULTS)
    found = set()
    for file in ("test_checkpoint_commit.py", "test_checkpoint.py"):
        tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        assert {k.split("::")[1] for k in listed if k.startswith(file)} <= names, f"a listed {file} test is gone"
        every = file == "test_checkpoint_commit.py"  # the crash-safe save's tests are all fault injection
        found |= {f"{file}::{n}" for n in names if every or any(w in n for w in FAULT_WORDS)}
    assert found == listed, f"not in the table: {sorted(found - listed)}; not a fault test: {sorted(listed - found)}"


if __name__ == "__main__":
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(text[: text.index(BEGIN)] + render() + text[text.index(END) + len(END):], encoding="utf-8")
