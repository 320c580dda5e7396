"""One-shot peer methods: exact masks, the papers' math, sequential calibration, tiny models."""

from __future__ import annotations

import logging

import pytest
import torch

from sparseforge_compile.errors import PruneError
from sparseforge_compile.layers import default_prune_layers, find_decoder_blocks, weight_out_in
from sparseforge_compile.masks import NMPattern, count_nm_violations, nm_mask
from sparseforge_compile.methods import (
    LayerInputStats,
    OneShotConfig,
    magnitude_keep_mask,
    nm_prune_smallest,
    prune_oneshot,
    reconstruction_error,
    sparsegpt_prune_weight,
    wanda_keep_mask,
)
from sparseforge_compile.models import tiny_model

P24 = NMPattern(2, 4)


def _calib(n: int = 6, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(tokens: int = 512, features: int = 64, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated: a low-rank signal plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g)
    mix = torch.randn(rank, features, generator=g)
    scale = torch.rand(features, generator=g) * 3 + 0.5
    return (z @ mix + 0.05 * torch.randn(tokens, features, generator=g)) * scale


def _stats_of(x: torch.Tensor, chunks: int = 4) -> LayerInputStats:
    stats = LayerInputStats(x.shape[-1])
    for part in x.reshape(chunks, -1, x.shape[-1]):
        stats.add_batch(part.unsqueeze(0))
    return stats


def _output_error(w: torch.Tensor, w_pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t() - x @ w_pruned.t()) ** 2).sum())


# ---------------------------------------------------------------------------- input statistics

def test_layer_input_stats_match_direct_sums():
    x = torch.randn(3, 10, 16, dtype=torch.float64).float()
    stats = LayerInputStats(16)
    stats.add_batch(x[:2])
    stats.add_batch(x[2:])
    flat = x.reshape(-1, 16)
    assert stats.nsamples == 3 and stats.ntokens == 30
    torch.testing.assert_close(stats.hessian, 2 / 3 * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.feature_norms(), flat.norm(dim=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        stats.add_batch(torch.randn(1, 4, 8))
    with pytest.raises(RuntimeError, match="no calibration inputs"):
        LayerInputStats(4, layer="model.x").hessian  # noqa: B018


# ------------------------------------------------------------------------------------ magnitude

def test_magnitude_nm_keeps_largest_per_group_and_unstructured_ratio_is_exact():
    model = tiny_model("tiny-llama")
    dense = {n: weight_out_in(m).clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    result = prune_oneshot(model, "magnitude", progress=False)
    modules = dict(model.named_modules())
    assert len(result.masks) == 14  # 7 linears x 2 blocks, no lm_head / embeddings
    for name, keep in result.masks.items():
        weight = weight_out_in(modules[name])
        assert count_nm_violations(weight, P24) == 0
        assert torch.equal(keep, nm_mask(dense[name].abs(), P24))
        assert torch.equal(weight, dense[name] * keep)

    model = tiny_model("tiny-llama")
    result = prune_oneshot(model, "magnitude", pattern=None, sparsity=0.3, progress=False)
    for name, keep in result.masks.items():
        weight = weight_out_in(dict(model.named_modules())[name])
        assert int((~keep).sum()) == round(0.3 * keep.numel())
        assert float(weight[~keep].abs().max()) <= float(weight[keep].abs().min())


def test_ties_prune_the_lower_index_first_like_the_references_cuda_topk():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 2.0, 3.0], [3.0, 1.0, 1.0, 2.0], [0.5, 4.0, 0.5, 0.5]])
    expected_prune = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_prune_smallest(scores, P24), expected_prune)
    assert torch.equal(magnitude_keep_mask(-scores, P24), ~expected_prune)
    assert torch.equal(wanda_keep_mask(scores, torch.ones(4), P24), ~expected_prune)
    # Unstructured: exactly the count, ties again pruned from the lower index.
    keep = magnitude_keep_mask(torch.ones(2, 4), None, sparsity=0.25)
    assert torch.equal(keep, torch.tensor([[False, False, True, True], [True, True, True, True]]))


# ---------------------------------------------------------------------------------------- Wanda

