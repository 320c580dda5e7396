"""The memory plan against the tensors the loop really holds, on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from sparseforge_compile.layers import default_prune_layers
from sparseforge_compile.masks import MaskState, NMPattern
from sparseforge_compile.memory_plan import (
    GIB,
    ModelShape,
    activation_bytes_per_token,
    choose,
    format_plan,
    named_shape,
    plan_modes,
)
from sparseforge_compile.models import tiny_model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama")


def test_state_parts_equal_the_summed_tensor_sizes(llama):
    model = copy.deepcopy(llama)
    shape = ModelShape.of(model)
    plan = plan_modes(shape, gpus=1, batch=2, seqlen=16)["ddp"].parts
    params = list(dict.fromkeys(model.parameters()))
    assert plan["weights"] == nbytes(params)
    ids = torch.randint(0, 256, (2, 16))
    model(ids).logits.float().logsumexp(-1).mean().backward()
    assert plan["gradients"] == nbytes(p.grad for p in params if p.grad is not None)
    opt = torch.optim.AdamW(params)
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert plan["optimizer"] == nbytes(moments)
    teacher = copy.deepcopy(llama).to(torch.bfloat16)
    assert plan["teacher"] == nbytes(dict.fromkeys(teacher.parameters()))
    held = 0
    for name in default_prune_layers(model):
        weight = model.get_submodule(name).weight
        state = MaskState(weight.shape, NMPattern(2, 4))
        state.set_schedule(0.3, 0.5)  # hardening: the soft and the hard mask both cached
        state.make_mask()
        state.hard_mask()
        caches = [t for t in (state._hard, state._hard_f, state._thr, state._margin) if t is not None]
        held += nbytes([*state.parameters(), state.importance, state.grad_ema, *caches])
        held += weight.numel()  # the bool warm-start mask
    assert plan["mask_state"] == pytest.approx(held, rel=0.01)


def test_the_fisher_probe_buffers_are_counted(llama):
    """The plan counts three fp32 vocab-sized buffers for the probe; it makes at least that many."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparseforge_compile.anneal import AnnealConfig
    from sparseforge_compile.anneal.evidence import FisherEvidence

    shape = ModelShape.of(llama)
    batch, seqlen, hidden = 2, 16, 64
    plan = plan_modes(shape, gpus=1, batch=batch, seqlen=seqlen)["ddp"].parts
    per_buffer = batch * seqlen * shape.vocab * 4
    assert plan["fisher_probe"] == 3 * per_buffer
    ms = MaskState((shape.vocab, hidden), NMPattern(2, 4), "head")
    ms.collecting = True
    head = torch.randn(shape.vocab, hidden) * ms.make_mask()
    logits = torch.randn(batch, seqlen + 1, hidden) @ head.t()  # the probe predicts seqlen tokens of seqlen + 1

    class Buffers(TorchDispatchMode):
        made: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() * 4 == per_buffer:
                self.made.append(out.numel() * 4)
            return out
    with Buffers() as seen:
        FisherEvidence(AnnealConfig(), {"head": ms}).probe_step(0, logits)
    assert len(seen.made) >= 3


def test_activation_estimate_is_near_what_autograd_saves(llama):
    model = copy.deepcopy(llama)
    shape = ModelShape.of(model)
    batch, seqlen = 2, 64
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()  # a tensor saved twice is held once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 256, (batch, seqlen))).logits.sum()
    estimate = batch * seqlen * activation_bytes_per_token(shape, act_bytes=4)
    assert 0.6 < estimate / sum(saved.values()) < 1.5


def test_fsdp2_shards_what_ddp_replicates(llama):
    plans = plan_modes(ModelShape.of(llama), gpus=4, batch=2, seqlen=16)
    for part in ("weights", "gradients", "optimizer", "mask_state", "teacher"):
        assert plans["fsdp2"].parts[part] == -(-plans["ddp"].parts[part] // 4)
    assert plans["fsdp2"].parts["activations"] == plans["ddp"].parts["activations"]
    assert choose(plans, 80 * GIB) == "ddp"


def test_a_7b_shaped_model_needs_fsdp2_and_enough_gpus():
    shape = named_shape("llama-7b-shape")
    assert 6.6e9 < shape.params < 6.8e9 and shape.layers == 32
    one = plan_modes(shape, gpus=1, batch=4, seqlen=2048)
    with pytest.raises(ValueError, match="needs .* GiB per GPU under FSDP2"):
        choose(one, 80 * GIB)
    eight = plan_modes(shape, gpus=8, batch=1, seqlen=2048)
    assert choose(eight, 80 * GIB) == "fsdp2"
    assert sum(eight["ddp"].parts[k] for k in ("weights", "gradients", "optimizer")) > 100e9  # ~107 GB
    text = format_plan(eight, "fsdp2", 80 * GIB)
    assert "mode: fsdp2" in text and "mask_state" in text and "--parallel fsdp2" in text


@pytest.mark.parametrize("name,gpus,mode", [("llama-7b-shape", 8, "fsdp2"), ("llama-7b-shape", 16, "fsdp2")])
def test_the_fitting_batch_is_the_largest_multiple_of_8_in_the_headroom(name, gpus, mode):
    from sparseforge_compile.memory_plan import BATCH_HEADROOM, fitting_batch

    shape, gpu = named_shape(name), 80 * GIB
    batch = fitting_batch(shape, gpus, 512, gpu, mode)
    assert batch % 8 == 0 and 8 <= batch < 256
    assert plan_modes(shape, gpus, batch, 512)[mode].total <= BATCH_HEADROOM * gpu
    assert plan_modes(shape, gpus, batch + 8, 512)[mode].total > BATCH_HEADROOM * gpu
    assert fitting_batch(shape, 1, 512, gpu, "ddp") == 0  # a 7B replica fits no 80 GiB GPU
    assert fitting_batch(ModelShape.of(tiny_model("tiny-llama")), 1, 512, gpu, "ddp") == 256  # the cap


def test_auto_batch_sizes_the_gpu_and_is_32_on_the_cpu(llama, monkeypatch):
    from types import SimpleNamespace

    from sparseforge_compile.memory_plan import auto_batch, fitting_batch

    cpu = torch.device("cpu")
    assert auto_batch(llama, cpu, 1, 512, "auto") == 32
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2 * GIB))
    gpu = torch.device("cuda")
    shape = ModelShape.of(llama)
    assert auto_batch(llama, gpu, 1, 4096, "auto") == fitting_batch(shape, 1, 4096, 2 * GIB, "ddp") > 0
    # Sharded runs are sized by the sharded plan; a sequence too long for the GPU is one line naming the fix.
    assert auto_batch(llama, gpu, 2, 4096, "fsdp2") == fitting_batch(shape, 2, 4096, 2 * GIB, "fsdp2")
    with pytest.raises(ValueError, match="not even 8 sequences of 10000000 tokens fit a 2 GiB GPU"):
        auto_batch(llama, gpu, 1, 10_000_000, "ddp")


def test_a_shaped_model_keeps_its_widths_with_fewer_blocks():
    from sparseforge_compile.errors import ModelLoadError
    from sparseforge_compile.models import shaped_config

    full, eight = named_shape("llama-7b-shape"), named_shape("llama-7b-shape:8")
    assert (full.layers, eight.layers) == (32, 8) and full.block_params == eight.block_params
    assert full.params - eight.params == 24 * full.block_params and round(full.params / 1e9, 2) == 6.74
    assert shaped_config("tiny-llama") is None
    with pytest.raises(ModelLoadError, match="write llama-7b-shape:L with L >= 1"):
        shaped_config("llama-7b-shape:0")
