"""Every bad input of the CLI and the Python API is one line naming the file, flag or value and the
fix: the CLI exits 2 and prints that line (no traceback), the API raises a SparseForgeError or a
ValueError; nothing in the output folder is written and the model's weights are unchanged.

The cases are listed in docs/reliability.md (tests/test_reliability_table.py keeps the two in step).
Every input is synthetic (tiny models, a small data folder): the cases run without the real data.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from sparseforge_compile.cli import main
from sparseforge_compile.errors import SparseForgeError
from sparseforge_compile.models import load_model, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 200

# (case id, command line, the message expected on its one line); {fx}: the inputs folder, {out}: an
# output path that must stay as it was.
CLI_CASES = [
    ("model folder with a config but no weights", "eval --model {fx}/noweights",
     r"noweights: its weights cannot be loaded .*model\.safetensors"),
    ("model folder with truncated weights", "eval --model {fx}/truncated",
     r"truncated: its weights cannot be loaded .*complete model\.safetensors"),
    ("truncated GGUF file", "eval --model {fx}/bad.gguf", r"bad\.gguf: transformers cannot load this GGUF"),
    ("model path that does not exist", "eval --model {fx}/nothere", r"nothere: no such file or folder"),
    ("unknown model name", "eval --model nosuchmodel", r"unknown model 'nosuchmodel'"),
    ("model folder without a tokenizer (eval)", "eval --model {fx}/notok", r"notok ships no tokenizer"),
    ("eval --json pointing at a folder", "eval --model tiny-llama --json {fx}", r"--json .* is a folder"),
    ("eval --json under a file", "eval --model tiny-llama --json {fx}/afile/r.json", r"afile is a file, not a folder"),
    ("eval --json pointing at a device", "eval --model tiny-llama --json /dev/null", r"--json /dev/null is not a regular file"),
    ("eval --batch-size 0", "eval --model tiny-llama --batch-size 0", r"--batch-size 0: must be >= 1"),
    ("eval --max-windows 0", "eval --model tiny-llama --max-windows 0", r"--max-windows 0: must be >= 1"),
    ("eval --max-windows negative", "eval --model tiny-llama --max-windows -2", r"--max-windows -2: must be >= 1"),
    ("eval --max-windows more than there are", "eval --model tiny-llama --seqlen 64 --max-windows 100000",
     r"--max-windows 100000: the text has \d+ windows: give 1 to \d+"),
    ("eval --seqlen beyond the model's positions", "eval --model tiny-llama --seqlen 99999",
     r"windows of 99999 tokens exceed LlamaForCausalLM's 2048 positions"),
    ("eval --seqlen 1", "eval --model tiny-llama --seqlen 1", r"seqlen 1 is too short"),
    ("eval --tasks naming no task", "eval --model tiny-llama --tasks ,", r"--tasks names no task"),
    ("eval --limit 0", "eval --model tiny-llama --tasks piqa --limit 0", r"--limit 0: must be >= 1"),
    ("eval of an unknown lm-eval task", "eval --model tiny-llama --tasks nosuchtask", r"unknown lm-eval task 'nosuchtask'"),
    ("prune --tasks naming an unknown task (refused before the prune)",
     "prune --model tiny-llama --method magnitude --tasks nosuchtask --out {out}", r"unknown lm-eval task 'nosuchtask'"),
    ("eval with a missing data folder", "eval --model tiny-llama --data-dir {fx}/nodata",
     r"data directory .*nodata does not exist"),
    ("eval of a masked LM", "eval --model tiny-bert", r"tiny-bert: .*next-token perplexity does not apply"),
    ("unknown --device", "eval --model tiny-llama --device tpu", r"--device 'tpu' is not a device"),
    ("generate with an empty prompt", "generate --model tiny-llama --prompt ''", r"--prompt is empty"),
    ("generate with a blank prompt", "generate --model tiny-llama --prompt '   '", r"--prompt is empty"),
    ("generate --max-new-tokens 0", "generate --model tiny-llama --prompt hi --max-new-tokens 0",
     r"--max-new-tokens 0: must be >= 1"),
    ("generate past the model's positions", "generate --model tiny-gpt2 --prompt hi --max-new-tokens 5000",
     r"the prompt's 2 tokens \+ --max-new-tokens 5000 exceed GPT2LMHeadModel's 2048 positions: lower "
     r"--max-new-tokens to 2046"),
    ("generate --chat without a chat template", "generate --model tiny-llama --prompt hi --chat",
     r"has no chat template: drop --chat"),
    ("generate --layout on a dense model", "generate --model tiny-llama --prompt hi --layout compact",
     r"--layout compact applies to sparse checkpoints"),
    ("generate with a masked LM", "generate --model tiny-bert --prompt hi", r"does not generate text"),
    ("generate from a folder without a tokenizer", "generate --model {fx}/notok --prompt hi",
     r"notok ships no tokenizer"),
    ("prune --seqlen beyond the model's positions",
     "prune --model tiny-llama --method sparseforge --steps 2 --seqlen 4096 --out {out}",
     r"--seqlen 4096 exceeds LlamaForCausalLM's 2048 positions"),
    ("prune --calib-seqlen beyond the model's positions",
     "prune --model tiny-gpt2 --method wanda --calib-seqlen 4096 --out {out}",
     r"--calib-seqlen 4096 exceeds GPT2LMHeadModel's 2048 positions"),
    ("prune from a folder without a tokenizer", "prune --model {fx}/notok --method wanda --out {out}",
     r"notok ships no tokenizer: --method wanda needs one"),
    ("calibration line without its text field", "prune --model tiny-llama --method wanda --calib-data {fx}/notext.jsonl "
     "--out {out}", r"notext\.jsonl:2: no 'text' text field in this line"),
    ("malformed JSON calibration line", "prune --model tiny-llama --method wanda --calib-data {fx}/bad.jsonl --out {out}",
     r"bad\.jsonl:1: not a JSON line"),
    ("non-UTF-8 calibration text", "prune --model tiny-llama --method wanda --calib-data {fx}/latin.txt --out {out}",
     r"latin\.txt: not UTF-8 text"),
    ("calibration file that does not exist", "prune --model tiny-llama --method wanda --calib-data {fx}/none.txt "
     "--out {out}", r"none\.txt is not a file"),
    ("empty calibration file", "prune --model tiny-llama --method wanda --calib-data {fx}/empty.txt --out {out}",
     r"empty\.txt: holds no documents"),
    ("prune --out pointing at a file", "prune --model tiny-llama --method magnitude --out {fx}/afile",
     r"afile exists and is not a folder"),
    ("pattern 4:4 prunes nothing", "prune --model tiny-llama --method magnitude --pattern 4:4 --out {out}",
     r"pattern 4:4 keeps every weight"),
    ("pattern 0:4", "prune --model tiny-llama --method magnitude --pattern 0:4 --out {out}",
     r"invalid N:M pattern 0:4"),
    ("pattern that is not N:M", "prune --model tiny-llama --method magnitude --pattern abc --out {out}",
     r"cannot parse sparsity pattern 'abc'"),
    ("pattern M that divides no layer", "prune --model tiny-llama --method magnitude --pattern 2:3 --out {out}",
     r"no layer is eligible for 2:3 sparsity: .*not divisible by M=3"),
    ("sparsity 0 prunes nothing", "prune --model tiny-llama --method magnitude --pattern none --sparsity 0 --out {out}",
     r"sparsity 0\.0 prunes nothing"),
    ("sparsity given with an N:M pattern", "prune --model tiny-llama --method magnitude --sparsity 0.5 --out {out}",
     r"sparsity 0\.5 applies to unstructured pruning, not to pattern 2:4: add --pattern none"),
    ("sparsity above 1", "prune --model tiny-llama --method magnitude --pattern none --sparsity 1.5 --out {out}",
     r"sparsity 1\.5 is not a ratio below 1"),
    ("unstructured sparsity with a trained method",
     "prune --model tiny-llama --method sparseforge --pattern none --sparsity 0.5 --steps 2 --out {out}",
     r"unstructured pruning \(no pattern\) needs --sparsity and a one-shot method"),
    ("prune --batch-size 0", "prune --model tiny-llama --method magnitude --batch-size 0 --out {out}",
     r"batch_size must be >= 1 or auto, got 0"),
    ("prune --calib-samples 0", "prune --model tiny-llama --method magnitude --calib-samples 0 --out {out}",
     r"calibration needs at least one window"),
    ("prune --seqlen 1", "prune --model tiny-llama --method sparseforge --steps 2 --seqlen 1 --out {out}",
     r"seqlen must be >= 2 \(a next-token loss needs two tokens\), got 1"),
    ("prune --steps 0", "prune --model tiny-llama --method sparseforge --steps 0 --out {out}", r"steps must be >= 1"),
    ("prune --lr negative", "prune --model tiny-llama --method sparseforge --steps 2 --lr -1 --out {out}",
     r"lr must be > 0, got -1\.0"),
    ("prune --budget-minutes 0", "prune --model tiny-llama --method magnitude --budget-minutes 0 --out {out}",
     r"budget must be positive"),
    ("trained method without steps or budget", "prune --model tiny-llama --method sparseforge --out {out}",
     r"--method sparseforge trains: give --budget-minutes or --steps"),
    ("--resume with a one-shot method", "prune --model tiny-llama --method magnitude --resume --out {out}",
     r"resume applies to the trained methods .* drop --resume"),
    ("--resume without a checkpoint", "prune --model tiny-llama --method sparseforge --steps 2 --resume "
     "--calib-data {fx}/text.txt --warm-start magnitude --out {out}", r"no checkpoint at .*state\.pt"),
    ("prune --eval-windows below -1", "prune --model tiny-llama --method magnitude --eval-windows -5 --out {out}",
     r"--eval-windows -5: give 0 \(none\), -1 \(all\) or a count"),
    ("prune --eval-windows more than there are",
     "prune --model tiny-llama --method magnitude --eval-windows 100000 --out {out}",
     r"--eval-windows 100000: the text has \d+ windows"),
    ("malformed recipe TOML", "prune --model tiny-llama --recipe {fx}/bad.toml --out {out}", r"bad\.toml: not valid TOML"),
    ("recipe with an unknown key", "prune --model tiny-llama --recipe {fx}/unknown.toml --out {out}",
     r"unknown\.toml: unknown key lerning_rate"),
    ("recipe file that does not exist", "prune --model tiny-llama --recipe {fx}/none.toml --out {out}",
     r"none\.toml: no such recipe file"),
    ("--exclude matching every layer", "prune --model tiny-llama --method magnitude --exclude '*' --out {out}",
     r"no layer is eligible for 2:4 sparsity: .*excluded by pattern"),
    ("--device cuda without CUDA", "prune --model tiny-llama --method magnitude --device cuda --out {out}",
     r"CUDA is not available here"),
    ("recipe --out pointing at a folder", "recipe --out {fx}", r"--out .* is a folder"),
    ("recipe --out under a file", "recipe --out {fx}/afile/r.toml", r"afile is a file, not a folder"),
    ("report --json pointing at a folder", "report --model tiny-llama --json {fx}", r"--json .* is a folder"),
    ("report --pattern 5:4", "report --model tiny-llama --pattern 5:4", r"invalid N:M pattern 5:4"),
    ("report --graph with an unknown suffix", "report --model tiny-llama --graph {fx}/g.xyz",
     r"use a \.dot, \.svg or \.png name"),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The bad inputs, and a small synthetic data folder (WikiText-2 and C4 in their layout)."""
    root = tmp_path_factory.mktemp("inputs")
    model = tiny_model("tiny-llama")
    model.config.save_pretrained(root / "noweights")
    model.save_pretrained(root / "notok")
    model.save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    (root / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (root / "bad.jsonl").write_text('{"text": "unclosed"\n')
    (root / "latin.txt").write_bytes(b"caf\xe9 " * 100)
    (root / "empty.txt").write_text("  \n")
    (root / "text.txt").write_text(TEXT)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "bad.toml").write_text("[runtime\nlr =\n")
    (root / "unknown.toml").write_text("lerning_rate = 3\n")
    data = root / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(TEXT * 3)
    (data / "c4").mkdir()
    (data / "c4" / "c4_en_train_head1000.jsonl").write_text(
        "".join(json.dumps({"text": TEXT}) + "\n" for _ in range(4)))
    return root


