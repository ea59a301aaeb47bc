"""The rules of the config: errors, closed choices, numeric ranges, cross-field checks per section
and the rules of each entry point's schema -- next to the schema (:mod:`spindiff.config_schema`).

:mod:`spindiff.config` runs these on every composed config, before any model is loaded or any run
directory is created. This module sits below every other spindiff module that imports the config:
it imports :mod:`spindiff.config_schema` and, inside the checks, only leaf registries that import
nothing of spindiff (:data:`spindiff.sphere.schedules.SCHEDULES`,
:data:`spindiff.score.losses.WEIGHTINGS`) and ``lightning`` (whose ``Trainer`` judges
``trainer.*``). Checks that need a registry *above* the config (the sampler classes, the training
objectives, the steering sources, the device) are registered by the module that owns that registry
with :func:`spindiff.config.register_check`; the entry functions (``train``, ``sample``,
``evaluate``) run :func:`spindiff.config.check` again after importing theirs.

Every problem is a :class:`ConfigError` (or another class registered with
:func:`register_user_error`) whose message names the key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Collection

from omegaconf import DictConfig, OmegaConf

from spindiff.checkpoint import CheckpointError
from spindiff.config_schema import TRAINER_DEFAULTS

_ABSENT = object()


# --------------------------------------------------------------------------- errors
class ConfigError(ValueError):
    """A configuration problem, with a message that names the fix."""


USER_ERRORS: list[type[BaseException]] = [ConfigError, CheckpointError]


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    """Mark an exception class as bad *input* (config, prompt, checkpoint, model name): the CLIs
    print ``error: <message>`` and exit with status 2 for it, and a traceback for anything else
    (an internal bug must show where it is). Usable as a class decorator."""
    if cls not in USER_ERRORS:
        USER_ERRORS.append(cls)
    return cls


def finite_number(x: Any, what: str, fix: str = "give a finite number",
                  error: type[Exception] = ConfigError) -> float:
    """``float(x)`` for the setting ``what``; raises ``error`` (a user error class) saying whether
    ``x`` is not a number or not finite, followed by ``fix``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise error(f"{what}={x!r} is not a number; {fix}") from None
    if not math.isfinite(v):
        raise error(f"{what}={x!r} is not finite; {fix}")
    return v


