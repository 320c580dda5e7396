"""Teacher sampling: shapes and determinism."""

import pytest
import torch

from sparseforge_compile.distill import sample_from_teacher
from sparseforge_compile.models import load_model


def test_samples_continue_the_prompts_and_repeat_for_a_seed():
    teacher = load_model("tiny-llama").model.eval()
    prompts = torch.randint(0, 256, (6, 4), generator=torch.Generator().manual_seed(0))
    a = sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=3)
    b = sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=3)
    assert a.shape == (6, 20) and torch.equal(a[:, :4], prompts) and torch.equal(a, b)
    assert not torch.equal(a, sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=4))


def test_the_time_limit_starts_no_batch_that_would_end_past_it(monkeypatch):
    """Each batch 'takes' 10 s of a fake clock: with a 25-s limit, batches 1 and 2 run (the third
    would end at 30 s), where checking only the elapsed time would start a third and overrun."""
    from sparseforge_compile import distill

    clock = {"now": 0.0}
    teacher = load_model("tiny-llama").model.eval()
    real_forward = teacher.forward

    def slow_forward(*args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            clock["now"] += 10.0  # the prompt's forward: once per batch
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", slow_forward)
    monkeypatch.setattr(distill.time, "perf_counter", lambda: clock["now"])
    prompts = torch.randint(0, 256, (10, 4), generator=torch.Generator().manual_seed(0))
    rows = sample_from_teacher(teacher, prompts, 8, batch_size=2, time_limit_s=25.0, decode="forward")
    assert rows.shape == (4, 8)


def test_sample_batch_is_small_on_the_cpu():
    from sparseforge_compile.distill import sample_batch_size

    assert sample_batch_size(load_model("tiny-llama").model, 512) == 16


def test_sample_batch_does_not_follow_small_memory_differences():
    """Two runs side by side whose tensors differ by a few hundred MB sample the same rows, in steps of
    SAMPLE_BATCH_STEP, never 0."""
    from sparseforge_compile.distill import MAX_SAMPLE_BATCH, SAMPLE_BATCH_STEP, rows_for_memory

    per_row = 14_550_000  # SmolLM2, 512 positions, bf16 KV cache + decode logits
    h200 = 150_100_000_000 - 1_000_000_000  # its memory less SmolLM2's student and teacher
    assert rows_for_memory(h200, per_row) == rows_for_memory(h200 - 3_000_000_000, per_row) == MAX_SAMPLE_BATCH
    assert rows_for_memory(100_000_000_000, per_row) == rows_for_memory(100_300_000_000, per_row)
    assert rows_for_memory(100_000_000_000, per_row) % SAMPLE_BATCH_STEP == 0
    assert rows_for_memory(3 * per_row, per_row) == 1  # tiny memory: exact, never 0
    assert rows_for_memory(0, per_row) == 1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_static_cache_decoder_gives_the_models_logits_and_samples(name):
    """Step-by-step decode over the preallocated cache (grouped-query heads, Qwen2's q/k/v biases)
    equals the model's own forward, and sampling draws the same tokens as the DynamicCache loop."""
    from sparseforge_compile.distill import StaticKVDecoder

    model = load_model(name).model.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised
    assert StaticKVDecoder.supports(model, 40)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        decoder = StaticKVDecoder(model, 3, 20)
        got = torch.stack([decoder.step(ids[:, p : p + 1], p) for p in range(12)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prompts = torch.randint(0, 256, (6, 4), generator=torch.Generator().manual_seed(0))
    hf = sample_from_teacher(model, prompts, 40, batch_size=4, seed=3, decode="forward")
    static = sample_from_teacher(model, prompts, 40, batch_size=4, seed=3, decode="static")
    assert torch.equal(hf, static)
    # auto: the static decoder on the CPU (graphs on CUDA, GPU test below)
    assert torch.equal(sample_from_teacher(model, prompts, 40, batch_size=4, seed=3), static)


def test_other_families_sample_through_the_models_forward():
    from sparseforge_compile.distill import StaticKVDecoder

    assert not StaticKVDecoder.supports(load_model("tiny-gpt2").model, 40)


def test_bucketed_steps_equal_prefix_steps():
    """The graph-ready step (device position, attention over a bucket of slots masked past the
    position) gives the prefix step's logits, also after the cache held another batch."""
    from sparseforge_compile.distill import StaticKVDecoder

    model = load_model("tiny-llama").model.eval()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix, bucketed = StaticKVDecoder(model, 3, 16), StaticKVDecoder(model, 3, 16)
        for p in range(12):  # a previous batch leaves stale (finite) values behind
            bucketed.bucket_step(ids.flip(0)[:, p : p + 1], torch.tensor(p), 16)
        for p in range(12):
            want = prefix.step(ids[:, p : p + 1], p)
            got = bucketed.bucket_step(ids[:, p : p + 1], torch.tensor(p), 8 if p < 8 else 16)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_decode_samples_what_the_static_decoder_samples():
    model = load_model("tiny-llama", device="cuda").model.eval()
    prompts = torch.randint(0, 256, (8, 4), generator=torch.Generator().manual_seed(0))
    static = sample_from_teacher(model, prompts, 100, batch_size=4, seed=3, decode="static")
    graphs = sample_from_teacher(model, prompts, 100, batch_size=4, seed=3, decode="graphs")
    assert (static == graphs).float().mean() > 0.98  # fp32 reductions may differ in the last bits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_maskless_attention_skips_the_packed_sequence_sync_and_keeps_the_logits(name, monkeypatch):
    import transformers.masking_utils as masking_utils

    from sparseforge_compile.distill import MasklessCausalAttention
    from sparseforge_compile.evaluate import logits_of

    checks = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: checks.append(1) or original(p))
    model = load_model(name).model
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    logits_of(model, ids)
    assert checks, "the model's own forward checks for packed sequences (the host sync this avoids)"
    attention = MasklessCausalAttention(model, ids)
    assert attention.applied and attention.reason is None
    checks.clear()
    other = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    out = logits_of(model, other)
    assert not checks
    attention.restore()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out, logits_of(model, other), rtol=0, atol=0)
    assert checks  # restored: the model's own path again


def test_maskless_attention_leaves_models_that_need_their_mask():
    from sparseforge_compile.distill import MasklessCausalAttention

    ids = torch.randint(0, 256, (2, 16))
    model = load_model("tiny-qwen2").model
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    attention = MasklessCausalAttention(model, ids)
    assert not attention.applied and "sliding-window" in attention.reason
    assert model.config._attn_implementation == "sdpa"
    model = load_model("tiny-llama").model
    model.set_attn_implementation("eager")
    attention = MasklessCausalAttention(model, ids)
    assert not attention.applied and "'eager'" in attention.reason
    assert model.config._attn_implementation == "eager"
    assert MasklessCausalAttention(torch.nn.Linear(4, 4), ids).reason == "not a Hugging Face model"


def test_maskless_attention_keeps_the_mask_where_the_logits_would_change(monkeypatch):
    from transformers import AttentionInterface

    from sparseforge_compile.distill import MasklessCausalAttention
    from sparseforge_compile.evaluate import logits_of

    register = AttentionInterface.register

    def perturbed(name, fn):  # an attention that is not the model's: its logits differ
        register(name, lambda *args, **kwargs: (fn(*args, **kwargs)[0] * 0.5, None))

    monkeypatch.setattr(AttentionInterface, "register", perturbed)
    model = load_model("tiny-llama").model
    ids = torch.randint(0, 256, (2, 16))
    ref = logits_of(model, ids)
    attention = MasklessCausalAttention(model, ids)
    assert not attention.applied and "logits changed" in attention.reason
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits_of(model, ids), ref, rtol=0, atol=0)
