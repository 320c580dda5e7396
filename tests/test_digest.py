"""What the method computes, pinned: a short CPU prune of ``tiny-llama`` by every method, reduced to a
digest (masks, weights, flips, the logged losses) and compared with ``tests/fixtures/digest.json``.

Refactoring must not change a number. Masks and flip counts must match exactly everywhere; weights and
losses match bit for bit on the CPU the fixture was recorded on, and to 1e-5 on others (vector widths
change float summation order). ``python tests/test_digest.py --record`` rewrites the fixture: only for a
change that is meant to change results, named in CHANGELOG.md.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.models import ByteTokenizer, tiny_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digest.json"
METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt+kd", "sparseforge")
LOSS_KEYS = ("loss", "kl", "hidden", "temperature", "undecided", "flips")

# Every setting given explicitly (defaults may move; the digest must not). A low prior margin and a long
# soft phase so that flips happen in 16 steps.
ANNEAL = dict(steps=16, batch_size=2, seqlen=32, lr=3e-4, warmup_frac=0.1, importance="fisher", importance_every=2,
              evidence_probes=2, t_start=0.3, t_end=0.02, anneal_end=0.5, harden_end=0.75, warm_start="sparsegpt",
              prior_margin=2.0, prior_floor=0.5, teacher_data_ratio=0.5, seed=0, autocast="off", compile="off",
              log_every=1)


def synthetic_data(root: Path) -> Path:
    """A C4-shaped calibration file of seeded pseudo-words (CI has no data folder)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    (root / "c4").mkdir(parents=True, exist_ok=True)
    with open(root / "c4" / "c4_en_train_head1000.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n")
    return root


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_digest(method: str, data_dir: Path) -> dict:
    torch.manual_seed(0)
    model = tiny_model("tiny-llama", seed=0)
    hidden = {"hidden_weight": 3.0} if method == "sparseforge" else {}
    cfg = SparsifyConfig(method=method, budget_s=None, calib_samples=4, calib_seqlen=32, teacher_sample_rows=4,
                         teacher_sample_batch=4, anneal=AnnealConfig.from_flat({**ANNEAL, **hidden}))
    result = sparsify(model, cfg, tokenizer=ByteTokenizer(), data_dir=data_dir, progress=False)
    weights = {n: model.get_submodule(n).weight.detach().float() for n in result.layers}
    out = {"cpu": torch.backends.cpu.get_cpu_capability(), "layers": len(result.layers),
           "masks": _sha(torch.cat([(w != 0).flatten() for w in weights.values()])),
           "weights_sha": _sha(torch.cat([w.flatten() for w in weights.values()])),
           "weights_abs_sum": [float(w.double().abs().sum()) for w in weights.values()],
           "all_params_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}
    if result.anneal is not None:
        out["flips"] = result.anneal.flips_vs_warm_start
        out["steps"] = result.anneal.steps
        out["history"] = [{k: row[k] for k in LOSS_KEYS} for row in result.anneal.history]
    return out


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-5 * max(1.0, abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("method", METHODS)
def test_the_method_computes_what_it_computed(method, tmp_path):
    expected = json.loads(FIXTURE.read_text())[method]
    got = run_digest(method, synthetic_data(tmp_path))
    assert got["layers"] == expected["layers"] and got["masks"] == expected["masks"], "the masks changed"
    assert got.get("flips") == expected.get("flips"), "the flips changed"
    if method == "sparseforge":
        assert expected["flips"] > 0 and max(r["undecided"] for r in expected["history"]) > 0  # the digest exercises annealing
    if got["cpu"] == expected["cpu"]:
        assert got["weights_sha"] == expected["weights_sha"], "the weights changed"
        assert got.get("history") == expected.get("history"), "the logged losses changed"
    for key in ("weights_abs_sum", "all_params_sum", "history"):
        assert _close(got.get(key), expected.get(key)), f"{key} changed"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digest = {m: run_digest(m, synthetic_data(Path(tmp) / m)) for m in METHODS}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(digest, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