# --------------------------------------------------------------------------- choices and ranges
# choice fields with a closed set of values (registries that code extends are in registry_choices()
# or checked by the module that owns the registry: sampler.name, sampler.method, objective)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "float64", "bfloat16", "bf16", "fp32", "fp64"),
    "wandb.mode": ("auto", "offline", "online", "disabled"),
    "data.source": ("lm", "file"),
    "optim.scheduler": ("cosine", "constant"),
    "field.protocol": ("in_situ", "paper", "paper_fixed"),
    "score_net.features": ("none", "field", "hidden", "field+hidden"),
}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# numeric keys: (predicate, what it must be)
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "runtime.threads": (lambda v: _int(v) and v >= 0, ">= 0 (0 = $OMP_NUM_THREADS or one per core; e.g. runtime.threads=1)"),
    "model.hub_timeout": (lambda v: _num(v) and v > 0, "> 0 seconds"),
    "data.n_sequences": (lambda v: _int(v) and v >= 0, ">= 0"),
    "data.seq_len": (lambda v: _int(v) and v >= 2, ">= 2"),
    "data.temperature": (lambda v: _num(v) and 0 <= v < math.inf, ">= 0 (0 = greedy)"),
    "data.top_p": (lambda v: _num(v) and 0 < v <= 1, "in (0, 1]"),
    "data.gen_batch_size": (lambda v: _int(v) and v >= 1, ">= 1"),
    "data.feature_batch_size": (lambda v: _int(v) and v >= 1, ">= 1"),
    "data.batch_size": (lambda v: _int(v) and v >= 1, ">= 1"),
    "data.val_fraction": (lambda v: _num(v) and 0 <= v < 1, "in [0, 1)"),
    "data.num_workers": (lambda v: _int(v) and v >= 0, ">= 0"),
    "optim.lr": (lambda v: _num(v) and 0 < v < math.inf, "> 0 and finite (e.g. optim.lr=1e-3)"),
    "optim.weight_decay": (lambda v: _num(v) and 0 <= v < math.inf, ">= 0"),
    "optim.gate_lr": (lambda v: _num(v) and 0 <= v < math.inf, ">= 0 (0 = optim.lr)"),
    "optim.grad_clip": (lambda v: _num(v) and 0 <= v < math.inf, ">= 0 (0 = off)"),
    "optim.warmup_steps": (lambda v: _int(v) and v >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda v: _num(v) and 0 <= v <= 1, "in [0, 1]"),
    "optim.betas": (lambda v: len(v) == 2 and all(_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "sde.beta_min": (lambda v: _num(v) and 0 < v < math.inf, "> 0"),
    "sde.beta_max": (lambda v: _num(v) and 0 < v < math.inf, "> 0"),
    "sde.T": (lambda v: _num(v) and 0 < v < math.inf, "> 0"),
    "sde.t_eps": (lambda v: _num(v) and v > 0, "> 0"),
    "eval_sample_steps": (lambda v: _int(v) and v >= 0, ">= 0 (0 = off)"),
    "eval_sample_size": (lambda v: _int(v) and v >= 1, ">= 1"),
    "ckpt_every_n_steps": (lambda v: _int(v) and v >= 1, ">= 1"),
    "print_every_n_steps": (lambda v: _int(v) and v >= 0, ">= 0 (0 = no progress lines)"),
    "eval.n_prompts": (lambda v: _int(v) and v >= 0, ">= 0 (0 = all)"),
    "eval.n_draws": (lambda v: _int(v) and v >= 0, ">= 0 (0 = no fidelity draws)"),
    "eval.seeds": (lambda v: len(v) >= 1 and all(_int(s) for s in v), "a non-empty list of integers, e.g. eval.seeds=[0,1,2]"),
}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# valid examples for keys whose default is empty (the error for a bad value shows one)
EXAMPLES: dict[str, str] = {
    "steer.words": "Paris,London", "steer.positive": "'I love this'", "steer.negative": "'I hate this'",
    "steer.vector": "direction.npy", "steer.head_gains": "L29H1:0.5,L23H4:2", "steer.heads_report": "DIR/heads.csv",
    "steer.lam": "1.0", "steer.actadd.positive": "'This is about love'", "steer.actadd.negative": "'This is about hate'",
    "steer.actadd.vector": "direction.npy", "sampler.exit_kappa": "50.0", "sampler.kappa": "10.0",
    "data.path": "corpus.txt", "data.prompts": "prompts.txt", "data.cache_dir": "/tmp/spindiff-features",
    "model.cache_dir": "/tmp/spindiff-cache", "model.revision": "main", "field.report": "DIR/report.json",
    "wandb.entity": "my-team", "wandb.group": "sweep1", "wandb.tags": "[a,b]", "prompts": "prompts.txt",
    "eval.prompts": "prompts.txt", "out": "runs/mine", "prompt": "'The capital of France is'",
    "heldout": "heldout", "head": "L3H5", "scan_heads": "L3", "runtime.threads": "2",
}


def fmt_value(v: Any) -> str:
    """A config value as the user would type it (strings quoted, containers as lists / dicts)."""
    if isinstance(v, DictConfig) or OmegaConf.is_list(v):
        v = OmegaConf.to_container(v)
    return repr(v) if isinstance(v, str) else str(v)


def defaults_of(cfg: DictConfig) -> DictConfig:
    """The dataclass defaults of ``cfg``'s schema (the source of a valid example), else ``cfg``."""
    t = OmegaConf.get_type(cfg)
    return OmegaConf.structured(t) if t is not None and dataclasses.is_dataclass(t) else cfg


def example(base: DictConfig, key: str) -> str:
    """``key=<a valid value>``: the key's current (default) value, or one from :data:`EXAMPLES`."""
    v = OmegaConf.select(base, key, default=None)
    if key in EXAMPLES and (v in (None, "") or (OmegaConf.is_list(v) and len(v) == 0)):
        return f"{key}={EXAMPLES[key]}"
    if v is None or v == "":
        return f"{key}={EXAMPLES.get(key, 'VALUE')}"
    return f"{key}={fmt_value(v).lower() if isinstance(v, bool) else fmt_value(v)}"


def registry_choices() -> dict[str, Collection[str]]:
    """Choice keys whose values are a registry that code extends, for registries that import
    nothing of spindiff (so the config layer may read them)."""
    from spindiff.score.losses import WEIGHTINGS
    from spindiff.sphere.schedules import SCHEDULES

    return {"weighting": WEIGHTINGS, "sde.schedule": SCHEDULES}


def check_choice(cfg: DictConfig, key: str, names: Collection[str]) -> None:
    """``cfg.<key>`` (when present) is one of ``names``; else a ConfigError with the sorted
    choices and the schema default as the example."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is not _ABSENT and value not in names:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(sorted(names))} "
                          f"(e.g. {key}={OmegaConf.select(defaults_of(cfg), key)})")


# --------------------------------------------------------------------------- section rules
def check_sections(cfg: DictConfig) -> None:
    """The rules of every section present in ``cfg``, whatever the entry: choices, ranges, the
    device syntax, the SDE schedule's order, the data source, the validation times."""
    for key, choices in CHOICES.items():
        v = OmegaConf.select(cfg, key, default=_ABSENT)
        if v is not _ABSENT and v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1, cutoff=0.6)
            raise ConfigError(f"{key}={fmt_value(v)}: choose one of {', '.join(choices)}"
                              + (f" (did you mean {key}={close[0]}?)" if close else f" (e.g. {key}={choices[0]})"))
    for key, (ok, what) in RANGES.items():
        v = OmegaConf.select(cfg, key, default=_ABSENT)
        if v is _ABSENT:
            continue
        try:
            good = bool(ok(v))
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={fmt_value(v)}: must be {what}"
                              + ("" if "e.g." in what else f" (e.g. {example(defaults_of(cfg), key)})"))
    dev = OmegaConf.select(cfg, "model.device", default=_ABSENT)
    if dev is not _ABSENT and not (isinstance(dev, str) and _DEVICE.fullmatch(dev)):
        raise ConfigError(f"model.device={fmt_value(dev)}: use auto, cpu, cuda or cuda:N (e.g. model.device=cpu)")
    for key, names in registry_choices().items():
        check_choice(cfg, key, names)
    sde = cfg.get("sde")
    if sde is not None:
        if sde.beta_max < sde.beta_min:
            raise ConfigError(f"sde.beta_max={sde.beta_max} is below sde.beta_min={sde.beta_min}; "
                              "the schedule must not decrease (e.g. sde.beta_min=0.1 sde.beta_max=20)")
        if not sde.t_eps < sde.T:
            raise ConfigError(f"sde.t_eps={sde.t_eps} must be below sde.T={sde.T} (e.g. sde.t_eps=0.001)")
    data = cfg.get("data")
    if data is not None and "source" in data:
        if data.source == "file" and not data.path:
            raise ConfigError("data.source=file needs data.path=FILE (a UTF-8 text file)")
        if data.source == "file" and not Path(data.path).is_file():
            raise ConfigError(f"data.path={data.path!r}: no such file (data.source=file reads a UTF-8 text file)")
        if data.source == "lm" and data.n_sequences < 2:
            raise ConfigError(f"data.n_sequences={data.n_sequences}: sample at least 2 sequences "
                              "(the train/val split is by sequence; e.g. data.n_sequences=256)")
    eval_t = cfg.get("eval_t")
    if eval_t is not None and sde is not None:
        bad = [t for t in eval_t if not (_num(t) and 0 < t <= sde.T)]
        if bad:
            raise ConfigError(f"eval_t={fmt_value(eval_t)}: every time must lie in (0, sde.T={sde.T}] "
                              "(e.g. eval_t=[0.4,0.5,0.7])")


