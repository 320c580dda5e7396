"""Zero-shot multiple choice: lm-eval's formats, pair encoding, and batched scoring vs a naive reference."""

from __future__ import annotations

import json

import pytest
import torch

from sparseforge_compile.data import resolve_data_dir
from sparseforge_compile.errors import DataError
from sparseforge_compile.models import ByteTokenizer, tiny_model
from sparseforge_compile.zeroshot import (
    MultipleChoiceItem,
    continuation_loglikelihoods,
    encode_pair,
    evaluate_items,
    evaluate_task,
    load_task,
)


def test_task_formats_follow_lm_eval(data_dir):
    piqa = load_task("piqa", limit=3, data_dir=data_dir)
    first = json.loads(_lines("tasks/piqa/valid.jsonl", data_dir)[0])
    assert piqa[0].context == f"Question: {first['goal']}\nAnswer:"
    assert piqa[0].choices == (first["sol1"], first["sol2"]) and piqa[0].gold == 0
    assert len(load_task("piqa", data_dir=data_dir)) == 1838

    arc = load_task("arc_easy", data_dir=data_dir)
    assert len(arc) == 570
    docs = [json.loads(line) for line in _lines("tasks/arc/ARC-Easy-validation.jsonl", data_dir)]
    numeric = next(i for i, d in enumerate(docs) if d["answerKey"].isdigit())
    doc, item = docs[numeric], arc[numeric]
    assert item.context == f"Question: {doc['question']}\nAnswer:"
    assert item.choices == tuple(doc["choices"]["text"])
    assert item.choices[item.gold] == doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]


def _lines(relative: str, data_dir=None) -> list[str]:
    return (resolve_data_dir(data_dir) / relative).read_text(encoding="utf-8").splitlines()


def test_missing_task_file_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError) as info:
        load_task("arc_easy", data_dir=tmp_path)
    message = str(info.value)
    assert "ARC-Easy-validation.jsonl" in message and str(tmp_path) in message and "\n" not in message
    with pytest.raises(DataError, match="valid.jsonl"):
        evaluate_task(tiny_model("tiny-llama"), ByteTokenizer(), "piqa", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown zero-shot task"):
        load_task("hellaswag")


class _WordTokenizer:
    """Merges a leading space into the next word, like BPE: splitting must follow the joint encoding."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces, current = [], ""
        for ch in text:
            if ch in " \n" and current.strip():
                pieces.append(current)
                current = ""
            current += ch
        pieces += [current] if current else []
        return [self.vocab.setdefault(p, len(self.vocab) + 1) for p in pieces]


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding():
    tok = _WordTokenizer()
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "blue sky")
    assert ctx == tok.encode("Question: why?\nAnswer:")
    assert cont == tok.encode("Question: why?\nAnswer: blue sky")[len(ctx):]
    assert cont == [tok.vocab[" blue"], tok.vocab[" sky"]]  # the space joined the continuation's first word
    assert encode_pair(ByteTokenizer(), "ab", " c") == ([97, 98], [32, 99])
    assert encode_pair(ByteTokenizer(), "", "x") == ([0], [120])


def _naive_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[len(ctx) + k - 1, t] for k, t in enumerate(cont)))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_scoring_matches_a_naive_per_item_reference(name, data_dir):
    model, tok = tiny_model(name), ByteTokenizer()
    items = load_task("piqa", limit=3, data_dir=data_dir) + load_task("arc_easy", limit=2, data_dir=data_dir)
    result = evaluate_items(model, tok, items, batch_size=3, progress=False)
    requests = [encode_pair(tok, item.context, " " + c) for item in items for c in item.choices]
    naive = [_naive_loglikelihood(model, ctx, cont) for ctx, cont in requests]
    assert continuation_loglikelihoods(model, requests, batch_size=4) == pytest.approx(naive, abs=1e-4, rel=1e-5)

    correct = correct_norm = 0
    for item in items:
        lls = [naive.pop(0) for _ in item.choices]
        correct += max(range(len(lls)), key=lambda i: lls[i]) == item.gold
        normed = [ll / len(c) for ll, c in zip(lls, item.choices)]
        correct_norm += max(range(len(normed)), key=lambda i: normed[i]) == item.gold
    assert result.n == len(items)
    assert result.acc == correct / len(items) and result.acc_norm == correct_norm / len(items)
    assert 0.0 <= result.acc <= 1.0 and 0.0 <= result.acc_norm <= 1.0 and result.seconds > 0


def test_left_truncation_to_the_model_context():
    model, tok = tiny_model("tiny-llama"), ByteTokenizer()
    ctx, cont = encode_pair(tok, "a long context " * 4, " end")
    truncated = continuation_loglikelihoods(model, [(ctx, cont)], max_length=20)[0]
    keep = (ctx + cont)[-21:]
    assert truncated == pytest.approx(_naive_loglikelihood(model, keep[: -len(cont)], cont), abs=1e-4)


def test_acc_norm_divides_by_choice_characters():
    # acc ranks raw log-likelihoods; acc_norm divides them by len(choice) (2 and 4 characters here).
    model, tok = tiny_model("tiny-llama"), ByteTokenizer()
    item = MultipleChoiceItem("Question: q\nAnswer:", ("aa", "aaaa"), gold=1)
    lls = continuation_loglikelihoods(model, [encode_pair(tok, item.context, " " + c) for c in item.choices])
    result = evaluate_items(model, tok, [item], progress=False)
    assert result.acc == float(lls[1] > lls[0])
    assert result.acc_norm == float(lls[1] / 4 > lls[0] / 2)
    with pytest.raises(DataError, match="non-empty choices"):
        evaluate_items(model, tok, [MultipleChoiceItem("q", ("", "b"), 0)], progress=False)


class _LogitsOnly(torch.nn.Module):
    """A model whose forward takes only input ids (no logits_to_keep): scored through full logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids).logits


def test_models_without_logits_to_keep_score_the_same(data_dir):
    model, tok = tiny_model("tiny-llama"), ByteTokenizer()
    requests = [encode_pair(tok, item.context, " " + c) for item in load_task("arc_easy", limit=2, data_dir=data_dir)
                for c in item.choices]
    sliced = continuation_loglikelihoods(model, requests, batch_size=3)
    full = continuation_loglikelihoods(_LogitsOnly(model), requests, batch_size=3)
    assert full == pytest.approx(sliced, abs=1e-4, rel=1e-5)
