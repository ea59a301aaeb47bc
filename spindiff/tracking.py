"""Weights & Biases without ever blocking on the network: one way to start, log and finish a run.

``wandb.mode``:
  - ``auto`` (default): ``online`` only when an API key is configured
    (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host) and ``WANDB_MODE`` is not
    set; otherwise ``offline`` (runs land in ``<out>/wandb/offline-run-*``; upload later with
    ``wandb sync <out>/wandb/offline-run-*``);
  - ``offline``, ``online``, ``disabled``: as named. ``WANDB_MODE`` in the environment wins.

Every entry point goes through the same three calls: :func:`start_run` (``None`` when disabled),
:func:`log_metrics` (finite numbers only, also into the run summary), :func:`finish_run`;
:func:`log_once` does all three for a one-shot record (sample, evaluate, each sweep point).
Training wraps the run from :func:`start_run` in Lightning's ``WandbLogger``
(:func:`make_lightning_logger`), so W&B's own console chatter stays off everywhere.
"""
from __future__ import annotations

import math
import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from spindiff.config import ConfigError

MODES = ("auto", "offline", "online", "disabled")


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
    if mode not in MODES:
        raise ConfigError(f"wandb.mode={mode!r}: use auto, offline, online or disabled")
    if mode == "auto":
        return "online" if _api_key_configured() else "offline"
    return mode


def start_run(wcfg: DictConfig, out: str | os.PathLike, config: DictConfig, name: Optional[str] = None,
              job_type: Optional[str] = None, group: Optional[str] = None, run_id: Optional[str] = None):
    """Start a W&B run in the resolved mode under ``<out>/wandb``; ``None`` when disabled. ``wcfg``
    is the ``wandb`` section; ``config`` (an entry's config) is recorded resolved as the run's
    config. Never touches the network offline; W&B prints nothing to the console (``silent``).
    ``run_id`` continues that run (``resume="allow"``)."""
    mode = resolve_mode(wcfg.mode)
    if mode == "disabled":
        return None
    import wandb

    Path(out).mkdir(parents=True, exist_ok=True)
    extra = {"id": run_id, "resume": "allow"} if run_id else {}
    return wandb.init(project=wcfg.project, entity=wcfg.entity, group=group or wcfg.group,
                      tags=list(wcfg.tags or []), config=OmegaConf.to_container(config, resolve=True),
                      dir=str(out), mode=mode, name=name, job_type=job_type, reinit="finish_previous",
                      settings=wandb.Settings(silent=True, console="off", init_timeout=30), **extra)


def run_id_for(out: str | os.PathLike, resume: bool) -> str:
    """One W&B run per training run: the id kept in ``<out>/wandb/run_id``, reused when
    ``resume`` (an offline resume adds an ``offline-run-*-<same id>`` folder, which ``wandb sync``
    merges into the same run), else a new one written there."""
    import secrets

    from spindiff.runtime import atomic_write_text

    path = Path(out) / "wandb" / "run_id"
    if resume and path.exists() and path.read_text().strip():
        return path.read_text().strip()
    rid = secrets.token_hex(4)
    atomic_write_text(path, rid + "\n")
    return rid


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_metrics(run: Any, metrics: Mapping[str, Any], summary: bool = True) -> None:
    """Log the finite numeric entries of ``metrics`` (and put them in the run summary)."""
    if run is None:
        return
    flat = _finite(metrics)
    if flat:
        run.log(flat)
        if summary:
            run.summary.update(flat)


def finish_run(run: Any) -> None:
    if run is not None:
        run.finish()


def log_once(wcfg: DictConfig, out: str | os.PathLike, config: DictConfig, metrics: Mapping[str, Any],
             **kw: Any) -> None:
    """:func:`start_run` + :func:`log_metrics` + :func:`finish_run` (nothing when disabled)."""
    run = start_run(wcfg, out, config, **kw)
    try:
        log_metrics(run, metrics)
    finally:
        finish_run(run)


def make_lightning_logger(wcfg: DictConfig, out: str | os.PathLike, config: DictConfig, name: Optional[str] = None,
                          resume: bool = False):
    """A Lightning ``WandbLogger`` around a run from :func:`start_run` (the same run id across
    resumes, :func:`run_id_for`), or ``None`` when disabled (the CSV logger still records the
    metrics). Finish it with ``finish_run(logger.experiment)``."""
    if resolve_mode(wcfg.mode) == "disabled":
        return None
    run = start_run(wcfg, out, config, name=name, job_type="train", run_id=run_id_for(out, resume))
    from lightning.pytorch.loggers import WandbLogger

    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return WandbLogger(experiment=run, save_dir=str(out))
