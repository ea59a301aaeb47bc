"""``train(cfg)``: fit the residual score on (context, next token) pairs; returns the results.

What a run does (``python train.py``; every setting in ``configs/train.yaml``):

1. prepares ``out/`` (``config.yaml``, ``run.json`` with versions and seed);
2. opens the cached features for (model, field, data) or builds them once
   (:func:`spindiff.training.data.load_or_build_features`; the LM is loaded only then);
3. builds the parts for ``objective`` (:func:`spindiff.training.module.build_parts`) and the
   :class:`~spindiff.training.module.ScoreModule`;
4. fits with ``lightning.Trainer(**cfg.trainer)`` -- CSV logger in ``out/csv/v<k>/metrics.csv`` (k = 0, then 1 per resume) and
   W&B (offline unless a key is configured) -- keeping ``out/checkpoints/best.ckpt`` (lowest
   ``val/loss``) and ``out/checkpoints/last.ckpt``; with ``resume=true`` an existing
   ``last.ckpt`` is validated and training continues from it;
5. validates the final weights and writes ``out/results.json``.

Multi-GPU / multi-node goes through Lightning's own settings (``trainer.strategy=ddp
trainer.devices=2 trainer.num_nodes=...``); the data module shards batches by rank itself
(deterministic order, resumable), so ``trainer.use_distributed_sampler`` is managed here.
"""
from __future__ import annotations

import csv
import inspect
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from spindiff.config import ConfigError, TrainConfig
from spindiff.runtime import atomic_write_json, default_out, prepare_run, record_model, seed_everything

MANAGED_TRAINER_KEYS = {
    "logger": "set by train.py (CSV + W&B; configure W&B with wandb.*)",
    "callbacks": "set by train.py (checkpoints, learning-rate monitor)",
    "default_root_dir": "use out=DIR",
    "use_distributed_sampler": "the data module shards by rank itself (deterministic, resumable)",
    "gradient_clip_val": "use optim.grad_clip",
}
OUT_ENV = "SPINDIFF_TRAIN_OUT"  # run directory shared with DDP child processes
CSV_ENV = "SPINDIFF_TRAIN_CSV_VERSION"


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def trainer_kwargs(trainer_cfg: Any) -> dict[str, Any]:
    """``cfg.trainer`` as keyword arguments of ``lightning.Trainer``, validated against its
    signature. Raises :class:`ConfigError` naming an unknown or managed key and the valid ones."""
    import lightning as L

    kw = OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig) else dict(trainer_cfg or {})
    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key in kw:
        if key in MANAGED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} cannot be set: {MANAGED_TRAINER_KEYS[key]}")
        if key not in valid:
            import difflib

            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join('trainer.' + c for c in close)}?" if close else ""
            allowed = [v for v in valid if v not in MANAGED_TRAINER_KEYS]
            raise ConfigError(f"unknown trainer key 'trainer.{key}' (not an argument of lightning.Trainer).{hint} "
                              f"Valid keys: {', '.join(allowed)}")
    return kw


def _validate(cfg: DictConfig) -> None:
    from spindiff.training.module import OBJECTIVES

    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective={cfg.objective!r}: choose one of {sorted(OBJECTIVES)}")
    if cfg.data.source not in ("lm", "file"):
        raise ConfigError(f"data.source={cfg.data.source!r}: use lm or file")
    if cfg.data.source == "file" and not cfg.data.path:
        raise ConfigError("data.source=file needs data.path=FILE (a UTF-8 text file)")
    if cfg.data.source == "lm" and cfg.data.n_sequences < 2:
        raise ConfigError(f"data.n_sequences={cfg.data.n_sequences}: sample at least 2 sequences (train/val split by sequence)")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be >= 2")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must lie in [0, 1)")


