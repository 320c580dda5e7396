"""The loop's ``kd_loss`` setting: the fused KD loss trains what the plain one trains."""

from __future__ import annotations

import pytest
import torch
from test_digest import synthetic_data

from sparseforge_compile.anneal import AnnealConfig
from sparseforge_compile.models import ByteTokenizer, tiny_model
from sparseforge_compile.pipeline import SparsifyConfig, sparsify


def _run(kd_loss: str, data) -> tuple[dict, list[dict]]:
    model = tiny_model("tiny-llama", seed=0)
    anneal = AnnealConfig.from_flat(dict(steps=6, batch_size=2, seqlen=32, lr=3e-3, importance_every=2, evidence_probes=2,
                                         anneal_end=0.5, harden_end=0.7, prior_margin=0.5, warm_start="magnitude",
                                         teacher_data_ratio=0.0, compile="off", autocast="off", log_every=1,
                                         kd_loss=kd_loss, ce_weight=0.5, kd_temperature=2.0))
    result = sparsify(model, SparsifyConfig(budget_s=None, calib_samples=2, calib_seqlen=32, anneal=anneal),
                      tokenizer=ByteTokenizer(), data_dir=data, progress=False)
    return {n: model.get_submodule(n).weight.detach() for n in result.layers}, result.anneal.history


def test_fused_kd_loss_trains_like_the_plain_one(tmp_path):
    data = synthetic_data(tmp_path)
    plain_w, plain_h = _run("plain", data)
    fused_w, fused_h = _run("fused", data)
    for a, b in zip(plain_h, fused_h):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["flips"] == b["flips"]
    for n in plain_w:
        assert torch.equal(plain_w[n] != 0, fused_w[n] != 0)
        assert torch.allclose(plain_w[n], fused_w[n], atol=1e-5), n


def test_auto_is_plain_and_fused_is_chosen():
    cfg = AnnealConfig()
    assert not cfg.fuses_kd(torch.device("cuda")) and not cfg.fuses_kd(torch.device("cpu"))
    assert AnnealConfig.from_flat({"kd_loss": "fused"}).fuses_kd(torch.device("cpu"))
    with pytest.raises(ValueError, match="kd_loss"):
        AnnealConfig.from_flat({"kd_loss": "chunked"})
