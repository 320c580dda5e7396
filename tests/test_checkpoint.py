"""Sparse checkpoints: index packing, N:M compression, save/load round trips in both formats,
integrity errors, atomic writes, plain-transformers loading, generation on the lowered model, CLI."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge_compile import checkpoint as ck
from sparseforge_compile.checkpoint import saving
from sparseforge_compile.errors import CheckpointError
from sparseforge_compile.masks import NMPattern, nm_mask
from sparseforge_compile.models import ByteTokenizer, tiny_model

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)]


def harden(model: nn.Module, pattern: str = "2:4") -> nn.Module:
    """Stand-in for the graph passes: every Linear/Conv1D but lm_head zeroed to an exact N:M magnitude mask."""
    nm = NMPattern.parse(pattern)
    layers = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            transposed = type(module).__name__ == "Conv1D"
            if not (isinstance(module, nn.Linear) or transposed) or name == "lm_head":
                continue
            grouped = module.weight.t() if transposed else module.weight
            grouped.masked_fill_(~nm_mask(grouped.abs(), nm), 0.0)
            layers[name] = {"pattern": pattern, "transposed": transposed, "method": "magnitude"}
    model._sparseforge_layers = layers
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def llama():
    return harden(tiny_model("tiny-llama"))


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama-2of4"
    report = ck.save(llama, path, tokenizer=ByteTokenizer(), provenance={"method": "magnitude"})
    return path, report


PROMPT = torch.tensor([list(b"The sparse model says:")])


# ------------------------------------------------------------------------------ packing

@settings(max_examples=60, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), groups=st.integers(0, 40), data=st.data())
def test_pack_unpack_round_trip(pattern, groups, data):
    b = ck.index_bits(pattern.m)
    values = torch.tensor(data.draw(st.lists(st.integers(0, (1 << b) - 1), min_size=groups * pattern.n,
                                             max_size=groups * pattern.n)), dtype=torch.uint8)
    packed = ck.pack_bits(values, b)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(values.numel() * b / 8)
    assert torch.equal(ck.unpack_bits(packed, b, values.numel()), values)


def test_index_bits_and_two_bit_layout():
    assert [ck.index_bits(m) for m in (1, 2, 3, 4, 5, 8, 16)] == [0, 1, 2, 2, 3, 3, 4]
    # 2-bit positions pack 4 per byte, the first in the lowest bits.
    assert ck.pack_bits(torch.tensor([0, 1, 2, 3, 3], dtype=torch.uint8), 2).tolist() == [0b11100100, 0b11]
    with pytest.raises(ValueError, match="expected 2 uint8 bytes"):
        ck.unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), rows=st.integers(1, 6), groups=st.integers(1, 6),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_compress_decompress_round_trip(pattern, rows, groups, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, groups * pattern.m, generator=gen).to(dtype)
    dense[torch.rand(dense.shape, generator=gen) < 0.2] = 0.0  # groups with fewer than N nonzeros too
    weight = dense.masked_fill(~nm_mask(dense.abs(), pattern), 0.0)
    packed = ck.compress_nm(weight, pattern)
    assert packed.values.shape == (rows, groups * pattern.n) and packed.values.dtype == dtype
    assert packed.indices.numel() == math.ceil(rows * groups * pattern.n * ck.index_bits(pattern.m) / 8)
    assert torch.equal(bits(ck.decompress_nm(packed)), bits(weight))


@st.composite
def nm_patterns(draw) -> NMPattern:
    m = draw(st.integers(2, 8))
    return NMPattern(draw(st.integers(1, m - 1)), m)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=60, deadline=None)
@given(pattern=nm_patterns(), count=st.integers(0, 70), data=st.data())
def test_pack_unpack_round_trip_any_m(pattern, count, data):
    b = ck.index_bits(pattern.m)
    values = torch.tensor(data.draw(st.lists(st.integers(0, pattern.m - 1), min_size=count, max_size=count)),
                          dtype=torch.uint8)
    packed = ck.pack_bits(values, b)
    assert packed.numel() == math.ceil(count * b / 8)
    assert torch.equal(ck.unpack_bits(packed, b, count), values)


@settings(max_examples=60, deadline=None)
@given(pattern=nm_patterns(), rows=st.integers(1, 5), groups=st.integers(1, 5), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), zeros=st.floats(0.0, 1.0))
def test_compress_decompress_round_trip_any_pattern_and_dtype(pattern, rows, groups, seed, dtype, zeros):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, groups * pattern.m, generator=gen).to(dtype)
    dense[torch.rand(dense.shape, generator=gen) < zeros] = 0.0  # groups with fewer than N nonzeros too
    weight = dense.masked_fill(~nm_mask(dense.abs(), pattern), 0.0)
    packed = ck.compress_nm(weight, pattern)
    assert packed.values.shape == (rows, groups * pattern.n) and packed.values.dtype == dtype
    assert torch.equal(bits(ck.decompress_nm(packed)), bits(weight))


def test_compress_refuses_non_nm_weight():
    with pytest.raises(CheckpointError, match=r"layer\.weight \(4, 8\): 8 groups .* not 2:4 sparse"):
        ck.compress_nm(torch.ones(4, 8), NMPattern(2, 4), "layer.weight")


def test_pruned_negative_zero_comes_back_positive():
    weight = torch.tensor([[1.0, -0.0, 2.0, 0.0]])
    restored = ck.decompress_nm(ck.compress_nm(weight, NMPattern(2, 4)))
    assert torch.equal(restored, weight) and restored[0, 1].item() == 0.0 and not restored.signbit().any()


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("fmt", ["hf", "compact"])
def test_round_trip_bit_identical_weights_and_logits(llama, saved, fmt):
    path, _ = saved
    loaded = ck.load(path, format=fmt, lower=False)
    ref, got = llama.state_dict(), loaded.model.state_dict()
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(bits(ref[name]), bits(got[name])), name
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tied embeddings survive
    with torch.no_grad():
        assert torch.equal(llama(PROMPT).logits, loaded.model(PROMPT).logits)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.model._sparseforge_layers.keys() == llama._sparseforge_layers.keys()


@pytest.mark.parametrize("fmt", ["hf", "compact"])
def test_transposed_conv1d_round_trip(tmp_path, fmt):
    gpt2 = harden(tiny_model("tiny-gpt2"))
    ck.save(gpt2, tmp_path / "gpt2", formats=[fmt])
    loaded = ck.load(tmp_path / "gpt2", lower=False).model
    for name, tensor in gpt2.state_dict().items():
        assert torch.equal(bits(tensor), bits(loaded.state_dict()[name])), name


def test_index_records_pattern_and_provenance(saved):
    path, report = saved
    manifest = ck.read_manifest(path)
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["pattern"] == "2:4" and layer["method"] == "magnitude" and layer["density"] == 0.5
    assert layer["shape"] == [64, 128] and layer["transposed"] is False
    assert manifest["tool_version"] and manifest["created"] and manifest["dtype"] == "float32"
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert report.layers == 14 and set(report.format_bytes) == {"hf", "compact"}


@pytest.mark.parametrize(("dtype", "ratio"), [(torch.float32, 0.53125), (torch.bfloat16, 0.5625)])
def test_compact_pruned_bytes_ratio(tmp_path, dtype, ratio):
    model = harden(tiny_model("tiny-llama").to(dtype))
    report = ck.save(model, tmp_path / "m", formats=["compact"])
    assert report.pruned_ratio == ratio <= 0.6
    assert report.format_bytes["compact"] < (tmp_path / "m" / ck.COMPACT_NAME).stat().st_size + 1
    assert ck.read_manifest(tmp_path / "m")["dtype"] == str(dtype).removeprefix("torch.")


def test_plain_transformers_loads_hf_layout_without_us(llama, saved, tmp_path):
    path, _ = saved
    out = tmp_path / "logits.safetensors"
    script = (
        "import sys; sys.modules['sparseforge_compile'] = None\n"  # any import of us fails
        "import torch; from transformers import AutoModelForCausalLM; from safetensors.torch import save_file\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert m.lm_head.weight is m.model.embed_tokens.weight\n"
        "x = torch.tensor([list(b'The sparse model says:')])\n"
        "with torch.no_grad(): save_file({'logits': m(x).logits.contiguous()}, sys.argv[2])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    with torch.no_grad():
        assert torch.equal(load_file(str(out))["logits"], llama(PROMPT).logits)


# ------------------------------------------------------------------------------ integrity

def _data_offset(path, tensor):
    layout = ck.safetensors_layout(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    start, end = layout[tensor]["data_offsets"]
    return 8 + header_len + (start + end) // 2


@pytest.mark.parametrize(("fmt", "file", "tensor"), [
    ("compact", ck.COMPACT_NAME, "model.layers.1.mlp.up_proj.weight.nm_indices"),
    ("compact", ck.COMPACT_NAME, "model.norm.weight"),
    ("hf", "model.safetensors", "model.layers.0.self_attn.q_proj.weight"),
])
def test_flipped_byte_is_an_error_naming_the_tensor(llama, tmp_path, fmt, file, tensor):
    ck.save(llama, tmp_path / "m", formats=[fmt])
    target = tmp_path / "m" / file
    raw = bytearray(target.read_bytes())
    raw[_data_offset(target, tensor)] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"tensor '{tensor}' fails its sha256 check"):
        ck.load(tmp_path / "m", lower=False)


def test_truncated_file_is_an_error_naming_a_cut_tensor(llama, tmp_path):
    ck.save(llama, tmp_path / "m", formats=["compact"])
    target = tmp_path / "m" / ck.COMPACT_NAME
    layout = ck.safetensors_layout(target)
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match="truncated: tensor '") as err:
        ck.load(tmp_path / "m", lower=False)
    named = str(err.value).split("'")[1]
    data_start = size - max(info["data_offsets"][1] for info in layout.values())
    assert data_start + layout[named]["data_offsets"][1] > size // 2


def test_missing_index_is_a_clear_error(llama, tmp_path):
    ck.save(llama, tmp_path / "m")
    (tmp_path / "m" / ck.MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="has no sparseforge.json: not a sparseforge checkpoint"):
        ck.load(tmp_path / "m")


def test_altered_index_is_a_clear_error(llama, tmp_path):
    ck.save(llama, tmp_path / "m")
    index = tmp_path / "m" / ck.MANIFEST_NAME
    manifest = json.loads(index.read_text())
    manifest["layers"]["model.layers.0.mlp.up_proj"]["pattern"] = "4:2"
    index.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\.mlp\.up_proj': invalid N:M pattern 4:2"):
        ck.load(tmp_path / "m")
    index.write_text("{ not json")
    with pytest.raises(CheckpointError, match="sparseforge.json is corrupt"):
        ck.load(tmp_path / "m")


# ------------------------------------------------------------------------------- saving errors

def test_non_nm_weight_is_refused_and_nothing_is_written(tmp_path):
    model = harden(tiny_model("tiny-llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # dense again
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.1\.mlp\.up_proj' \(128, 64\): .* not 2:4"):
        ck.save(model, tmp_path / "m", formats=["compact"])
    assert list(tmp_path.iterdir()) == []


def test_no_recorded_layers_needs_layers_or_pattern(tmp_path):
    model = tiny_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.masked_fill_(
            ~nm_mask(model.model.layers[0].mlp.up_proj.weight.abs(), NMPattern(2, 4)), 0.0)
    with pytest.raises(CheckpointError, match="records no N:M layers"):
        ck.save(model, tmp_path / "m")
    report = ck.save(model, tmp_path / "m", pattern="2:4", formats=["compact"])
    assert report.layers == 1
    assert list(ck.read_manifest(tmp_path / "m")["layers"]) == ["model.layers.0.mlp.up_proj"]


def test_tied_pruned_weight_is_refused_for_compact(tmp_path):
    model = harden(tiny_model("tiny-llama"))
    model._sparseforge_layers = {"lm_head": {"pattern": "2:4"}}
    with torch.no_grad():
        model.lm_head.weight.masked_fill_(~nm_mask(model.lm_head.weight.abs(), NMPattern(2, 4)), 0.0)
    with pytest.raises(CheckpointError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        ck.save(model, tmp_path / "m", formats=["compact"])


def test_gguf_quantizer_left_on_a_dequantized_model_is_hidden(llama, tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    config = GgufConfig()
    llama.config.quantization_config, llama.hf_quantizer = config, GgufHfQuantizer(config)
    try:
        ck.save(llama, tmp_path / "m", formats=["hf"])
        assert llama.config.quantization_config is config  # restored afterwards
    finally:
        del llama.config.quantization_config
        llama.hf_quantizer = None
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert torch.equal(ck.load(tmp_path / "m", lower=False).model.lm_head.weight, llama.lm_head.weight)


# ------------------------------------------------------------------------------- atomic writes

def test_failed_save_keeps_the_old_checkpoint(llama, tmp_path, monkeypatch):
    path = tmp_path / "m"
    ck.save(llama, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_save_compact", explode)
    with pytest.raises(OSError, match="disk full"):
        ck.save(llama, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left


def test_resave_replaces_files_and_drops_stale_ones(llama, tmp_path):
    path = tmp_path / "m"
    ck.save(llama, path)
    (path / "report.json").write_text("{}")  # a file of the user's, not the checkpoint's
    ck.save(llama, path, formats=["hf"], overwrite=True)
    names = {p.name for p in path.iterdir()}
    assert ck.COMPACT_NAME not in names and {"report.json", "model.safetensors", ck.MANIFEST_NAME} <= names
    assert list(ck.read_manifest(path)["formats"]) == ["hf"]


def test_refuses_to_overwrite_another_model(llama, tmp_path):
    llama.save_pretrained(tmp_path / "dense")
    before = {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()}
    with pytest.raises(CheckpointError, match="refusing to overwrite .*dense/(config.json|model.safetensors): no "
                                              "earlier sparseforge save wrote it"):
        ck.save(llama, tmp_path / "dense")
    assert {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()} == before


def test_saves_beside_the_pruning_run_files(llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "teacher_samples.safetensors").write_bytes(b"not ours")
    (out / "metrics.jsonl").write_text("{}\n")
    ck.save(llama, out, provenance={"method": "magnitude", "model": "tiny-llama", "out": out})
    assert (out / "teacher_samples.safetensors").read_bytes() == b"not ours"
    manifest = ck.read_manifest(out)
    assert manifest["source_model"] == "tiny-llama" and manifest["provenance"]["out"] == str(out)
    assert "teacher_samples.safetensors" not in manifest["files"]


# ------------------------------------------------------------------- lowered model and inference

@pytest.mark.parametrize("fmt", ["hf", "compact"])
def test_lowered_load_gives_identical_logits_and_greedy_generation(llama, saved, fmt):
    path, _ = saved
    model = ck.load(path, format=fmt).model
    assert any(type(m).__name__ == "SparseLinear" for m in model.modules())
    assert not any(isinstance(m, nn.Linear) and n in llama._sparseforge_layers for n, m in model.named_modules())
    kwargs = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(llama(PROMPT).logits, model(PROMPT).logits)
        assert torch.equal(llama.generate(PROMPT, **kwargs), model.generate(PROMPT, **kwargs))


def test_load_model_delegates_to_checkpoint_load(saved):
    from sparseforge_compile.models import load_model

    path, _ = saved
    loaded = load_model(str(path), dtype="fp32")
    assert "compact" in loaded.source and isinstance(loaded.tokenizer, ByteTokenizer)
    assert any(type(m).__name__ == "SparseLinear" for m in loaded.model.modules())


def test_cli_generate_prints_text_and_speed(saved, capsys):
    from sparseforge_compile.cli import main

    path, _ = saved
    code = main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("Hello")
    assert "tokens/s" in out.splitlines()[-1]
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--chat", "--device", "cpu"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_a_lowered_model_saves_again(llama, saved, tmp_path):
    path, _ = saved
    lowered = ck.load(path).model
    ck.save(lowered, tmp_path / "again")
    for fmt in ("hf", "compact"):
        reloaded = ck.load(tmp_path / "again", format=fmt, lower=False).model
        for name, tensor in llama.state_dict().items():
            assert torch.equal(bits(tensor), bits(reloaded.state_dict()[name])), (fmt, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lowered_generate_on_the_gpu(llama, saved):
    """The compact checkpoint loads onto the GPU as cuSPARSELt layers and Hugging Face generate() runs."""
    path, _ = saved
    from sparseforge_compile.lowering.dispatch import DispatchConfig

    # keep_dense="never": the tiny shapes would dispatch dense and stay nn.Linear; this tests the kernel
    lowered = ck.load(path, device="cuda", dtype=torch.bfloat16, dispatch=DispatchConfig(keep_dense="never")).model
    sparse = [m for m in lowered.modules() if type(m).__name__ == "SparseLinear"]
    assert sparse and all(m.state.kernel == "cusparselt" for m in sparse)
    reference = copy.deepcopy(llama).to("cuda", torch.bfloat16)
    prompt = PROMPT.cuda()
    with torch.no_grad():
        got, want = lowered(prompt).logits.float(), reference(prompt).logits.float()
        assert (got - want).norm() / want.norm() < 2e-2  # bf16 tensor-core sums in another order
        out = lowered.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert out.shape == (1, prompt.shape[1] + 16) and out.is_cuda


def test_load_with_the_compact_layout_holds_the_decode_layout_and_generates_alike(llama, saved):
    from sparseforge_compile.lowering.dispatch import DispatchConfig
    from sparseforge_compile.serving import greedy_generate

    path, _ = saved
    model = ck.load(path, dispatch=DispatchConfig(layout="compact")).model
    sparse = [m for m in model.modules() if type(m).__name__ == "SparseLinear"]
    assert sparse and all(m.state.kernel == "decode" and m.dense_weight is None for m in sparse)
    for name in llama._sparseforge_layers:
        assert torch.equal(model.get_submodule(name).materialize_weight(), llama.get_submodule(name).weight)
    kwargs = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(llama(PROMPT).logits, model(PROMPT).logits)
        want = llama.generate(PROMPT, **kwargs)
    assert torch.equal(greedy_generate(model, PROMPT, 16, pad_token_id=0).sequences, want)


def test_cli_generate_with_a_layout_and_refuses_it_for_dense_models(saved, capsys):
    from sparseforge_compile.cli import main

    path, _ = saved
    code = main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "6", "--device", "cpu",
                 "--layout", "compact"])
    last = capsys.readouterr().out.splitlines()[-1]
    assert code == 0 and "sparse layers: decode)" in last and "prefill" in last and last.endswith("tokens/s")
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Hi", "--layout", "compact", "--device", "cpu"]) == 2
    assert "applies to sparse checkpoints" in capsys.readouterr().err
