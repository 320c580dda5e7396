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


def test_perplexity_equals_scoring_each_next_token_from_its_prefix():
    """Independent of the batched code: every token predicted from a forward over its own prefix."""
    from sparseforge_compile.models import tiny_model

    model = tiny_model("tiny-llama").eval()
    windows = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            for t in range(1, window.numel()):
                logits = model(window[None, :t]).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[window[t]])
                count += 1
    got = perplexity(model, windows, batch_size=2, progress=False)
    assert got.tokens == count == 3 * 11
    assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
