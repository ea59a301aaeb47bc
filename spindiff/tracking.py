"""Weights & Biases without ever blocking on the network.

``wandb.mode``:
  - ``auto`` (default): ``online`` only when an API key is configured
    (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host) and ``WANDB_MODE`` is not
    set; otherwise ``offline`` (runs land in ``<out>/wandb/offline-run-*``; upload later with
    ``wandb sync <out>/wandb/offline-run-*``);
  - ``offline``, ``online``, ``disabled``: as named. ``WANDB_MODE`` in the environment wins.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str = "auto") -> str:
    """The W&B mode to use: env ``WANDB_MODE`` > explicit mode > key-based auto."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env == "dryrun" else env
    if mode not in ("auto", "offline", "online", "disabled"):
        raise ValueError(f"wandb.mode={mode!r}: use auto, offline, online or disabled")
    if mode == "auto":
        return "online" if _api_key_configured() else "offline"
    return mode


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def init_run(wcfg: Any, out: str | os.PathLike, config: Any, name: Optional[str] = None,
             job_type: Optional[str] = None, group: Optional[str] = None):
    """Start a plain ``wandb`` run (for sampling/analysis/sweeps). Returns the run object
    (a disabled run when mode is disabled), which never touches the network offline."""
    import wandb

    mode = resolve_mode(wcfg.mode)
    Path(out).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=wcfg.project, entity=wcfg.entity, group=group or wcfg.group,
                      tags=list(wcfg.tags or []), config=_plain(config), dir=str(out), mode=mode,
                      name=name, job_type=job_type, reinit="finish_previous",
                      settings=wandb.Settings(silent=True, init_timeout=30))


def make_lightning_logger(wcfg: Any, out: str | os.PathLike, config: Any, name: Optional[str] = None):
    """A Lightning ``WandbLogger`` in the resolved mode, or ``False`` when disabled (Lightning
    then logs nothing to W&B; the CSV logger still records metrics)."""
    mode = resolve_mode(wcfg.mode)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    Path(out).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=wcfg.project, entity=wcfg.entity, group=wcfg.group,
                         tags=list(wcfg.tags or []), save_dir=str(out), mode=mode, name=name,
                         config=_plain(config))
    return logger