def test_wanda_equals_magnitude_when_all_input_norms_are_equal():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    # Orthonormal columns: every input feature has norm exactly 1 over the tokens.
    x = torch.linalg.qr(torch.randn(256, 64, generator=torch.Generator().manual_seed(2)))[0]
    norms = _stats_of(x).feature_norms()
    torch.testing.assert_close(norms, torch.ones(64), rtol=1e-4, atol=1e-4)
    assert torch.equal(wanda_keep_mask(w, norms, P24), magnitude_keep_mask(w, P24))
    assert torch.equal(wanda_keep_mask(w, torch.full((64,), 3.7), P24), magnitude_keep_mask(w, P24))
    # ...and differs once the norms differ.
    skewed = torch.linspace(0.1, 10, 64)
    assert not torch.equal(wanda_keep_mask(w, skewed, P24), magnitude_keep_mask(w, P24))


def test_wanda_unstructured_compares_within_each_output_row():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    norms = torch.rand(40, generator=torch.Generator().manual_seed(4)) + 0.1
    keep = wanda_keep_mask(w, norms, None, sparsity=0.25)
    assert torch.equal((~keep).sum(dim=1), torch.full((16,), 10))
    scores = w.abs() * norms
    for row in range(16):
        assert scores[row][~keep[row]].max() <= scores[row][keep[row]].min()


# ------------------------------------------------------------------------------------ SparseGPT

