"""The static-cache greedy loop: the same tokens as Hugging Face ``generate(do_sample=False)`` on the hardened
model, on a model lowered to the compact decode layout, traced by Dynamo, with its speed reported."""

from __future__ import annotations

import pytest
import torch
from test_lowering import harden

from sparseforge_compile.errors import UsageError
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.lowering.sparse_linear import SparseLinear
from sparseforge_compile.models import ByteTokenizer, tiny_model
from sparseforge_compile.serving import Generator, greedy_generate


@pytest.fixture
def hardened():
    model = tiny_model("tiny-llama")
    harden(model)
    return model


def prompt(text: str = "The quick brown fox", batch: int = 1) -> torch.Tensor:
    ids = ByteTokenizer()(text, return_tensors="pt")["input_ids"]
    return ids.expand(batch, -1).contiguous()


def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_cache_greedy_equals_generate(hardened, batch):
    ids = prompt(batch=batch)
    want = hf_greedy(hardened, ids, 20)
    result = greedy_generate(hardened, ids, 20)
    assert torch.equal(result.sequences, want)
    assert not result.compiled and result.new_tokens == want.shape[1] - ids.shape[1]
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_static_cache_greedy_on_a_compact_lowered_model(hardened):
    ids = prompt("Sparse decode")
    want = hf_greedy(hardened, ids, 16)
    lower_model(hardened, config=DispatchConfig(layout="compact"))
    assert all(m.state.kernel == "decode" for m in hardened.modules() if isinstance(m, SparseLinear))
    assert torch.equal(greedy_generate(hardened, ids, 16).sequences, want)


def test_end_tokens_stop_and_pad_like_generate(hardened):
    ids = prompt(batch=2)
    free = greedy_generate(hardened, ids, 12).sequences
    eos = int(free[0, ids.shape[1] + 3])  # the 4th new token of a run without an end token
    with torch.no_grad():
        want = hardened.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=eos, pad_token_id=7)
    got = greedy_generate(hardened, ids, 12, eos_token_id=eos, pad_token_id=7).sequences
    assert torch.equal(got, want)


def test_the_decode_step_traces_under_dynamo_and_the_generator_runs_warm(hardened):
    ids = prompt()
    want = hf_greedy(hardened, ids, 6)
    torch._dynamo.reset()
    gen = Generator(hardened, max_cache_len=32, compile=True, backend="eager")
    first = gen.generate(ids, 6)
    again = gen.generate(ids, 6)  # the cache is reset and the compiled step reused
    assert first.compiled and torch.equal(first.sequences, want) and torch.equal(again.sequences, want)
    with pytest.raises(UsageError, match="exceed the static cache of 32: make the Generator with max_cache_len >= 40"):
        gen.generate(prompt("x" * 30), 10)
