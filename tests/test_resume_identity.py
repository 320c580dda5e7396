"""--resume trusts nothing: a checkpoint of another model, architecture, setting or data, or a damaged
one, is refused in one line before any weight changes; a finished run leaves no training state behind."""

import shutil

import pytest
import torch

from sparseforge_compile.anneal import AnnealConfig, Annealer
from sparseforge_compile.errors import AnnealError
from sparseforge_compile.models import load_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify

TEXT = "The quick brown fox jumps over the lazy dog. " * 60  # synthetic training text: runs without a data folder


def config(text_file, **anneal) -> SparsifyConfig:
    base = dict(steps=6, batch_size=2, seqlen=32, log_every=2, lr=3e-3, teacher_data_ratio=0.0,
                warm_start="magnitude", checkpoint_every=2, compile="off", hidden_weight=0.0)
    base.update(anneal)
    return SparsifyConfig(method="sparseforge", kernel_constraints=None, budget_s=None, calib_data=(str(text_file),),
                          anneal=AnnealConfig.from_flat(base))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run stopped after step 3 (its checkpoint at step 2 kept), and the text it trained on."""
    root = tmp_path_factory.mktemp("crashed")
    text = root / "text.txt"
    text.write_text(TEXT)
    out = root / "out"
    original = Annealer.train_step

    def train_step(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    loaded = load_model("tiny-llama")
    Annealer.train_step = train_step
    try:
        with pytest.raises(KeyboardInterrupt):
            sparsify(loaded.model, config(text), tokenizer=loaded.tokenizer, out_dir=out, progress=False)
    finally:
        Annealer.train_step = original
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "checkpoint" / "run.json").is_file()
    return text, out


def _copy(crashed, tmp_path):
    text, out = crashed
    shutil.copytree(out, tmp_path / "out")
    return text, tmp_path / "out"


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


MISMATCHES = [
    ("another model of the same shapes", "tiny-llama", 1, {}, None, r"initial weights [0-9a-f]+ -> [0-9a-f]+"),
    ("another architecture", "tiny-qwen2", 0, {}, None, r"architecture LlamaForCausalLM -> Qwen2ForCausalLM"),
    ("another setting", "tiny-llama", 0, {"lr": 1e-3}, None, r"setting anneal\.runtime\.lr 0\.003 -> 0\.001"),
    ("other training text", "tiny-llama", 0, {}, "other text. " * 80, r"data sources"),
]


@pytest.mark.parametrize("what, name, seed, settings, other_text, message", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_resume_refuses_another_run(crashed, tmp_path, what, name, seed, settings, other_text, message):
    text, out = _copy(crashed, tmp_path)
    if other_text is not None:
        text = tmp_path / "other.txt"
        text.write_text(other_text)
    loaded = load_model(name, seed=seed)
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    files = _snapshot(out)
    with pytest.raises(AnnealError, match=r"--resume: .*checkpoint belongs to another run \(" + message) as info:
        sparsify(loaded.model, config(text, **settings), tokenizer=loaded.tokenizer, out_dir=out, resume=True,
                 progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert _snapshot(out) == files


DAMAGES = ["truncated", "garbage", "record missing", "record garbled"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_refuses_a_damaged_checkpoint(crashed, tmp_path, damage):
    text, out = _copy(crashed, tmp_path)
    state, record = out / "checkpoint" / "state.pt", out / "checkpoint" / "run.json"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "garbage":
        state.write_bytes(b"not a checkpoint")
    elif damage == "record missing":
        record.unlink()
    else:
        record.write_text("{\"model\": ")
    loaded = load_model("tiny-llama")
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    expected = r"is missing: .*run again without --resume" if damage == "record missing" else (
        r"is damaged or unreadable .*run again without --resume")
    with pytest.raises(AnnealError, match=expected) as info:
        sparsify(loaded.model, config(text), tokenizer=loaded.tokenizer, out_dir=out, resume=True, progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_resume_drops_its_training_state_unless_kept(crashed, tmp_path, keep):
    text, out = _copy(crashed, tmp_path)
    loaded = load_model("tiny-llama")
    result = sparsify(loaded.model, config(text, keep_training_state=keep), tokenizer=loaded.tokenizer, out_dir=out,
                      resume=True, progress=False)
    assert result.anneal.steps == 6
    assert (out / "checkpoint" / "state.pt").is_file() == keep
    assert (out / "checkpoint" / "run.json").is_file() == keep
    assert (out / "metrics.jsonl").is_file()  # the curves stay
    if keep:  # a kept state is a finished run's: a fresh run may start over in the folder
        again = load_model("tiny-llama")
        sparsify(again.model, config(text, steps=2), tokenizer=again.tokenizer, out_dir=out, progress=False)
        assert not (out / "checkpoint").exists()


def test_the_crashed_run_kept_what_resume_needs(crashed):
    _, out = crashed
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2


def test_resume_without_a_checkpoint(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    loaded = load_model("tiny-llama")
    with pytest.raises(AnnealError, match=r"no checkpoint at .*state\.pt: --resume needs"):
        sparsify(loaded.model, config(text), tokenizer=loaded.tokenizer, out_dir=tmp_path / "out", resume=True,
                 progress=False)


def test_a_fresh_run_refuses_to_overwrite_an_unfinished_checkpoint(crashed, tmp_path):
    text, out = _copy(crashed, tmp_path)
    files = _snapshot(out)
    loaded = load_model("tiny-llama")
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(AnnealError, match=r"state\.pt holds an unfinished run's checkpoint: pass --resume"):
        sparsify(loaded.model, config(text), tokenizer=loaded.tokenizer, out_dir=out, progress=False)
    assert _snapshot(out) == files
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
