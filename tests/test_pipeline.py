"""sparsify() on a plain nn.Module (no vocabulary): captured on the caller's example inputs, pruned by magnitude."""

import pytest
import torch
from torch import nn

import sparseforge_compile
from sparseforge_compile.masks import NMPattern, count_nm_violations
from sparseforge_compile.pipeline import SparsifyConfig, sparsify


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def test_a_plain_module_prunes_to_nm_and_compiles():
    mlp, x = _mlp(), torch.randn(4, 64)
    result = sparsify(mlp, SparsifyConfig(method="magnitude", budget_s=None), example_inputs=(x,), progress=False)
    assert result.layers == ["0", "2"]
    assert all(count_nm_violations(m.weight, NMPattern(2, 4)) == 0 for m in mlp if isinstance(m, nn.Linear))
    with pytest.warns(UserWarning, match="dense matmul with the masked weight"):  # the CPU has no sparse cores
        compiled = sparseforge_compile.compile(mlp)
    torch.testing.assert_close(compiled(x), mlp(x))


@pytest.mark.parametrize("method, kwargs, message", [
    ("magnitude", {}, "not a language model .* pass example_inputs"),
    ("wanda", {"example_inputs": (torch.randn(2, 64),)}, "takes no token ids: use method='magnitude'"),
])
def test_a_plain_module_gets_clear_errors_and_stays_untouched(method, kwargs, message):
    mlp = _mlp()
    before = [p.clone() for p in mlp.parameters()]
    with pytest.raises(ValueError, match=message):
        sparsify(mlp, SparsifyConfig(method=method, budget_s=None), progress=False, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(mlp.parameters(), before))


def test_a_masked_lm_trains_on_real_text_without_sampling(caplog, data_dir):
    """BERT generates no text: the teacher-sampled share is dropped with one warning, the rest trains."""
    import logging

    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.models import load_model

    loaded = load_model("tiny-bert")
    cfg = SparsifyConfig(method="sparseforge", budget_s=None, calib_samples=4, calib_seqlen=32, teacher_sample_rows=4,
                         anneal=AnnealConfig.from_flat(dict(steps=3, batch_size=2, seqlen=32, warm_start="magnitude",
                                                            teacher_data_ratio=0.5)))
    with caplog.at_level(logging.WARNING, logger="sparseforge_compile.pipeline"):
        result = sparsify(loaded.model, cfg, tokenizer=loaded.tokenizer, data_dir=data_dir, progress=False)
    assert "BertForMaskedLM is not a causal language model" in caplog.text
    assert result.summary()["teacher_tokens"] == 0 and result.anneal.steps == 3
