"""Structured configuration for every spindiff entry point: composition, checks, CLI parsing.

Configs are OmegaConf *structured* configs built from the dataclasses of
:mod:`spindiff.config_schema` (re-exported here: ``from spindiff.config import TrainConfig``), so a
misspelt key is an error rather than a silently ignored setting. An entry point
composes, in order (later wins):

1. the dataclass defaults,
2. ``configs/<entry>.yaml`` (the shipped defaults for that entry point),
3. ``experiment=NAME`` -> ``configs/experiment/NAME.yaml`` (states only what differs),
4. ``config=FILE`` -> a user YAML file,
5. the remaining ``key=value`` dotlist overrides from the command line.

The dataclass defaults and the shipped YAML agree (tests/test_config.py asserts it), so a
programmatic ``train(TrainConfig())`` / ``sample(SampleConfig())`` runs exactly what the CLI
runs. After merging, :func:`compose` checks the values: choice fields against their choices
(:data:`CHOICES`), numeric keys against their ranges (:data:`RANGES`), and the checks each entry
point registers with :func:`register_check` (e.g. ``trainer.*`` against ``lightning.Trainer``,
``sampler.*`` against the sampler registry) -- all before any model is loaded or any run
directory is created. Every problem is a :class:`ConfigError` (or another class registered with
:func:`register_user_error`) whose message names the key, the value and the fix; the CLIs print
it as one ``error: ...`` line and exit with status 2.

``--help`` prints usage and the resolved config tree with its defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from spindiff.config_schema import (TRAINER_DEFAULTS, ActAddConfig, DataConfig, EvalConfig,  # noqa: F401 - re-exported
                                    EvaluateConfig, FieldConfig, ModelConfig, OptimConfig, RuntimeConfig,
                                    SampleConfig, SamplerConfig, ScoreNetConfig, SDEConfig, SteerConfig,
                                    TrainConfig, WandbConfig)

_ABSENT = object()
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the fix."""


USER_ERRORS: list[type[BaseException]] = [ConfigError]


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


# --------------------------------------------------------------------------- entry registry
@dataclass(frozen=True)
class Entry:
    """An entry point's config: its schema, its shipped YAML files (``configs/``, merged in
    order), the module that registers its checks (imported by :func:`compose` before checking,
    so a config is checked the same way whoever composes it) and a base entry whose checks apply
    too."""

    name: str
    schema: type
    yamls: tuple[str, ...]
    checks_module: Optional[str] = None
    base: Optional[str] = None


ENTRIES: dict[str, Entry] = {}
ENTRY_SCHEMAS: dict[str, type] = {}  # name -> schema (every registered entry)
_CHECKS: dict[str, dict[str, Callable[[DictConfig], None]]] = {}


def register_entry(name: str, schema: type, yamls: Sequence[str] | None = None,
                   checks_module: str | None = None, base: str | None = None) -> None:
    """Make ``schema`` (a dataclass) the config of entry point ``name``: ``compose(name, ...)``
    merges ``configs/<yaml>`` for each of ``yamls`` (default ``<name>.yaml``) over its defaults.
    A name registered with another schema is refused (ValueError), never overwritten."""
    old = ENTRIES.get(name)
    if old is not None and (old.schema.__module__, old.schema.__qualname__) != (schema.__module__, schema.__qualname__):
        raise ValueError(f"entry point '{name}' is already registered with {old.schema.__module__}."
                         f"{old.schema.__qualname__}; choose another name for {schema.__qualname__}")
    ENTRIES[name] = Entry(name, schema, tuple(yamls if yamls is not None else (f"{name}.yaml",)),
                          checks_module, base)
    ENTRY_SCHEMAS[name] = schema


