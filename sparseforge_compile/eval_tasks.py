"""Zero-shot tasks through lm-evaluation-harness: its own task definitions, prompts and metrics, run on
our models by :class:`~sparseforge_compile.harness.SparseForgeLM`.

PIQA and ARC-Easy read their validation sets from the local data folder when it has them (lm-eval's task
config with the dataset swapped for the local JSON file: same prompts, same metrics); any other task, or
these two without local files, loads by name through lm-eval (a dataset cache or hub access).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from torch import nn

from .data import default_data_dir
from .errors import DataError, UsageError

log = logging.getLogger(__name__)

# task -> (local files under the data folder, the hub dataset lm-eval would fetch)
LOCAL_TASKS = {
    "piqa": (("tasks/piqa/valid.jsonl", "tasks/piqa/valid-labels.lst"), "baber/piqa"),
    "arc_easy": (("tasks/arc/ARC-Easy-validation.jsonl",), "allenai/ai2_arc"),
}


def parse_tasks(text: str | None) -> list[str]:
    """``"piqa, arc_easy"`` -> ``["piqa", "arc_easy"]`` (empty or None: no tasks)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def check_tasks(tasks: list[str], limit: int | None) -> None:
    """Refuse unknown task names and a bad --limit before any model is loaded or pruned."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be >= 1 (leave it out to score every document)")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError("zero-shot tasks need lm-evaluation-harness: pip install 'sparseforge-compile[eval]'") from exc
    manager = TaskManager()
    for task in tasks:
        if task not in manager.all_tasks and task not in manager.all_groups and task not in manager.all_tags:
            raise DataError(f"unknown lm-eval task {task!r}; `lm-eval ls tasks` lists them")


def _piqa_jsonl(questions: Path, labels: Path, folder: Path) -> Path:
    """PIQA's questions joined with its separate label file, one JSON object per line."""
    with open(questions, encoding="utf-8") as q, open(labels, encoding="utf-8") as lab:
        rows = [line for line in q if line.strip()]
        gold = [line.strip() for line in lab if line.strip()]
    if len(rows) != len(gold):
        raise DataError(f"{questions}: {len(rows)} questions but {labels} has {len(gold)} labels; they must match")
    out = folder / "piqa_validation.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for number, (row, label) in enumerate(zip(rows, gold), 1):
            try:
                doc = json.loads(row)
            except json.JSONDecodeError as exc:
                raise DataError(f"{questions}:{number}: not a JSON line ({exc.msg})") from exc
            if not label.isdigit():
                raise DataError(f"{labels}:{number}: label {label!r} is not 0 or 1")
            f.write(json.dumps({**doc, "label": int(label)}) + "\n")
    return out


def _local_config(task: str, files: list[Path], folder: Path, manager) -> dict:
    """lm-eval's own config of ``task`` with its dataset read from ``files``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = dict(load_yaml(manager.task_index[task].yaml_path, resolve_func=True))
    path = _piqa_jsonl(files[0], files[1], folder) if task == "piqa" else files[0]
    config.update(dataset_path="json", dataset_name=None, training_split=None, test_split=None,
                  validation_split="validation", dataset_kwargs={"data_files": {"validation": str(path)}})
    return config


def task_specs(tasks: list[str], data_dir: str | Path | None, folder: Path, manager) -> list[str | dict]:
    """What lm-eval is asked to run: a local config where the data folder has the task, else its name."""
    root = Path(data_dir) if data_dir else default_data_dir()
    specs: list[str | dict] = []
    for task in tasks:
        if task not in manager.all_tasks and task not in manager.all_groups and task not in manager.all_tags:
            raise DataError(f"unknown lm-eval task {task!r}; `lm-eval ls tasks` lists them")
        local = LOCAL_TASKS.get(task)
        files = [root / f for f in local[0]] if local and root else []
        if files and all(f.is_file() for f in files):
            specs.append(_local_config(task, files, folder, manager))
        else:
            specs.append(task)
    return specs


def _where(task: str, data_dir: str | Path | None) -> str:
    root = Path(data_dir) if data_dir else default_data_dir()
    local = LOCAL_TASKS.get(task)
    looked = f"{root / local[0][0]} (not found), then " if local and root else ""
    hub = f"the dataset {local[1]}" if local else "its dataset"
    return f"looked in {looked}{hub} through the datasets cache or hub"


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], *, data_dir: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 16, progress: bool = False) -> dict:
    """lm-eval's results for ``tasks`` on ``model``: ``{"results": {task: {metric: value}}, "table": str,
    "seconds": float}`` (``limit``: the first N documents of each task)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError as exc:
        raise UsageError("zero-shot tasks need lm-evaluation-harness: pip install 'sparseforge-compile[eval]'") from exc

    from .harness import SparseForgeLM

    if not tasks:
        raise ValueError("no tasks given: name lm-eval tasks, e.g. piqa,arc_easy")
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit} must be >= 1")
    start = time.perf_counter()
    manager = TaskManager()
    lm = SparseForgeLM(model, tokenizer, batch_size=batch_size, progress=progress)
    with tempfile.TemporaryDirectory(prefix="sparseforge-tasks-") as tmp:
        specs = task_specs(tasks, data_dir, Path(tmp), manager)
        try:
            out = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=False,
                                  verbosity="WARNING")
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            missing = [t for t, s in zip(tasks, specs) if isinstance(s, str)]
            where = "; ".join(f"{t}: {_where(t, data_dir)}" for t in missing) or str(exc)
            raise DataError(f"task data not found ({where}): {type(exc).__name__}") from exc
    results = {task: {k.replace(",none", ""): v for k, v in metrics.items() if k not in ("alias", "name")}
               for task, metrics in out["results"].items()}
    return {"results": results, "table": make_table(out), "seconds": time.perf_counter() - start,
            "lm_eval_version": out.get("versions", {}), "limit": limit}