# --------------------------------------------------------------------------- train: trainer.*
MANAGED_TRAINER_KEYS = {
    "logger": "set by train.py (metrics.csv + W&B; configure W&B with wandb.*)",
    "callbacks": "set by train.py (checkpoints, learning-rate monitor)",
    "default_root_dir": "use out=DIR",
    "use_distributed_sampler": "the data module shards by rank itself (deterministic, resumable)",
    "gradient_clip_val": "use optim.grad_clip",
}


def trainer_kwargs(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` (the train config's ``trainer`` section) as keyword arguments of
    ``lightning.Trainer``, validated against its signature. Raises :class:`ConfigError` naming an
    unknown or managed key and the valid ones."""
    import lightning as L

    kw: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)
    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key in kw:
        if key in MANAGED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} cannot be set: {MANAGED_TRAINER_KEYS[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join('trainer.' + c for c in close)}?" if close else ""
            allowed = [v for v in valid if v not in MANAGED_TRAINER_KEYS]
            raise ConfigError(f"unknown trainer key 'trainer.{key}' (not an argument of lightning.Trainer).{hint} "
                              f"Valid keys: {', '.join(allowed)}")
    return kw


def check_trainer(trainer_cfg: DictConfig) -> dict[str, Any]:
    """:func:`trainer_kwargs` plus the values: a few rules Lightning only hits mid-fit (a zero
    logging interval, a run with no end), then ``lightning.Trainer`` itself is constructed once
    with these arguments (nothing is written) so that whatever it rejects is rejected now."""
    import lightning as L

    kw = trainer_kwargs(trainer_cfg)
    ms, me = kw.get("max_steps", -1), kw.get("max_epochs", None)
    for key, v, lo in (("max_steps", ms, -1), ("max_epochs", me, -1), ("num_sanity_val_steps", kw.get("num_sanity_val_steps"), -1)):
        if v is not None and not (_int(v) and v >= lo):
            raise ConfigError(f"trainer.{key}={v!r}: must be an integer >= 0 (or -1 = no limit; e.g. trainer.{key}="
                              f"{TRAINER_DEFAULTS.get(key, 0)})")
    if ms in (-1, None) and me == -1:
        raise ConfigError("trainer.max_steps=-1 with trainer.max_epochs=-1 trains forever; set one of them "
                          "(e.g. trainer.max_steps=500)")
    if ms == 0:
        raise ConfigError("trainer.max_steps=0 trains nothing; give a positive number of steps (e.g. trainer.max_steps=500)")
    lev = kw.get("log_every_n_steps")
    if lev is not None and not (_int(lev) and lev >= 1):
        raise ConfigError(f"trainer.log_every_n_steps={lev!r}: must be an integer >= 1 (e.g. trainer.log_every_n_steps=10)")
    vci = kw.get("val_check_interval")
    if vci is not None and not ((_int(vci) and vci >= 1) or (isinstance(vci, float) and 0 < vci <= 1)):
        raise ConfigError(f"trainer.val_check_interval={vci!r}: an integer number of steps >= 1, or a fraction of "
                          "an epoch in (0, 1]")
    rank_zero_logs = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                                    "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in rank_zero_logs]
    try:
        for lg in rank_zero_logs:  # the dry construction's lines ("GPU available: ...", tips) are not news
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():  # nor its warnings: what it rejects, it raises
            warnings.simplefilter("ignore")
            L.Trainer(logger=False, enable_checkpointing=False, callbacks=[], use_distributed_sampler=False,
                      **{**kw, "enable_progress_bar": False, "enable_model_summary": False})
    except Exception as e:  # noqa: BLE001 - MisconfigurationException, ValueError, TypeError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        low = msg.lower()
        named = [k for k in kw if k.lower() in low or k.replace("_", " ").lower() in low]
        where = ", ".join(f"trainer.{k}={kw[k]!r}" for k in (named or kw))
        raise ConfigError(f"lightning.Trainer rejects {where}: {msg}") from None
    finally:
        for lg, lvl in zip(rank_zero_logs, levels):
            lg.setLevel(lvl)
    return kw


# --------------------------------------------------------------------------- entry rules
def check_train(cfg: DictConfig) -> None:
    """The train schema's own rules: the Euclidean DDPM needs an MLP width, and ``trainer.*``."""
    if cfg.objective == "euclid_ddpm" and int(cfg.score_net.hidden) < 1:
        raise ConfigError(f"score_net.hidden={cfg.score_net.hidden}: the Euclidean DDPM's noise-prediction MLP needs "
                          "a width >= 1 (0 means 'read-out only' for objective=posterior alone); use "
                          "experiment=euclid_ddpm (hidden 512) or e.g. score_net.hidden=512")
    check_trainer(cfg.trainer)


def check_evaluate(cfg: DictConfig) -> None:
    """The evaluate schema's own rules: the prompt file exists."""
    if cfg.eval.prompts and not Path(cfg.eval.prompts).is_file():
        raise ConfigError(f"eval.prompts={cfg.eval.prompts}: no such file; give a text file with one prompt a line, "
                          "or eval.prompts=\"\" for the packaged held-out set")