def _csv_versions(csv_root: Path) -> list[Path]:
    """``csv/v0``, ``csv/v1``, ... (one per start or resume of a run), in order."""
    found = [p for p in csv_root.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def _csv_metrics(csv_root: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} over all CSV logs of a run: each resumed segment replaces
    what an earlier segment logged from its first step on (work after the checkpoint was lost)."""
    rows: list[dict[str, str]] = []
    for version in _csv_versions(csv_root):
        path = version / "metrics.csv"
        if not path.exists():
            continue
        with open(path) as f:
            new = list(csv.DictReader(f))
        if new:
            start = min(int(float(r.get("step") or 0)) for r in new)
            rows = [r for r in rows if int(float(r.get("step") or 0)) < start] + new
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = int(float(row.get("step") or 0))
        for k, v in row.items():
            if k in ("step", "epoch") or v in ("", None):
                continue
            out.setdefault(k, []).append((step, float(v)))
    return out


RESUME_MUST_MATCH = ("model", "field", "data", "score_net", "sde", "objective", "weighting", "optim", "seed")
RESUME_MAY_CHANGE = {"data.num_workers", "data.cache_dir", "data.cache", "data.feature_batch_size", "model.device",
                     "model.cache_dir", "model.hub_timeout"}


def _check_resume_config(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """A resumed run must train the same thing; only ``trainer``, ``wandb``, logging and
    evaluation settings may change. Raises :class:`ConfigError` naming the differing keys."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    diff = []
    for section in RESUME_MUST_MATCH:
        a, b = flat(old.get(section), f"{section}."), flat(new.get(section), f"{section}.")
        diff += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_MAY_CHANGE]
    if diff:
        raise ConfigError(f"{path} was trained with different settings ({', '.join(diff[:6])}); resuming would mix "
                          "two runs. Use the original settings, a new out=DIR, or resume=false to start over in this "
                          "directory")


