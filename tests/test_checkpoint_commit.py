"""Checkpoints never lose data: a save interrupted at any step of its commit (a crash, or an I/O
error) leaves a folder that loads as the old checkpoint or the new one, bit for bit; a user's file
is never touched; the next save recovers. The index is not trusted: a file name in it that is not a
plain name in the folder is an error. The output folder is checked before any work."""

import contextlib
import errno
import json
import os
import shutil

import pytest
import torch
from test_checkpoint import bits, harden

from sparseforge_compile import checkpoint as ck
from sparseforge_compile.checkpoint import store
from sparseforge_compile.errors import CheckpointError
from sparseforge_compile.models import ByteTokenizer, tiny_model

FILE_OPS = ("replace", "link", "unlink", "write", "fsync", "rmdir", "mkdir", "open")
USER_FILE = "README.md"


class Crash(BaseException):
    """The process died at this step: nothing after it runs, no cleanup either."""


class Faults:
    """Counts the file operations a save makes; with ``fail_at`` the k-th one fails: ``crash`` makes it
    and every later one raise Crash, ``eio`` makes it alone raise an I/O error."""

    def __init__(self, monkeypatch, fail_at: int | None = None, mode: str = "crash") -> None:
        self.count, self.fail_at, self.mode, self.crashed = 0, fail_at, mode, False
        for name in FILE_OPS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        monkeypatch.setattr(shutil, "copyfile", self._wrap(shutil.copyfile))

    def _wrap(self, fn):
        def op(*args, **kwargs):
            if self.crashed:
                raise Crash
            step, self.count = self.count, self.count + 1
            if step == self.fail_at:
                if self.mode == "crash":
                    self.crashed = True
                    raise Crash
                raise OSError(errno.EIO, "injected I/O error")
            return fn(*args, **kwargs)
        return op


@pytest.fixture(scope="module")
def models():
    old = harden(tiny_model("tiny-llama"))
    new = harden(tiny_model("tiny-llama"))
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(2.0)  # every tensor differs from the old checkpoint's, zeros stay zeros
    return old, new


@pytest.fixture(scope="module")
def pristine(models, tmp_path_factory):
    """A folder holding the old checkpoint and a user's file."""
    folder = tmp_path_factory.mktemp("pristine") / "m"
    ck.save(models[0], folder, tokenizer=ByteTokenizer())
    (folder / USER_FILE).write_text("my notes")
    return folder


def which(folder, models) -> str:
    """'old' or 'new': what every format of the folder loads as, bit for bit (a mix fails)."""
    found = set()
    for fmt in ck.read_manifest(folder)["formats"]:
        got = ck.load(folder, format=fmt, lower=False).model.state_dict()
        for label, model in zip(("old", "new"), models):
            ref = model.state_dict()
            if ref.keys() == got.keys() and all(torch.equal(bits(ref[k]), bits(got[k])) for k in ref):
                found.add(label)
                break
        else:
            raise AssertionError(f"{fmt}: the folder loads as neither the old nor the new checkpoint")
    assert len(found) == 1, found
    return found.pop()


def assert_clean(folder) -> None:
    manifest = ck.read_manifest(folder)
    assert {p.name for p in folder.iterdir()} == {*manifest["files"], USER_FILE}
    assert "stored" not in manifest and "leftovers" not in manifest