def _tree(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case, command, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(fx, tmp_path, capsys, monkeypatch, case, command, message):
    if "--device cuda" in command and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("SPARSEFORGE_DATA", str(fx / "data"))
    argv = shlex.split(command.format(fx=fx, out=tmp_path / "out"))
    if argv[0] in ("eval", "prune"):
        argv.append("--quiet")
    inputs = _tree(fx)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sparseforge-compile")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sparseforge-compile {argv[0]}: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == [] and _tree(fx) == inputs  # nothing written or changed


def _sparsify(model, config=None, **kw):
    from sparseforge_compile.pipeline import sparsify

    return sparsify(model, config, progress=False, **kw)


def _cfg(**kw):
    from sparseforge_compile.pipeline import SparsifyConfig

    return SparsifyConfig(**kw)


def _anneal(**kw):
    from sparseforge_compile.anneal import AnnealConfig

    return AnnealConfig.from_flat(kw)


def _top(name):
    import sparseforge_compile

    return getattr(sparseforge_compile, name)


def _save_unpruned(model, out):
    from sparseforge_compile import save

    return save(model, out)


def _load_checkpoint(path):
    from sparseforge_compile.checkpoint import load

    return load(path)


def _windows(tokens, seqlen):
    from sparseforge_compile.data import eval_windows

    return eval_windows(tokens, seqlen)


def _documents(path):
    from sparseforge_compile.data import read_documents

    return read_documents(path)


# (case id, call(model, fx, out), message); ``model`` is a tiny-llama whose weights must not change.
API_CASES = [
    ("sparsify given a string for the config", lambda m, fx, out: _sparsify(m, "sparseforge"),
     r"config must be a SparsifyConfig, got str .*SparsifyConfig\(method=\.\.\., pattern=\.\.\.\)"),
    ("sparsify given a dict for the config", lambda m, fx, out: _sparsify(m, {"method": "magnitude"}),
     r"config must be a SparsifyConfig, got dict .*SparsifyConfig\(\*\*d\)"),
    ("sparsify given a model that is not an nn.Module", lambda m, fx, out: _sparsify("tiny-llama"),
     r"sparsify needs a torch nn\.Module, got str"),
    ("sparsify resume without out_dir", lambda m, fx, out: _sparsify(m, _cfg(method="sparseforge"), resume=True),
     r"resume=True needs out_dir"),
    ("sparsify a calibrated method without a tokenizer", lambda m, fx, out: _sparsify(m, _cfg(method="wanda")),
     r"wanda needs calibration text: pass a tokenizer"),
    ("SparsifyConfig with an unknown method", lambda m, fx, out: _cfg(method="nope"), r"unknown method 'nope'"),
    ("SparsifyConfig pattern 4:4", lambda m, fx, out: _cfg(pattern="4:4"), r"pattern 4:4 keeps every weight"),
    ("SparsifyConfig sparsity 0", lambda m, fx, out: _cfg(method="magnitude", pattern=None, sparsity=0.0),
     r"sparsity 0\.0 prunes nothing"),
    ("AnnealConfig lr 0", lambda m, fx, out: _anneal(lr=0.0), r"lr must be > 0, got 0\.0"),
    ("AnnealConfig log_every 0", lambda m, fx, out: _anneal(log_every=0), r"log_every must be >= 1"),
    ("AnnealConfig negative checkpoint_every", lambda m, fx, out: _anneal(checkpoint_every=-1),
     r"checkpoint_every must be >= 0"),
    ("load_model with an unknown dtype", lambda m, fx, out: load_model("tiny-llama", dtype="fp64"),
     r"unknown dtype 'fp64'"),
    ("load_model of a folder without weights", lambda m, fx, out: load_model(str(fx / "noweights")),
     r"its weights cannot be loaded"),
    ("save of a model that was never pruned", lambda m, fx, out: _save_unpruned(m, out),
     r"no recorded|pattern"),
    ("load of a folder that is no checkpoint", lambda m, fx, out: _load_checkpoint(fx / "notok"),
     r"notok"),
    ("compile given a model name", lambda m, fx, out: _top("compile")("tiny-llama"),
     r"compile needs a torch nn\.Module, got str"),
    ("inspect given a model name", lambda m, fx, out: _top("inspect")("tiny-llama"),
     r"inspect needs a torch nn\.Module, got str"),
    ("load_model given a number", lambda m, fx, out: load_model(3), r"load_model takes a model name or path, got int"),
    ("load_model on an unknown device", lambda m, fx, out: load_model("tiny-llama", device="tpu"),
     r"device 'tpu' is not a device"),
    ("SparsifyConfig with a dict for anneal", lambda m, fx, out: _cfg(anneal={"lr": 1e-3}),
     r"anneal must be an AnnealConfig, got dict"),
    ("SparsifyConfig with a string budget", lambda m, fx, out: _cfg(budget_s="600"),
     r"budget_s must be seconds as a number or None, got '600'"),
    ("a tokenizer that gives no tokens", lambda m, fx, out: _windows(torch.zeros(0, dtype=torch.long), 2048),
     r"0 tokens: the model folder's tokenizer files are empty"),
    ("text shorter than one window", lambda m, fx, out: _windows(torch.arange(10), 2048),
     r"fewer than one window of seqlen 2048: use a smaller --seqlen"),
    ("read_documents of a line without its text field", lambda m, fx, out: _documents(fx / "notext.jsonl"),
     r"notext\.jsonl:2: no 'text' text field"),
]


@pytest.mark.parametrize("case, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_one_line(fx, tmp_path, case, call, message):
    model = tiny_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _tree(fx)
    with pytest.raises((SparseForgeError, ValueError), match=message) as info:
        call(model, fx, tmp_path / "out")
    assert "\n" not in str(info.value).strip()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == [] and _tree(fx) == inputs