def train(cfg: DictConfig | TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit the score for ``cfg``; see :func:`_train` (this wrapper scopes the environment
    variables that hand the run directory to DDP child processes to this call)."""
    saved = {k: os.environ.get(k) for k in (OUT_ENV, CSV_ENV)}
    try:
        return _train(cfg, callbacks)
    finally:
        if _rank() == 0:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _train(cfg: DictConfig | TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit the score for ``cfg`` (a composed TrainConfig).

    Args:
        cfg: the config (``spindiff.config.compose("train", overrides)``).
        callbacks: extra Lightning callbacks (added after the checkpoint callbacks).

    Returns:
        dict with ``paths`` (out, best/last checkpoints, metrics CSV, results.json, features),
        ``metrics`` (first logged train loss, mean of the last logged ones (up to 10),
        ``val_start``/``val_end`` metric dicts (untrained / final weights), best val
        loss), ``global_step``, ``resumed_from``, ``wall_s``, ``fit_s`` and run facts.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from spindiff.checkpoint import load_checkpoint
    from spindiff.training.data import PairDataModule, load_or_build_features
    from spindiff.training.module import ScoreModule, build_parts, make_meta
    from spindiff.lm.models import load_model
    from spindiff.tracking import make_lightning_logger

    t_start = time.perf_counter()
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    _validate(cfg)
    tkw = trainer_kwargs(cfg.trainer)
    rank = _rank()
    if not cfg.out:
        cfg.out = (os.environ.get(OUT_ENV) if rank != 0 else None) or str(default_out("train"))
    if rank == 0:
        out = prepare_run(cfg, "train")
        os.environ[OUT_ENV] = str(out)  # DDP children (re-launched scripts) write to the same run
    else:
        out = Path(cfg.out)
        seed_everything(int(cfg.seed))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    store, cache_hit = load_or_build_features(cfg, lambda: load_model(cfg.model), progress=rank == 0)
    if rank == 0:
        record_model(out, store.meta["model"])
    meta = make_meta(cfg, store.meta)
    plain = OmegaConf.to_container(cfg, resolve=True)
    net, sde, objective = build_parts(cfg, meta)
    table = torch.from_numpy(np.array(store.arrays["token_table"]))  # a writable copy of the memmap
    module = ScoreModule(net, sde, objective, config=plain, meta=meta, token_table=table)
    dm = PairDataModule(store, cfg.data, seed=int(cfg.seed))

    ckpt_dir = out / "checkpoints"
    max_steps = int(tkw.get("max_steps", -1) or -1)
    vci = tkw.get("val_check_interval")
    if isinstance(vci, int) and max_steps > 0 and vci > max_steps:
        tkw["val_check_interval"] = max_steps  # validate (and keep best.ckpt) at least once
    every = int(cfg.ckpt_every_n_steps)
    checkpoints = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=max(1, every),
                        save_on_train_epoch_end=True, enable_version_counter=False),
    ]
    all_callbacks = [*checkpoints, LearningRateMonitor(logging_interval="step"), *callbacks]
    # a resumed run logs next to, not over, the old log; DDP children use rank 0's choice
    csv_version = os.environ.get(CSV_ENV) if rank != 0 and os.environ.get(CSV_ENV) else f"v{len(_csv_versions(out / 'csv'))}"
    if rank == 0:
        os.environ[CSV_ENV] = csv_version
    loggers: list[Any] = [CSVLogger(str(out), name="csv", version=csv_version)]
    wandb_logger = make_lightning_logger(cfg.wandb, out, plain, name=Path(out).name) if rank == 0 else None
    if wandb_logger:
        loggers.append(wandb_logger)
    grad_clip = float(cfg.optim.grad_clip)
    trainer = L.Trainer(default_root_dir=str(out), logger=loggers, callbacks=all_callbacks,
                        gradient_clip_val=grad_clip if grad_clip > 0 else None,
                        use_distributed_sampler=False, **tkw)

    last = ckpt_dir / "last.ckpt"
    resume_from = None
    if cfg.resume and last.exists():
        ckpt = load_checkpoint(last, expect_model=meta["model_name"], expect_dim=meta["dim"])  # clear error if unusable
        _check_resume_config(ckpt["hyper_parameters"]["config"], plain, last)
        del ckpt
        resume_from = str(last)
    val_start: dict[str, float] = {}
    if resume_from is None and cfg.get("validate_at_start", True) and len(dm.val_idx):
        res = trainer.validate(module, datamodule=dm, verbose=False)
        val_start = {k: float(v) for k, v in (res[0] if res else {}).items()}
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
    fit_s = time.perf_counter() - t_fit
    val_end: dict[str, float] = {}
    if len(dm.val_idx):
        res = trainer.validate(module, datamodule=dm, verbose=False)
        val_end = {k: float(v) for k, v in (res[0] if res else {}).items()}

    metrics_csv = out / "csv" / csv_version / "metrics.csv"
    logged = _csv_metrics(out / "csv")
    train_curve = logged.get("train/loss", [])
    k = max(1, min(10, len(train_curve) // 4))  # smoothing window that never spans start and end
    head = [v for _, v in train_curve[:1]]
    tail = [v for _, v in train_curve[-k:]]
    best_ckpt = checkpoints[0]
    best_score = best_ckpt.best_model_score
    results: dict[str, Any] = {
        "paths": {"out": str(out), "best": str(ckpt_dir / "best.ckpt") if (ckpt_dir / "best.ckpt").exists() else None,
                  "last": str(last) if last.exists() else None, "metrics_csv": str(metrics_csv),
                  "results": str(out / "results.json"), "features": str(store.directory) if store.directory else None},
        "metrics": {
            "train_loss_start": float(np.mean(head)) if head else None,
            "train_loss_end": float(np.mean(tail)) if tail else None,
            "val_start": val_start, "val_end": val_end,
            "best_val_loss": float(best_score) if best_score is not None and math.isfinite(float(best_score)) else None,
        },
        "global_step": int(trainer.global_step),
        "resumed_from": resume_from,
        "objective": str(cfg.objective),
        "model": meta["model_name"], "dim": meta["dim"], "vocab_size": meta["vocab_size"],
        "n_pairs": store.n, "n_train": int(len(dm.train_idx)), "n_val": int(len(dm.val_idx)),
        "feature_cache_hit": bool(cache_hit),
        "score_net_params": int(sum(p.numel() for p in net.parameters())),
        "fit_s": round(fit_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    if rank == 0:
        atomic_write_json(out / "results.json", results)
    if wandb_logger:
        import wandb

        wandb.finish()
    return results
