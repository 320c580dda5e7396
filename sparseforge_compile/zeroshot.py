"""Zero-shot multiple-choice accuracy (PIQA, ARC-Easy), scored as lm-evaluation-harness scores it.

Each choice is a continuation ``" " + choice`` of the task's context; its log-likelihood is the
sum of the log-probabilities of its tokens given the context. ``acc`` picks the choice of highest
log-likelihood; ``acc_norm`` divides each log-likelihood by the choice's length in characters
first (lm-eval's ``completion_len = len(choice)``, the choice text without the leading space).

Context and continuation are tokenized as lm-eval's ``HFLM`` does: trailing spaces of the context
move to the continuation, the pair is encoded as one string without special tokens, and the
continuation's tokens are what follows the context's own encoding.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import resolve_data_dir
from .errors import DataError
from .evaluate import logits_of

TASKS = ("piqa", "arc_easy")
PIQA_FILE = "tasks/piqa/valid.jsonl"
PIQA_LABELS_FILE = "tasks/piqa/valid-labels.lst"
ARC_EASY_FILE = "tasks/arc/ARC-Easy-validation.jsonl"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when the config names no context length


@dataclass(frozen=True)
class MultipleChoiceItem:
    context: str  # lm-eval's doc_to_text
    choices: tuple[str, ...]  # lm-eval's doc_to_choice (no leading space)
    gold: int


@dataclass
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    n: int
    seconds: float
    acc_stderr: float = 0.0  # sample standard error, as lm-eval reports it
    acc_norm_stderr: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- data

def _task_file(data_dir: str | Path | None, relative: str) -> Path:
    path = resolve_data_dir(data_dir) / relative
    if not path.is_file():
        raise DataError(f"missing task file {path}: put {relative} under the data directory (--data-dir)")
    return path


def _json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    return rows


def load_piqa(data_dir: str | Path | None = None) -> list[MultipleChoiceItem]:
    """PIQA validation (lm-eval ``piqa``): ``"Question: {goal}\\nAnswer:"``, choices sol1 / sol2."""
    docs_path = _task_file(data_dir, PIQA_FILE)
    labels_path = _task_file(data_dir, PIQA_LABELS_FILE)
    docs = _json_lines(docs_path)
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(docs):
        raise DataError(f"{labels_path} has {len(labels)} labels for the {len(docs)} items of {docs_path}")
    items = []
    for number, (doc, label) in enumerate(zip(docs, labels), 1):
        try:
            items.append(MultipleChoiceItem(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]),
                                            int(label)))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{docs_path}:{number}: item lacks goal/sol1/sol2 or a 0/1 label ({exc})") from exc
    return items


def load_arc_easy(data_dir: str | Path | None = None) -> list[MultipleChoiceItem]:
    """ARC-Easy validation (lm-eval ``arc_easy``): ``"Question: {question}\\nAnswer:"``, choices.text."""
    path = _task_file(data_dir, ARC_EASY_FILE)
    items = []
    for number, doc in enumerate(_json_lines(path), 1):
        try:
            choices = doc["choices"]
            gold = list(choices["label"]).index(doc["answerKey"])
            items.append(MultipleChoiceItem(f"Question: {doc['question']}\nAnswer:", tuple(choices["text"]), gold))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}:{number}: item lacks question/choices or its answerKey is not a label "
                            f"({exc})") from exc
    return items


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[MultipleChoiceItem]:
    loaders = {"piqa": load_piqa, "arc_easy": load_arc_easy}
    if task not in loaders:
        raise DataError(f"unknown zero-shot task {task!r}; choose one of {', '.join(TASKS)}")
    items = loaders[task](data_dir)
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------------- scoring

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval's HFLM splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("an empty context needs the tokenizer's EOS token as its one context token")
        return [int(eos)], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def _max_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _tail_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all of them if the model cannot slice before its head)."""
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts:
        return logits_of(model, ids)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def continuation_loglikelihoods(model: nn.Module, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                                max_length: int | None = None, progress: bool = False) -> list[float]:
    """Summed log-probability of each continuation given its context, batched (longest first).

    Sequences are right-padded without an attention mask (a causal model's positions never see
    the padding). Only the continuation positions' logits are normalized, on the model's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    max_length = max_length or _max_length(model)
    device = next(model.parameters()).device
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation encodes to no tokens: nothing to score")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_length}")
        inputs.append((ctx + cont)[-(max_length + 1):][:-1])  # left-truncated, as lm-eval does
        targets.append(cont)
    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
    scores = [0.0] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress, unit="batch"):
        chunk = order[start : start + batch_size]
        width = max(len(inputs[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, tgt = [], [], []
        for row, i in enumerate(chunk):
            length, count = len(inputs[i]), len(targets[i])
            ids[row, :length] = torch.tensor(inputs[i])
            rows += [row] * count
            cols += range(length - count, length)
            tgt += targets[i]
        # Only positions from the earliest continuation on need the LM head (vocab-wide matmul).
        keep = width - min(len(inputs[i]) - len(targets[i]) for i in chunk)
        logits = _tail_logits(model, ids.to(device), keep)
        row_index = torch.tensor(rows, device=device)
        col_index = torch.tensor(cols, device=device) - (width - logits.shape[1])
        picked = logits[row_index, col_index].float()
        token_lp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(tgt, device=device)[:, None]).squeeze(1)
        sums = torch.zeros(len(chunk), device=device).index_add_(0, row_index, token_lp)
        for i, value in zip(chunk, sums.tolist()):
            scores[i] = value
        del logits, picked
    return scores


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, like np.argmax


def evaluate_items(model: nn.Module, tokenizer, items: list[MultipleChoiceItem], task: str = "custom",
                   batch_size: int = 16, progress: bool = True) -> TaskResult:
    """acc / acc_norm of ``model`` over multiple-choice ``items``."""
    if not items:
        raise DataError(f"{task}: no items to evaluate")
    start = time.perf_counter()
    requests, owners = [], []
    for index, item in enumerate(items):
        if not item.choices or not all(item.choices) or not 0 <= item.gold < len(item.choices):
            raise DataError(f"{task} item {index}: needs non-empty choices and a gold index among them")
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, " " + choice))
            owners.append(index)
    was_training = model.training
    model.eval()
    try:
        lls = continuation_loglikelihoods(model, requests, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
    per_item: list[list[float]] = [[] for _ in items]
    for owner, ll in zip(owners, lls):
        per_item[owner].append(ll)
    correct = correct_norm = 0
    for item, item_lls in zip(items, per_item):
        correct += _argmax(item_lls) == item.gold
        normed = [ll / len(choice) for ll, choice in zip(item_lls, item.choices)]
        correct_norm += _argmax(normed) == item.gold
    n = len(items)
    acc, acc_norm = correct / n, correct_norm / n
    return TaskResult(task=task, acc=acc, acc_norm=acc_norm, n=n, seconds=time.perf_counter() - start,
                      acc_stderr=_stderr(acc, n), acc_norm_stderr=_stderr(acc_norm, n))


def evaluate_task(model: nn.Module, tokenizer, task: str, data_dir: str | Path | None = None,
                  limit: int | None = None, batch_size: int = 16, progress: bool = True) -> TaskResult:
    """Zero-shot ``task`` ("piqa" | "arc_easy") on its validation split (the first ``limit`` items)."""
    if tokenizer is None:
        raise ValueError("zero-shot scoring needs the model's tokenizer")
    return evaluate_items(model, tokenizer, load_task(task, data_dir, limit), task=task, batch_size=batch_size,
                          progress=progress)
