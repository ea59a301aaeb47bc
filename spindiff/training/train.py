"""``train(cfg)``: fit the residual score on (context, next token) pairs; returns the results.

What a run does (``python train.py``; every setting in ``configs/train.yaml``):

1. checks the config (:func:`spindiff.config.check`: the rules of :mod:`spindiff.config_rules` --
   choices, ranges, every ``trainer.*`` key and value against ``lightning.Trainer`` itself -- and
   the objective and device checks registered here) -- before anything is loaded or written;
2. opens the cached features for (model, field, data) or builds them once
   (:func:`spindiff.training.cache.load_or_build_features`; the LM is loaded only then, and the
   head spec is checked against it);
3. builds the parts for ``objective`` (:func:`spindiff.training.module.build_parts`) and the
   :class:`~spindiff.training.module.ScoreModule`;
4. only now creates ``out/`` (``config.yaml``, ``run.json`` with versions and seed), so a run that
   fails on its input leaves no stub directory;
5. fits with ``lightning.Trainer(**cfg.trainer)``, keeping ``out/checkpoints/best.ckpt`` (lowest
   ``val/loss``) and ``out/checkpoints/last.ckpt``; every logged metric goes to ONE history,
   ``out/metrics.csv`` (:mod:`spindiff.training.history`; a resumed run drops the rows the
   interruption lost and appends; the ``segment`` column counts the starts), and to W&B (offline
   unless a key is configured); with ``resume=true`` an existing ``last.ckpt`` is validated and
   training continues from it; with ``trainer.enable_progress_bar=false`` one progress line per
   ``print_every_n_steps``;
6. validates the final weights and writes ``out/results.json``.

Multi-GPU / multi-node goes through Lightning's own settings (``trainer.strategy=ddp
trainer.devices=2 trainer.num_nodes=...``): the launcher gives every process its rank, only rank
0 writes the run directory, and Lightning broadcasts rank 0's checkpoint folder to the others;
the data module shards batches by rank itself (deterministic order, resumable), so
``trainer.use_distributed_sampler`` is managed here.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from spindiff.config import ConfigError, TrainConfig, register_check, register_user_error
from spindiff.config_rules import MANAGED_TRAINER_KEYS, check_choice, check_trainer, trainer_kwargs  # noqa: F401 - re-exported
from spindiff.lm.adapter import HeadSpecError
from spindiff.runtime import (apply_threads, atomic_write_json, default_out, notice, prepare_run, progress_bars,
                              quiet_third_party, record_model, threads)
from spindiff.training.history import HistoryLogger, ProgressLines, first_values, history, next_segment

# Thread counts (README: Reproducibility). The fit's float reductions depend on the thread count:
# 12 default steps with 1 vs 2 threads ended 6.6e-7 apart in the weights, and 400 steps apart in the
# 3rd digit of val/top1. So a run without runtime.threads / $OMP_NUM_THREADS uses one thread (the
# same numbers on every machine of a kind, and no oversubscription collapse on a shared one); the
# training data are always built on one thread, so the cache is the same whatever the fit uses.
FIT_THREADS = 1
DATA_THREADS = 1

def _rank() -> int:
    """This process's global rank, as Lightning's launcher set it (0 outside DDP)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


# --------------------------------------------------------------------------- config checks
def _check_train_registries(cfg: DictConfig) -> None:
    """The train entry's checks that need what the config layer cannot import (registered with
    :func:`spindiff.config.register_check`; the rest are :func:`spindiff.config_rules.check_train`):
    ``objective`` against :data:`spindiff.training.module.OBJECTIVES`, and the device."""
    from spindiff.runtime import resolve_device
    from spindiff.training.module import OBJECTIVES

    check_choice(cfg, "objective", OBJECTIVES)
    resolve_device(cfg.model.device)


register_check("train", _check_train_registries)
register_user_error(HeadSpecError)  # a head spec outside the model is the user's input


def _check_heads(cfg: DictConfig, lm: Any) -> Any:
    """The field's head spec against the loaded model, as a ConfigError (before anything is built)."""
    from spindiff.lm.adapter import get_adapter
    from spindiff.lm.field import resolve_head_spec

    try:
        resolve_head_spec(str(cfg.field.heads), get_adapter(lm.model), str(cfg.field.report or ""))
    except (ValueError, OSError) as e:
        raise ConfigError(f"field.heads={cfg.field.heads}: {e}") from None
    return lm