def _naive_sparsegpt(w: torch.Tensor, h: torch.Tensor, pattern: NMPattern | None, sparsity: float | None,
                     blocksize: int, percdamp: float) -> torch.Tensor:
    """Optimal Brain Surgeon one column at a time with explicit inverses (float64), no lazy updates."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    inverses = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]  # inverse Hessian of the columns left
    d = torch.tensor([inv[0, 0] for inv in inverses], dtype=h.dtype)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if pattern is not None and j % pattern.m == 0:
            prune[:, j : j + pattern.m] = ~nm_mask(w[:, j : j + pattern.m] ** 2 / d[j : j + pattern.m], pattern)
        if pattern is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            count = round(sparsity * rows * end) - round(sparsity * rows * j)
            scores = (w[:, j:end] ** 2 / d[j:end]).flatten()
            block = torch.zeros(scores.numel(), dtype=torch.bool)
            block[torch.sort(scores, stable=True).indices[:count]] = True
            prune[:, j:end] = block.reshape(rows, end - j)
        q = torch.where(prune[:, j], 0.0, w[:, j])
        w[:, j:] -= ((w[:, j] - q) / inverses[j][0, 0])[:, None] * inverses[j][0][None, :]
        w[:, j] = q  # exactly, where the update leaves rounding residue
    return w.float()


@pytest.mark.parametrize("pattern,sparsity", [(P24, None), (None, 0.5)])
def test_sparsegpt_matches_column_by_column_obs(pattern, sparsity):
    x = _correlated_inputs()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    h = _stats_of(x).hessian
    naive = _naive_sparsegpt(w, h, pattern, sparsity, blocksize=16, percdamp=0.01)
    result = sparsegpt_prune_weight(w, h.clone(), pattern=pattern, sparsity=sparsity, blocksize=16)
    assert torch.equal(result.keep, naive != 0)
    torch.testing.assert_close(result.weight, naive, rtol=1e-3, atol=1e-3)
    if pattern is not None:
        assert count_nm_violations(result.weight, pattern) == 0
        # Lazy batch updates are exact: the block size does not change the N:M result.
        other = sparsegpt_prune_weight(w, h.clone(), pattern=pattern, blocksize=64)
        assert torch.equal(other.keep, result.keep)
        torch.testing.assert_close(other.weight, result.weight, rtol=1e-4, atol=1e-4)
    else:
        assert int((~result.keep).sum()) == w.numel() // 2
    assert torch.equal(result.weight == 0, ~result.keep)


@pytest.mark.parametrize("pattern,sparsity", [(P24, None), (None, 0.5)])
def test_sparsegpt_reconstructs_correlated_inputs_better_than_magnitude_and_wanda(pattern, sparsity):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    stats = _stats_of(x)
    h = stats.hessian.clone()
    sgpt = sparsegpt_prune_weight(w, stats.take_hessian(), pattern=pattern, sparsity=sparsity).weight
    mag = w * magnitude_keep_mask(w, pattern, sparsity)
    wanda = w * wanda_keep_mask(w, stats.feature_norms(), pattern, sparsity)
    err_sgpt, err_mag, err_wanda = (_output_error(w, p, x) for p in (sgpt, mag, wanda))
    assert err_sgpt < 0.5 * err_mag
    assert err_sgpt < err_wanda
    # The Gram-matrix form of the relative error agrees with the direct one.
    direct = err_sgpt / float(((x @ w.t()) ** 2).sum())
    assert reconstruction_error(w, sgpt, h) == pytest.approx(direct, rel=1e-3)


def test_sparsegpt_dead_inputs_are_zeroed():
    x = _correlated_inputs(features=32)
    x[:, 5] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    result = sparsegpt_prune_weight(w, _stats_of(x).hessian, pattern=P24)
    assert result.dead_inputs == 1
    assert torch.all(result.weight[:, 5] == 0)


def test_sparsegpt_damping_retry_is_logged_and_recorded(caplog):
    # A symmetric indefinite "Hessian": Cholesky fails until the damping exceeds its negative eigenvalue.
    g = torch.Generator().manual_seed(8)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    eigen = torch.linspace(-0.5, 4.0, 16)
    h = q @ torch.diag(eigen) @ q.t()
    w = torch.randn(8, 16, generator=g)
    with caplog.at_level(logging.WARNING, logger="sparseforge_compile.methods.sparsegpt"):
        result = sparsegpt_prune_weight(w, h.clone(), pattern=P24, percdamp=0.0, layer="model.layers.3.mlp.up_proj")
    assert result.damping_retries > 0 and result.percdamp > 0
    assert result.damping > 0.5  # enough to shift the -0.5 eigenvalue
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == result.damping_retries
    assert all("model.layers.3.mlp.up_proj" in m and "percdamp" in m for m in warnings)
    assert count_nm_violations(result.weight, P24) == 0

    with pytest.raises(PruneError, match=r"model.layers.3.mlp.up_proj.*16x16 Hessian of this 8x16 layer"):
        sparsegpt_prune_weight(w, h.clone(), pattern=P24, percdamp=0.0, max_damp_retries=2,
                               layer="model.layers.3.mlp.up_proj")
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(PruneError, match="NaN"):
        sparsegpt_prune_weight(w, bad, pattern=P24, layer="l")


def test_sparsegpt_retry_recorded_in_layer_stats(caplog):
    # A model whose second block's up_proj sees rank-deficient inputs: percdamp 0 must retry.
    model = tiny_model("tiny-llama")
    config = OneShotConfig(percdamp=0.0, batch_size=1)
    calib = _calib(n=1, seqlen=8)  # 8 tokens into 64-wide layers: X^T X is singular
    with caplog.at_level(logging.WARNING, logger="sparseforge_compile.methods.sparsegpt"):
        result = prune_oneshot(model, "sparsegpt", calib=calib, config=config, progress=False)
    retried = [s for s in result.layers.values() if s.damping_retries]
    assert retried, "a singular Hessian with percdamp 0 must trigger the damping retry"
    for stats in retried:
        assert stats.percdamp > 0 and stats.damping > 0
        assert any(stats.name in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- the model-level API

def _block_inputs(model, calib, index: int, during=None):
    _, blocks = find_decoder_blocks(model)
    seen: list[torch.Tensor] = []
    handle = blocks[index].register_forward_pre_hook(
        lambda _m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    try:
        if during is None:
            with torch.no_grad():
                model(input_ids=calib)
        else:
            during()
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibration_feeds_pruned_outputs_forward(method):
    model, calib = tiny_model("tiny-llama"), _calib(n=5)
    dense_input = _block_inputs(model, calib, 1)
    config = OneShotConfig(batch_size=2)  # mini-batches 2, 2, 1
    seen = _block_inputs(model, calib, 1, lambda: prune_oneshot(model, method, calib=calib, config=config,
                                                                progress=False))
    pruned_input = _block_inputs(model, calib, 1)
    assert seen.shape == dense_input.shape
    assert (seen - dense_input).abs().max() > 1e-3  # block 0 was pruned before block 1 saw its inputs
    torch.testing.assert_close(seen, pruned_input, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bert"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_methods_on_tiny_models(name, method):
    model = tiny_model(name)
    params = {id(p) for p in model.parameters()}
    calib = _calib()
    result = prune_oneshot(model, method, calib=calib, config=OneShotConfig(batch_size=4), progress=False)
    modules = dict(model.named_modules())
    assert result.masks and set(result.masks) == set(result.layers)
    assert not any("lm_head" in n or "embed" in n or n.endswith("wte") for n in result.masks)
    for layer, keep in result.masks.items():
        weight = weight_out_in(modules[layer])
        assert keep.shape == weight.shape and keep.dtype == torch.bool
        assert count_nm_violations(weight, P24) == 0
        assert torch.all(weight[~keep] == 0)
        assert int(keep.sum()) == keep.numel() // 2
        stats = result.layers[layer]
        assert stats.sparsity == 0.5
        if method != "magnitude":
            assert stats.calibration_sequences == 6 and stats.calibration_tokens == 6 * 24
            assert 0 < stats.reconstruction_error < 1
    if method == "sparsegpt":
        assert all(s.damping is not None and s.damping_retries == 0 for s in result.layers.values())
    assert {id(p) for p in model.parameters()} == params  # pruned in place, parameters kept
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib).logits).all()
    assert result.sparsity == 0.5 and result.seconds > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_sparsegpt_prunes_layers_with_one_input_as_one_stacked_weight(name, monkeypatch):
    """q/k/v (and gate/up) read one input, so their Hessians are equal and SparseGPT runs once on the
    stacked rows: the same masks and weights as pruning each layer alone (rows are independent)."""
    import sparseforge_compile.methods.sparsegpt as sparsegpt

    calib, config = _calib(), OneShotConfig(batch_size=3)
    grouped_model, alone_model = tiny_model(name), tiny_model(name)
    grouped = prune_oneshot(grouped_model, "sparsegpt", calib=calib, config=config, progress=False)
    monkeypatch.setattr(sparsegpt, "shared_input_groups", lambda names, collected: [[n] for n in names])
    alone = prune_oneshot(alone_model, "sparsegpt", calib=calib, config=config, progress=False)
    block0 = {n.rsplit(".", 1)[-1]: s.pruned_with for n, s in grouped.layers.items() if ".0." in n}
    if name == "tiny-llama":
        assert block0["q_proj"] == "model.layers.0.self_attn.k_proj,model.layers.0.self_attn.v_proj"
        assert block0["up_proj"] == "model.layers.0.mlp.gate_proj" and block0["down_proj"] == ""
    else:
        assert block0["q_proj"].count(",") == 1 and block0["fc1"] == block0["fc2"] == ""
    assert all(s.pruned_with == "" for s in alone.layers.values())
    weights = dict(alone_model.named_modules())
    for layer, module in grouped_model.named_modules():
        if layer in grouped.masks:
            assert torch.equal(grouped.masks[layer], alone.masks[layer]), layer
            torch.testing.assert_close(weight_out_in(module), weight_out_in(weights[layer]), rtol=1e-5, atol=1e-6)
            assert grouped.layers[layer].reconstruction_error == pytest.approx(
                alone.layers[layer].reconstruction_error, rel=1e-4)


def test_shared_input_groups_need_bitwise_equal_hessians():
    from sparseforge_compile.methods.sparsegpt import shared_input_groups

    x = torch.randn(2, 8, 16)
    same_a, same_b, other = _stats_of(x[0]), _stats_of(x[0]), _stats_of(x[0] + 1e-6)
    groups = shared_input_groups(["a", "o", "b"], {"a": same_a, "o": other, "b": same_b})
    assert groups == [["a", "b"], ["o"]]


def test_sparsegpt_beats_magnitude_on_a_tiny_model():
    # Block 0's first layer sees the dense model's inputs, so its errors compare like with like.
    calib, first = _calib(n=8, seqlen=32), "transformer.h.0.attn.c_attn"
    model = tiny_model("tiny-gpt2")
    layer = dict(model.named_modules())[first]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    x, w = torch.cat(seen), weight_out_in(layer).clone()
    magnitude_error = _output_error(w, w * magnitude_keep_mask(w, P24), x) / float(((x @ w.t()) ** 2).sum())
    result = prune_oneshot(model, "sparsegpt", calib=calib, progress=False)
    sparsegpt_error = _output_error(w, weight_out_in(layer), x) / float(((x @ w.t()) ** 2).sum())
    assert result.layers[first].reconstruction_error == pytest.approx(sparsegpt_error, rel=1e-3)
    assert sparsegpt_error < 0.8 * magnitude_error


def test_unstructured_and_subset_of_layers():
    model = tiny_model("tiny-opt")
    before = {n: p.clone() for n, p in model.named_parameters()}
    layers = ["model.decoder.layers.0.fc1", "model.decoder.layers.1.self_attn.q_proj"]
    result = prune_oneshot(model, "sparsegpt", pattern=None, sparsity=0.6, calib=_calib(), layers=layers,
                           progress=False)
    assert list(result.masks) == layers
    for keep in result.masks.values():
        assert int((~keep).sum()) == round(0.6 * keep.numel())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n in layers}


def _inputs_of(module, into: list):
    return module.register_forward_hook(lambda _m, args, _o: into.append(args[0].detach().clone()))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("name, tail_layer", [("tiny-bert", "cls.predictions.transform.dense"),
                                              ("tiny-llama", "lm_head")])
def test_layers_after_the_blocks_calibrate_on_the_pruned_blocks(method, name, tail_layer):
    """BERT's MLM-head transform (eligible, outside the encoder blocks) and an explicitly asked lm_head:
    calibrated by a whole-model pass after the blocks are pruned, so they see the pruned model's
    activations, and pruned exactly N:M like the rest."""
    model = tiny_model(name)
    if name == "tiny-llama":  # its lm_head is tied to the embeddings: untied, it may be pruned alone
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    layers = default_prune_layers(model) + [tail_layer]
    tail = model.get_submodule(tail_layer)
    seen: list = []
    handle = _inputs_of(tail, seen)
    result = prune_oneshot(model, method, calib=_calib(), layers=layers, progress=False)
    handle.remove()
    assert set(result.masks) == set(layers)
    assert count_nm_violations(weight_out_in(tail), P24) == 0
    assert result.layers[tail_layer].calibration_tokens == 6 * 24
    # One whole-model pass reached it (the pre-pass stops at block 0), and its inputs were the pruned
    # blocks' activations: a forward of the pruned model hands it the same.
    again: list = []
    handle = _inputs_of(tail, again)
    with torch.no_grad():
        model(input_ids=_calib())
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], again[0], rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_before_touching_the_model():
    model = tiny_model("tiny-llama")
    before = [p.clone() for p in model.parameters()]
    cases = [
        (dict(method="obs"), ValueError, "unknown one-shot method"),
        (dict(method="magnitude", sparsity=0.5), ValueError, "either pattern"),
        (dict(method="magnitude", pattern=None, sparsity=1.5), ValueError, r"ratio in \[0, 1\)"),
        (dict(method="wanda"), ValueError, "calibration token windows"),
        (dict(method="wanda", calib=torch.randn(2, 8)), ValueError, "token ids"),
        (dict(method="sparsegpt", calib=torch.full((2, 8), 999)), ValueError, "vocabulary has 256"),
        (dict(method="wanda", calib=torch.zeros(1, 4096, dtype=torch.long)), ValueError, "2048 positions"),
        (dict(method="magnitude", layers=["model.layers.0.mlp.nope"]), PruneError, "not a module"),
        (dict(method="magnitude", layers=["model.layers.0.input_layernorm"]), PruneError, "LlamaRMSNorm"),
        (dict(method="magnitude", pattern="3:5"), ValueError, "not divisible by M=5"),
        (dict(method="sparsegpt", calib=_calib(), layers=["lm_head"]), PruneError, "shares its weight with model"),
        (dict(method="sparsegpt", calib=_calib(), pattern="2:8", config=OneShotConfig(blocksize=4)), ValueError,
         "blocksize 4"),
    ]
    for kwargs, error, message in cases:
        kwargs = dict(kwargs)
        method = kwargs.pop("method")
        with pytest.raises(error, match=message):
            prune_oneshot(model, method, progress=False, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="percdamp"):
        OneShotConfig(percdamp=-1)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_cpu_model_calibrates_on_the_gpu_and_stays_home(method):
    """Blocks visit the GPU one at a time; the model, its masks and its pruned weights end on the CPU,
    the BERT head after the blocks included (its whole-model pass needs the model on the GPU: refused)."""
    model = tiny_model("tiny-llama")
    result = prune_oneshot(model, method, calib=_calib(), config=OneShotConfig(device="cuda"), progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(m.device.type == "cpu" for m in result.masks.values())
    bert = tiny_model("tiny-bert")
    with pytest.raises(PruneError, match="run after the decoder blocks"):
        prune_oneshot(bert, method, calib=_calib(), config=OneShotConfig(device="cuda"), progress=False,
                      layers=default_prune_layers(bert) + ["cls.predictions.transform.dense"])
