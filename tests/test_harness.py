"""The lm-eval adapter against direct computations on a tiny model, and lm-eval's own tasks on local files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from sparseforge_compile.errors import DataError
from sparseforge_compile.eval_tasks import evaluate_tasks, parse_tasks
from sparseforge_compile.harness import SparseForgeLM
from sparseforge_compile.models import ByteTokenizer, tiny_model


def request(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def lm():
    model = tiny_model("tiny-llama").eval()
    return SparseForgeLM(model, ByteTokenizer(), batch_size=3)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_loglikelihood_is_the_models_summed_logprobs(lm):
    pairs = [("The cat", " sat"), ("A", " longer continuation here"), ("x y ", "z"), ("", "hello")]
    got = lm.loglikelihood([request(c, x) for c, x in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_ids, x_ids = lm.encode_pair(ctx, cont)
        lp = direct_logprobs(lm.model, c_ids + x_ids)[-len(x_ids):]
        assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
        with torch.no_grad():
            logits = lm.model(torch.tensor([c_ids + x_ids])).logits[0, -len(x_ids) - 1 : -1]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(x_ids)).all())


def test_pairs_split_as_hflm_splits_them(lm):
    assert lm.encode_pair("ab ", "c") == ([97, 98], [32, 99])  # the trailing space moves to the continuation
    assert lm.encode_pair("", "x") == ([0], [120])  # an empty context starts from the EOS token


def test_a_greedy_continuation_is_flagged(lm):
    ids = lm.tok_encode("hello")
    with torch.no_grad():
        nxt = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
    (_, greedy), (_, other) = lm.loglikelihood([request("hello", chr(nxt)), request("hello", chr((nxt + 1) % 128))])
    assert greedy and not other


def test_rolling_loglikelihood_sums_every_token_once(lm):
    text = "the quick brown fox jumps over the lazy dog " * 3
    ids = lm.tok_encode(text)
    short = SparseForgeLM(lm.model, lm.tokenizer, batch_size=2, max_length=48)  # several windows
    expected = float(direct_logprobs(lm.model, [0] + ids).sum())
    assert lm.loglikelihood_rolling([request(text)])[0] == pytest.approx(expected, abs=1e-3)
    windowed = short.loglikelihood_rolling([request(text)])[0]
    assert len(ids) > 48 and windowed < 0 and windowed != pytest.approx(expected, abs=1e-3)  # less context


def test_generate_until_is_greedy_decoding_cut_at_the_stop(lm):
    prompts = ["abc", "a much longer prompt"]
    got = lm.generate_until([request(p, {"until": ["\x00\x00"], "max_gen_toks": 6}) for p in prompts])
    for prompt, text in zip(prompts, got):
        ids = lm.tok_encode(prompt)
        for _ in range(6):
            with torch.no_grad():
                nxt = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 0:
                break
            ids.append(nxt)
        assert text == lm.tok_decode(ids[len(lm.tok_encode(prompt)):])
    first = got[0]
    if len(first) > 2:  # a stop string inside the text cuts it there
        cut = lm.generate_until([request("abc", {"until": [first[2]], "max_gen_toks": 6})])[0]
        assert cut == first[: first.index(first[2])]


def _task_folder(root):
    (root / "tasks" / "piqa").mkdir(parents=True)
    (root / "tasks" / "arc").mkdir(parents=True)
    piqa = [{"goal": f"goal {i}", "sol1": "yes " * (i + 1), "sol2": "no"} for i in range(5)]
    (root / "tasks/piqa/valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
    (root / "tasks/piqa/valid-labels.lst").write_text("0\n1\n0\n1\n1\n")
    arc = [{"id": str(i), "question": f"q{i}?", "choices": {"text": ["a", "bb", "ccc"], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3]} for i in range(4)]
    (root / "tasks/arc/ARC-Easy-validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in arc))
    return root, piqa, arc


def test_local_tasks_score_as_the_adapter_scores(tmp_path, lm):
    root, piqa, arc = _task_folder(tmp_path)
    out = evaluate_tasks(lm.model, lm.tokenizer, ["piqa", "arc_easy"], data_dir=root, batch_size=4)
    gold_piqa = [0, 1, 0, 1, 1]
    hits = hits_norm = 0
    for doc, gold in zip(piqa, gold_piqa):
        choices = [doc["sol1"], doc["sol2"]]
        lls = [ll for ll, _ in lm.loglikelihood([request(f"Question: {doc['goal']}\nAnswer:", " " + c)
                                                 for c in choices])]
        hits += max(range(2), key=lambda i: lls[i]) == gold
        hits_norm += max(range(2), key=lambda i: lls[i] / len(choices[i])) == gold
    assert out["results"]["piqa"]["acc"] == pytest.approx(hits / 5)
    assert out["results"]["piqa"]["acc_norm"] == pytest.approx(hits_norm / 5)
    assert set(out["results"]["arc_easy"]) >= {"acc", "acc_norm", "acc_stderr"}
    assert "piqa" in out["table"] and "arc_easy" in out["table"]


def test_missing_task_data_is_one_line_naming_where(tmp_path, lm, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"tasks/piqa/valid.jsonl \(not found\).*baber/piqa") as info:
        evaluate_tasks(lm.model, lm.tokenizer, ["piqa"], data_dir=tmp_path, limit=2)
    assert "\n" not in str(info.value)


def test_bad_task_lists_are_clear(lm):
    assert parse_tasks(" piqa, arc_easy ,") == ["piqa", "arc_easy"]
    with pytest.raises(DataError, match="unknown lm-eval task 'no_such_task'"):
        evaluate_tasks(lm.model, lm.tokenizer, ["no_such_task"])