class LastValidation(Callback):
    """Remembers the global step and the ``val/*`` metrics of the latest validation, so the final
    weights are not validated (and logged) a second time when the fit's last step validated them."""

    def __init__(self) -> None:
        self.step, self.values = -1, {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
            self.values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


# --------------------------------------------------------------------------- resume
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


# --------------------------------------------------------------------------- train
def train(cfg: DictConfig | TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit the score for ``cfg`` (a composed TrainConfig, or the dataclass: composed the same way).

    Args:
        cfg: the config (``spindiff.config.compose("train", overrides)`` or ``TrainConfig(...)``).
        callbacks: extra Lightning callbacks (added after the checkpoint callbacks).

    Returns:
        dict with ``paths`` (out, best/last checkpoints, metrics.csv, results.json, features),
        ``metrics`` (first logged train loss, mean of the last logged ones (up to 10),
        ``val_start``/``val_end`` metric dicts (the run's first validation -- the untrained
        weights, also after a resume -- and the final weights), best val loss), ``global_step``,
        ``resumed_from``, ``wall_s``, ``fit_s`` and run facts.

    Raises:
        ConfigError / CheckpointError: bad settings or an unusable resume checkpoint, before the
            run directory is created.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from spindiff.checkpoint import load_checkpoint
    from spindiff.config import check, entry_config
    from spindiff.lm.models import load_model
    from spindiff.tracking import finish_run, log_metrics, make_lightning_logger
    from spindiff.training.cache import feature_cache_dir, load_or_build_features
    from spindiff.training.data import PairDataModule
    from spindiff.training.module import ScoreModule, build_parts, make_meta

    t_start = time.perf_counter()
    cfg = entry_config("train", cfg)
    check("train", cfg)  # a programmatic call is checked exactly like the CLI
    apply_threads(cfg, default=FIT_THREADS)  # runtime.threads (default: one thread, reproducible)
    tkw = trainer_kwargs(cfg.trainer)
    rank = _rank()
    out = Path(cfg.out) if cfg.out else default_out("train")
    last = out / "checkpoints" / "last.ckpt"
    resume_step: int | None = None
    resume_from = None
    if cfg.resume and last.exists():  # validated before anything is built or written
        ckpt = load_checkpoint(last)  # clear error if unusable
        _check_resume_config(ckpt["hyper_parameters"]["config"], OmegaConf.to_container(cfg, resolve=True), last)
        resume_step, resume_from = int(ckpt.get("global_step") or 0), str(last)
        del ckpt
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # a cache miss needs the LM: load it (and check the head spec against it) before any cache
    # folder or lock file is created, so a bad head spec leaves nothing behind
    progress = bool(tkw.get("enable_progress_bar", True))  # THE switch for every bar of the run
    cached = bool(cfg.data.cache) and (feature_cache_dir(cfg) / "meta.json").exists()
    # the training data (LM-sampled text, teacher-forced features) is built on ONE thread: float
    # reductions differ with the thread count, and one flipped draw changes a whole sampled sequence,
    # so the data, and with it the run, would differ between machines (README: Reproducibility)
    with progress_bars(progress), threads(DATA_THREADS):
        lm = None if cached else _check_heads(cfg, load_model(cfg.model))
        with quiet_third_party():
            store, cache_hit = load_or_build_features(
                cfg, lambda: lm if lm is not None else _check_heads(cfg, load_model(cfg.model)),
                progress=progress and rank == 0)
    del lm
    meta = make_meta(cfg, store.meta)
    net, sde, objective = build_parts(cfg, meta, token_norms=store.arrays.get("token_norms"))
    table = torch.from_numpy(np.array(store.arrays["token_table"]))  # a writable copy of the memmap
    cfg.out = str(out)
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = ScoreModule(net, sde, objective, config=plain, meta=meta, token_table=table)
    dm = PairDataModule(store, cfg.data, seed=int(cfg.seed))

    # the input is good: only now the run directory (rank 0; DDP children write nothing of their own)
    if rank == 0:
        prepare_run(cfg, "train")
        record_model(out, store.meta["model"])
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
    last_val = LastValidation()
    all_callbacks = [*checkpoints, LearningRateMonitor(logging_interval="step"), last_val]
    if progress:  # tqdm, not Lightning's default rich bar (which shows "Epoch 3/-2" with max_epochs=-1)
        all_callbacks.append(TQDMProgressBar())
    elif int(cfg.get("print_every_n_steps", 0) or 0) > 0:
        all_callbacks.append(ProgressLines(int(cfg.print_every_n_steps), max_steps))
    tkw.setdefault("enable_model_summary", False)  # its table ends in "Total FLOPs: 0"; results.json has the size
    all_callbacks.extend(callbacks)
    segment = next_segment(out / "metrics.csv") if resume_from else 0
    loggers: list[Any] = [HistoryLogger(out / "metrics.csv", resume_step, segment)]
    wandb_logger = make_lightning_logger(cfg.wandb, out, cfg, name=out.name, resume=resume_from is not None) \
        if rank == 0 else None
    if wandb_logger:
        loggers.append(wandb_logger)
    grad_clip = float(cfg.optim.grad_clip)
    if resume_from is not None and rank == 0:
        notice(f"resuming from {resume_from} (step {resume_step})", kind="note")
    # everything the fit prints (Lightning's bars write to sys.stdout) goes to stderr: stdout is the summary
    with quiet_third_party(), progress_bars(progress), contextlib.redirect_stdout(sys.stderr):
        trainer = L.Trainer(default_root_dir=str(out), logger=loggers, callbacks=all_callbacks,
                            gradient_clip_val=grad_clip if grad_clip > 0 else None,
                            use_distributed_sampler=False, **tkw)
        val_start: dict[str, float] = {}
        if resume_from is None and cfg.get("validate_at_start", True) and len(dm.val_idx):
            res = trainer.validate(module, datamodule=dm, verbose=False)
            val_start = {k: float(v) for k, v in (res[0] if res else {}).items()}
        t_fit = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
        fit_s = time.perf_counter() - t_fit
        val_end: dict[str, float] = {}
        if last_val.step == trainer.global_step:  # the fit's last validation saw the final weights:
            val_end = dict(last_val.values)        # validating again would log the same row twice
        elif len(dm.val_idx):
            res = trainer.validate(module, datamodule=dm, verbose=False)
            val_end = {k: float(v) for k, v in (res[0] if res else {}).items()}

    hist = history(out)
    if resume_from is not None:  # the run's first validation is in its history, not in this segment
        val_start = first_values(hist, "val/")
    train_curve = hist.get("train/loss", [])
    k = max(1, min(10, len(train_curve) // 4))  # smoothing window that never spans start and end
    head = [v for _, v in train_curve[:1]]
    tail = [v for _, v in train_curve[-k:]]
    best_score = checkpoints[0].best_model_score
    results: dict[str, Any] = {
        "paths": {"out": str(out), "best": str(ckpt_dir / "best.ckpt") if (ckpt_dir / "best.ckpt").exists() else None,
                  "last": str(last) if last.exists() else None, "metrics_csv": str(out / "metrics.csv"),
                  "results": str(out / "results.json"), "features": str(store.directory) if store.directory else None},
        "metrics": {
            "train_loss_start": float(np.mean(head)) if head else None,
            "train_loss_end": float(np.mean(tail)) if tail else None,
            "val_start": val_start, "val_end": val_end,
            "best_val_loss": float(best_score) if best_score is not None and math.isfinite(float(best_score)) else None,
        },
        "global_step": int(trainer.global_step),
        "resumed_from": resume_from,
        "segments": segment + 1,
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
        run = wandb_logger.experiment
        log_metrics(run, {f"final/{k}": v for k, v in val_end.items()})
        finish_run(run)
    return results


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """What ``python train.py`` prints at the end (its only stdout): paths, steps, and [start, end]
    of the losses and of every validation metric (fidelity to the LM), to 4 significant digits."""
    m = results["metrics"]
    start, end = m["val_start"], m["val_end"]
    val = {k: [_sig(start.get(k)), _sig(end.get(k))] for k in sorted(set(start) | set(end))
           if k.startswith("val/") and "noisy" not in k}
    return {"out": results["paths"]["out"], "checkpoint": results["paths"]["best"] or results["paths"]["last"],
            "metrics_csv": results["paths"]["metrics_csv"], "steps": results["global_step"],
            "resumed_from": results["resumed_from"], "wall_s": results["wall_s"],
            "train_loss": [_sig(m["train_loss_start"]), _sig(m["train_loss_end"])],
            "val_loss": [_sig(start.get("val/loss")), _sig(end.get("val/loss"))], "val": val}


def _sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits for the printed summary (results.json keeps all)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def cli_run(cfg: DictConfig) -> dict[str, Any]:
    """What ``python train.py`` does with a parsed config: train, print the summary (rank 0);
    a user error prints one ``error: ...`` line and exits with status 2 (nothing written)."""
    import json

    import spindiff.checkpoint  # noqa: F401 - registers CheckpointError as a user error
    import spindiff.lm.models  # noqa: F401 - ModelLoadError
    from spindiff.config import USER_ERRORS

    try:
        results = train(cfg)
    except tuple(USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if _rank() == 0:  # DDP child processes: rank 0 reports
        print(json.dumps(summary(results), indent=2))
    return results