def register_check(entry: str, fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Run ``fn(cfg)`` whenever a config of ``entry`` is composed (after the built-in choice and
    range checks); ``fn`` raises a registered user error naming the key and the fix. Registering
    the same function again (a module imported twice) replaces it."""
    _CHECKS.setdefault(entry, {})[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


register_entry("train", TrainConfig, checks_module="spindiff.training.train")
register_entry("sample", SampleConfig, checks_module="spindiff.generation.sample")
register_entry("evaluate", EvaluateConfig, yamls=("sample.yaml", "evaluate.yaml"),
               checks_module="spindiff.evaluation.evaluate", base="sample")
# "analysis" is registered by analysis/config.py when analysis is imported (spindiff never imports it)

# keys that moved to another entry point: the error says where they went
MOVED_KEYS = {
    "eval": "eval.* configures the evaluation, which has its own entry point: "
            "python -m spindiff.evaluate [sample.py keys] eval.n_draws=... (configs/evaluate.yaml)",
}


# --------------------------------------------------------------------------- value checks
# choice fields with a closed set of values (registries that code extends -- sampler.name,
# sampler.method, objective, weighting, sde.schedule -- are checked by the entry points' checks)
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


def _fmt_value(v: Any) -> str:
    if isinstance(v, DictConfig) or OmegaConf.is_list(v):
        v = OmegaConf.to_container(v)
    return repr(v) if isinstance(v, str) else str(v)


def _defaults(cfg: DictConfig) -> DictConfig:
    """The dataclass defaults of ``cfg``'s schema (the source of a valid example), else ``cfg``."""
    t = OmegaConf.get_type(cfg)
    return OmegaConf.structured(t) if t is not None and dataclasses.is_dataclass(t) else cfg


def _builtin_checks(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        v = OmegaConf.select(cfg, key, default=_ABSENT)
        if v is _ABSENT:
            continue
        if v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1, cutoff=0.6)
            raise ConfigError(f"{key}={_fmt_value(v)}: choose one of {', '.join(choices)}"
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
            raise ConfigError(f"{key}={_fmt_value(v)}: must be {what}"
                              + ("" if "e.g." in what else f" (e.g. {_example(_defaults(cfg), key)})"))
    dev = OmegaConf.select(cfg, "model.device", default=_ABSENT)
    if dev is not _ABSENT and not (isinstance(dev, str) and _DEVICE.fullmatch(dev)):
        raise ConfigError(f"model.device={_fmt_value(dev)}: use auto, cpu, cuda or cuda:N (e.g. model.device=cpu)")
    sde = cfg.get("sde")
    if isinstance(sde, DictConfig):
        if sde.beta_max < sde.beta_min:
            raise ConfigError(f"sde.beta_max={sde.beta_max} is below sde.beta_min={sde.beta_min}; "
                              "the schedule must not decrease (e.g. sde.beta_min=0.1 sde.beta_max=20)")
        if not sde.t_eps < sde.T:
            raise ConfigError(f"sde.t_eps={sde.t_eps} must be below sde.T={sde.T} (e.g. sde.t_eps=0.001)")
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "source" in data:
        if data.source == "file" and not data.path:
            raise ConfigError("data.source=file needs data.path=FILE (a UTF-8 text file)")
        if data.source == "file" and not Path(data.path).is_file():
            raise ConfigError(f"data.path={data.path!r}: no such file (data.source=file reads a UTF-8 text file)")
        if data.source == "lm" and data.n_sequences < 2:
            raise ConfigError(f"data.n_sequences={data.n_sequences}: sample at least 2 sequences "
                              "(the train/val split is by sequence; e.g. data.n_sequences=256)")
    eval_t = cfg.get("eval_t")
    if eval_t is not None and isinstance(sde, DictConfig):
        bad = [t for t in eval_t if not (_num(t) and 0 < t <= sde.T)]
        if bad:
            raise ConfigError(f"eval_t={_fmt_value(eval_t)}: every time must lie in (0, sde.T={sde.T}] "
                              "(e.g. eval_t=[0.4,0.5,0.7])")


def check(entry: str, cfg: DictConfig) -> DictConfig:
    """Check a composed config of ``entry``: the built-in choice and range checks, then the
    checks registered for the entry (and its base). Raises the first problem found."""
    spec = ENTRIES[entry]
    _builtin_checks(cfg)
    names = [entry] + ([spec.base] if spec.base else [])
    for name in names:
        mod = ENTRIES[name].checks_module
        if mod:
            importlib.import_module(mod)  # registers its checks
    for name in reversed(names):  # the base's checks first
        for fn in list(_CHECKS.get(name, {}).values()):
            fn(cfg)
    return cfg


# --------------------------------------------------------------------------- composition
def _valid_keys(schema: DictConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for k, v in schema.items():
        full = f"{prefix}{k}"
        if isinstance(v, DictConfig) and not OmegaConf.is_missing(schema, k) and full != "trainer":
            keys.extend(_valid_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _section_keys(valid: Sequence[str], section: str) -> list[str]:
    """The keys directly inside ``section`` ("" = top level; sub-sections shown as ``name.*``)."""
    prefix = section + "." if section else ""
    out: list[str] = []
    for k in valid:
        if k.startswith(prefix):
            rest = k[len(prefix):]
            item = rest.split(".", 1)[0] + (".*" if "." in rest else "")
            if item not in out:
                out.append(item)
    return out


def _key_error(key: str, schema: DictConfig, where: str) -> ConfigError:
    """Unknown key: the closest valid keys and the keys of the nearest section (not all ~60)."""
    top = key.split(".", 1)[0]
    if top in MOVED_KEYS and top not in schema:
        return ConfigError(f"unknown config key '{key}' ({where}): {MOVED_KEYS[top]}")
    valid = _valid_keys(schema)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    # nearest section: the one the key names if it exists, else the best suggestion's
    section = key.rsplit(".", 1)[0] if "." in key else ""
    if section and not any(k.startswith(section + ".") for k in valid):
        section = close[0].rsplit(".", 1)[0] if close and "." in close[0] else ""
    keys = _section_keys(valid, section)
    where_keys = f"Keys of {section}" if section else "Top-level keys"
    return ConfigError(f"unknown config key '{key}' ({where}).{hint} {where_keys}: {', '.join(keys)}")


def _merge_checked(base: DictConfig, other: DictConfig, where: str) -> DictConfig:
    """Merge ``other`` into ``base``, turning an unknown key into a ConfigError."""
    flat = _flatten(OmegaConf.to_container(other, resolve=False))
    schema = base
    for k in flat:
        if k.startswith("trainer.") or k == "trainer":
            continue
        if OmegaConf.select(schema, k, default=_ABSENT) is _ABSENT:
            raise _key_error(k, schema, where)
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:  # pragma: no cover - guarded above
        raise ConfigError(f"{e} ({where})") from None
    except ValidationError as e:
        raise _value_error(e, base, flat, where) from None


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
_KIND = (("Integer", "an integer"), ("Float", "a number"), ("bool", "true or false"),
         ("ListConfig", "a list like [a,b]"), ("'str'", "a string (quote it if it looks like a number)"))


def _example(base: DictConfig, key: str) -> str:
    """``key=<a valid value>``: the key's current (default) value, or one from :data:`EXAMPLES`."""
    v = OmegaConf.select(base, key, default=None)
    if key in EXAMPLES and (v in (None, "") or (OmegaConf.is_list(v) and len(v) == 0)):
        return f"{key}={EXAMPLES[key]}"
    if v is None or v == "":
        return f"{key}={EXAMPLES.get(key, 'VALUE')}"
    return f"{key}={_fmt_value(v).lower() if isinstance(v, bool) else _fmt_value(v)}"


def _value_error(e: ValidationError, base: DictConfig, flat: dict[str, Any], where: str) -> ConfigError:
    """A value OmegaConf cannot store in its field, as one line naming the key, the value, the
    type it needs and a valid example (``sampler.steps=abc: expected an integer, e.g. sampler.steps=10``)."""
    key = str(getattr(e, "full_key", "") or "")
    raw = flat.get(key, getattr(e, "value", None))
    msg = str(getattr(e, "msg", e)).split("\n")[0]
    kind = next((k for t, k in _KIND if t in msg), None)
    if not key:
        return ConfigError(f"invalid value ({where}): {msg}")
    need = f"expected {kind}" if kind else msg
    if raw is None:
        empty = f" ({key}='' for an empty string)" if kind and kind.startswith("a string") else ""
        return ConfigError(f"{key}= is empty ({where}): give a value{empty}, e.g. {_example(base, key)}")
    return ConfigError(f"{key}={_fmt_value(raw)} is not valid ({where}): {need}; e.g. {_example(base, key)}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        if not d and prefix:
            out[prefix[:-1]] = d
        for k, v in d.items():
            if isinstance(v, dict) and prefix + str(k) != "trainer":
                out.update(_flatten(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
    return out


def compose(entry: str, overrides: Sequence[str] = (), config_dir: Path | None = None,
            check_values: bool = True) -> DictConfig:
    """Build and check the config of entry point ``entry`` (train | sample | evaluate | analysis).

    Args:
        entry: which entry point.
        overrides: ``key=value`` strings; ``experiment=NAME`` and ``config=FILE`` select YAML files.
        config_dir: where the shipped YAML lives (default ``configs/`` at the repo root).
        check_values: run :func:`check` on the result (choices, ranges, the entry's checks).

    Raises:
        ConfigError: unknown key (naming it, the closest keys and its section's keys), malformed
            override, missing file, a value outside its choices or range; or another registered
            user error from an entry point's checks.
    """
    if entry not in ENTRIES:
        raise ConfigError(f"unknown entry point '{entry}'; choose one of {sorted(ENTRIES)}")
    config_dir = config_dir or CONFIG_DIR
    cfg = OmegaConf.structured(ENTRIES[entry].schema)
    for name in ENTRIES[entry].yamls:
        base_yaml = config_dir / name
        if base_yaml.exists():
            cfg = _merge_checked(cfg, OmegaConf.load(base_yaml), str(base_yaml))

    dotlist: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. model.name=smollm2-135m)"
            )
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key == "experiment":
            path = config_dir / "experiment" / f"{value}.yaml"
            if not path.exists():
                names = sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))
                raise ConfigError(f"no experiment '{value}' in {path.parent}; available: {names}")
            cfg = _merge_checked(cfg, OmegaConf.load(path), str(path))
        elif key == "config":
            path = Path(value)
            if not path.exists():
                raise ConfigError(f"config file '{value}' not found")
            cfg = _merge_checked(cfg, OmegaConf.load(path), str(path))
        else:
            dotlist.append(f"{key}={value}")
    if dotlist:
        try:
            cli = OmegaConf.from_dotlist(dotlist)
        except Exception as e:  # malformed YAML value
            raise ConfigError(f"cannot parse command-line overrides {dotlist}: {e}") from None
        cfg = _merge_checked(cfg, cli, "command line")
    return check(entry, cfg) if check_values else cfg


def to_object(cfg: DictConfig) -> Any:
    """The typed dataclass instance for a composed config."""
    return OmegaConf.to_object(cfg)


def help_text(entry: str, usage: str) -> str:
    cfg = compose(entry, (), check_values=False)
    return (
        f"{usage.strip()}\n\nOverrides are key=value (OmegaConf dotlist); experiment=NAME loads "
        f"configs/experiment/NAME.yaml, config=FILE a YAML file.\n\n"
        f"Config tree with defaults:\n\n{OmegaConf.to_yaml(cfg)}"
    )


def parse_cli(entry: str, argv: Sequence[str] | None, usage: str) -> DictConfig:
    """Parse an entry point's command line; print help and exit on ``-h/--help``;
    print a one-line error and exit 2 on a config error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(entry, usage))
        raise SystemExit(0)
    try:
        return compose(entry, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(entry: str, argv: Sequence[str] | None, usage: str, fn: Callable[[DictConfig], Any]) -> int:
    """An entry point's ``main``: parse and check the command line (:func:`parse_cli`), run
    ``fn(cfg)``; a registered user error prints one ``error: ...`` line on stderr and returns 2
    (anything else is a bug and keeps its traceback). Returns 0 on success."""
    try:
        cfg = parse_cli(entry, argv, usage)
        fn(cfg)
    except tuple(USER_ERRORS) as e:  # evaluated after the entry's modules registered theirs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
