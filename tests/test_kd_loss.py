"""The distillation loss: CE + tau^2 KL, and its per-source parts (teacher-sampled vs real rows)."""

import pytest
import torch
import torch.nn.functional as F

from sparseforge_compile.distill import kd_loss


def _logits(rows=5, length=9, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, length, vocab, generator=g, requires_grad=True)
    t = torch.randn(rows, length, vocab, generator=g)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    return s, t, ids


def _reference(s, t, ids, temperature):
    sv, tv, y = s[:, :-1].reshape(-1, s.shape[-1]), t[:, :-1].reshape(-1, t.shape[-1]), ids[:, 1:].reshape(-1)
    ce = F.cross_entropy(sv, y)
    kl = F.kl_div(F.log_softmax(sv / temperature, -1), F.log_softmax(tv / temperature, -1), log_target=True,
                  reduction="sum") / y.numel() * temperature**2
    return ce, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [4, 8192])
def test_loss_is_ce_plus_scaled_kl_in_any_chunking(temperature, chunk):
    s, t, ids = _logits()
    loss, parts = kd_loss(s, t, ids, temperature=temperature, ce_weight=0.5, kl_weight=2.0, chunk_tokens=chunk)
    ce, kl = _reference(s, t, ids, temperature)
    torch.testing.assert_close(loss, 0.5 * ce + 2.0 * kl)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["kl"], kl.detach())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_is_reported_but_not_trained_with_ce_weight_zero(temperature):
    s, t, ids = _logits()
    loss, parts = kd_loss(s, t, ids, temperature=temperature, ce_weight=0.0)
    ce, kl = _reference(s, t, ids, temperature)
    torch.testing.assert_close(parts["ce"], ce.detach())
    (g,) = torch.autograd.grad(loss, s)
    (g_kl,) = torch.autograd.grad(kl, s)
    torch.testing.assert_close(g, g_kl)


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # at 1 the teacher's CE reuses the KL's log-softmax
@pytest.mark.parametrize("chunk", [5, 8192])  # 5 tokens: a chunk straddles the sampled/real boundary
def test_parts_by_source_match_each_sub_batch(chunk, temperature):
    s, t, ids = _logits(rows=5)
    _, parts = kd_loss(s, t, ids, temperature=temperature, real_from_row=3, chunk_tokens=chunk)
    _, sampled = kd_loss(s[:3], t[:3], ids[:3], temperature=temperature)
    _, real = kd_loss(s[3:], t[3:], ids[3:], temperature=temperature)
    for key in ("ce", "kl"):
        torch.testing.assert_close(parts[f"{key}_sampled"], sampled[key])
        torch.testing.assert_close(parts[f"{key}_real"], real[key])
    teacher_ce = F.cross_entropy(t[3:, :-1].reshape(-1, t.shape[-1]), ids[3:, 1:].reshape(-1))
    torch.testing.assert_close(parts["teacher_ce_real"], teacher_ce)


def test_all_real_or_all_sampled_batches_report_one_source():
    s, t, ids = _logits(rows=4)
    _, real = kd_loss(s, t, ids, real_from_row=0)
    assert {"ce_real", "kl_real", "teacher_ce_real"} <= set(real) and "ce_sampled" not in real
    _, sampled = kd_loss(s, t, ids, real_from_row=4)
    assert {"ce_sampled", "kl_sampled"} <= set(sampled) and "ce_real" not in sampled
    assert "teacher_ce_real" not in sampled
    _, plain = kd_loss(s, t, ids)
    assert set(plain) == {"ce", "kl"}


@pytest.mark.parametrize("temperature, ce_weight, kl_weight", [(1.0, 0.0, 1.0), (2.0, 1.0, 1.0), (1.0, 1.0, 0.0),
                                                               (0.5, 0.3, 2.0)])
def test_fused_kd_loss_equals_kd_loss_and_its_gradient(temperature, ce_weight, kl_weight):
    from sparseforge_compile.distill import kd_loss
    from sparseforge_compile.fused_kd import fused_kd_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 9, 50, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, 9, 50, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (3, 9), generator=g)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref, ref_parts = kd_loss(s1, t, y, temperature=temperature, ce_weight=ce_weight, kl_weight=kl_weight,
                             chunk_tokens=7)
    got, parts = fused_kd_loss(s2, t, y, temperature=temperature, ce_weight=ce_weight, kl_weight=kl_weight,
                               chunk_tokens=7)
    torch.testing.assert_close(got, ref.to(got.dtype))
    torch.testing.assert_close(parts["ce"], ref_parts["ce"].to(parts["ce"].dtype))
    if kl_weight:
        torch.testing.assert_close(parts["kl"], ref_parts["kl"].to(parts["kl"].dtype))
    (ref * 1.7).backward()
    (got * 1.7).backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
    assert s2.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_fused_kd_loss_keeps_no_fp32_intermediates_for_the_backward():
    from sparseforge_compile.distill import kd_loss
    from sparseforge_compile.fused_kd import fused_kd_loss

    s = torch.randn(2, 33, 1000, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 33, 1000, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (2, 33))

    def saved_bytes(fn) -> int:
        total = []

        def pack(x):
            total.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return sum(total)

    fused = saved_bytes(lambda: fused_kd_loss(s, t, y, temperature=1.0, ce_weight=0.0))
    plain = saved_bytes(lambda: kd_loss(s, t, y, temperature=1.0, ce_weight=0.0))
    assert fused <= s[:, :-1].numel() * 2  # one bf16 logits-sized gradient
    assert plain > 3 * fused
