"""Perplexity: the whole window's figure and its split by position."""

import math

import pytest
import torch

from sparseforge_compile.evaluate import perplexity
from sparseforge_compile.models import load_model


def test_perplexity_splits_by_position_and_agrees_with_the_whole():
    model = load_model("tiny-llama").model
    windows = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, windows, batch_size=2, progress=False)
    assert len(res.position_nll) == 32 and res.tokens == 3 * 32
    # equal-size halves: the whole's NLL is their mean
    lo, hi = math.log(res.ppl_between(0, 16)), math.log(res.ppl_between(16, 33))
    assert res.nll == pytest.approx((lo + hi) / 2, rel=1e-6)
    assert res.ppl_between(0, 32) == pytest.approx(res.ppl, rel=1e-6)
    assert "position_nll" not in res.as_dict()
    with pytest.raises(ValueError, match="no predicted positions"):
        res.ppl_between(40, 50)