def test_an_uninterrupted_save_counts_its_steps_and_commits(models, pristine, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    with monkeypatch.context() as patch:
        faults = Faults(patch)
        ck.save(models[1], folder, tokenizer=ByteTokenizer(), overwrite=True)
    assert faults.count > 10
    assert which(folder, models) == "new"
    assert_clean(folder)


@pytest.mark.parametrize("mode", ["crash", "eio"])
def test_a_save_interrupted_at_every_step_loses_nothing(models, pristine, tmp_path, monkeypatch, mode):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    with monkeypatch.context() as patch:
        faults = Faults(patch)
        ck.save(models[1], folder, tokenizer=ByteTokenizer(), overwrite=True)
    steps = faults.count
    seen = set()
    for k in range(steps):
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        with monkeypatch.context() as patch:
            Faults(patch, fail_at=k, mode=mode)
            with contextlib.suppress(Crash, OSError):
                ck.save(models[1], folder, tokenizer=ByteTokenizer(), overwrite=True)
        state = which(folder, models)
        seen.add(state)
        assert (folder / USER_FILE).read_text() == "my notes", k
        ck.save(models[1], folder, tokenizer=ByteTokenizer(), overwrite=True)  # the next save recovers
        assert which(folder, models) == "new", k
        assert_clean(folder)
    assert seen == {"old", "new"}  # the commit point lies inside the steps


def test_a_save_without_overwrite_refuses_a_checkpoint(models, pristine, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    with pytest.raises(CheckpointError, match=r"m already holds a sparseforge checkpoint: pass --overwrite"):
        ck.save(models[1], folder)
    assert which(folder, models) == "old"


def test_a_leftover_staging_folder_of_someone_else_is_not_deleted(models, tmp_path):
    folder = tmp_path / "m"
    (folder / store.STAGING_NAME).mkdir(parents=True)
    (folder / store.STAGING_NAME / "theirs.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="was not written by sparseforge"):
        ck.save(models[0], folder)
    assert (folder / store.STAGING_NAME / "theirs.txt").read_text() == "keep"


# ------------------------------------------------------------------------------ crafted index

PATH_FIELDS = {
    "files": lambda m, bad: m["files"].append(bad),
    "leftovers": lambda m, bad: m.__setitem__("leftovers", [bad]),
    "stored key": lambda m, bad: m.__setitem__("stored", {bad: "x"}),
    "stored value": lambda m, bad: m.__setitem__("stored", {ck.COMPACT_NAME: bad}),
    "file_sha256": lambda m, bad: m["file_sha256"].__setitem__(bad, "0" * 64),
    "formats.hf.files": lambda m, bad: m["formats"]["hf"]["files"].append(bad),
    "formats.hf.tensors.file": lambda m, bad: m["formats"]["hf"]["tensors"]["model.norm.weight"].__setitem__(
        "file", bad),
    "formats.compact.file": lambda m, bad: m["formats"]["compact"].__setitem__("file", bad),
}
BAD_NAMES = ["../victim", "/etc/passwd", "sub/file", "..", "", "a\\b", 7]
KEY_FIELDS = ("stored key", "file_sha256")  # JSON keys are strings: 7 comes back as "7", a plain name


@pytest.mark.parametrize(("field", "bad"), [(f, b) for f in PATH_FIELDS for b in BAD_NAMES
                                            if isinstance(b, str) or f not in KEY_FIELDS])
def test_a_crafted_index_path_is_a_one_line_error(models, pristine, tmp_path, field, bad):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    index = folder / ck.MANIFEST_NAME
    manifest = json.loads(index.read_text())
    PATH_FIELDS[field](manifest, bad)
    index.write_text(json.dumps(manifest))
    for action in (lambda: ck.load(folder, lower=False), lambda: ck.save(models[1], folder, overwrite=True)):
        with pytest.raises(CheckpointError, match=r"names .*, not a plain file name in the folder") as err:
            action()
        assert "\n" not in str(err.value)
    assert victim.read_text() == "not yours"


def test_the_checksum_covers_the_config_that_is_loaded(pristine, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json fails its sha256 check"):
        ck.load(folder, lower=False)


def test_a_changed_safetensors_header_is_caught(pristine, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    path = folder / ck.COMPACT_NAME
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8: 8 + header_len].replace(b'"format":"pt"', b'"format":"XX"')
    assert header != raw[8: 8 + header_len]
    path.write_bytes(raw[:8] + header + raw[8 + header_len:])
    with pytest.raises(CheckpointError, match="header was altered"):
        ck.load(folder, lower=False)


# ------------------------------------------------------------------------------ the output folder

def test_check_output_dir_refuses_what_a_save_could_not_or_must_not_write(models, pristine, tmp_path,
                                                                           monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file exists and is not a folder"):
        ck.check_output_dir(tmp_path / "file")
    models[0].save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match=r"refusing to overwrite .*dense/(config\.json|model\.safetensors)"):
        ck.check_output_dir(tmp_path / "dense", overwrite=True)
    with pytest.raises(CheckpointError, match="pass --overwrite"):
        ck.check_output_dir(pristine)
    assert ck.check_output_dir(pristine, overwrite=True) == pristine
    assert ck.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    monkeypatch.setattr(store.os, "access", lambda path, mode: False)
    with pytest.raises(CheckpointError, match="is not writable"):
        ck.check_output_dir(tmp_path / "new")


def test_cli_prune_checks_the_output_folder_before_any_work(pristine, tmp_path, capsys):
    from sparseforge_compile.cli import main

    # an unknown model would fail at loading: the folder is refused first
    for out in (pristine, tmp_path / "file"):
        (tmp_path / "file").write_text("x")
        code = main(["prune", "--model", "no-such-model", "--method", "magnitude", "--out", str(out),
                     "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert ("pass --overwrite" if out == pristine else "is not a folder") in err[0]
