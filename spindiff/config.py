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
runs; :func:`entry_config` is the one conversion of a schema dataclass or a mapping into an
entry's DictConfig. After merging, :func:`compose` checks the values with the rules of
:mod:`spindiff.config_rules` (choices, ranges, cross-field checks per section and each entry
schema's own rules, e.g. ``trainer.*`` against ``lightning.Trainer``), then with the checks that
modules above the config register with :func:`register_check` because they need a registry the
config cannot import (``sampler.*`` against the sampler classes, ``objective`` against the
training objectives, the device) -- all before any model is loaded or any run directory is
created. This module imports no entry module: a registered check runs once its module is
imported, as every entry point's ``main`` and function (``train``, ``sample``, ``evaluate``,
which call :func:`check` themselves) does. Every problem is a :class:`ConfigError` (or another
class registered with :func:`register_user_error`) whose message names the key, the value and
the fix; the CLIs print it as one ``error: ...`` line and exit with status 2.

``--help`` prints usage and the resolved config tree with its defaults.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from spindiff.config_rules import (CHOICES, EXAMPLES, RANGES, USER_ERRORS, ConfigError,  # noqa: F401 - re-exported
                                   check_evaluate, check_sections, check_train, example, finite_number, fmt_value,
                                   register_user_error)
from spindiff.config_schema import (TRAINER_DEFAULTS, ActAddConfig, DataConfig, EvalConfig,  # noqa: F401 - re-exported
                                    EvaluateConfig, FieldConfig, ModelConfig, OptimConfig, RuntimeConfig,
                                    SampleConfig, SamplerConfig, ScoreNetConfig, SDEConfig, SteerConfig,
                                    TrainConfig, WandbConfig)

_ABSENT = object()
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------- entry registry
@dataclass(frozen=True)
class Entry:
    """An entry point's config: its schema, its shipped YAML files (``configs/``, merged in
    order), the schema's own rules (:mod:`spindiff.config_rules`) and a base entry whose rules
    and checks apply too."""

    name: str
    schema: type
    yamls: tuple[str, ...]
    rules: Optional[Callable[[DictConfig], None]] = None
    base: Optional[str] = None


ENTRIES: dict[str, Entry] = {}
ENTRY_SCHEMAS: dict[str, type] = {}  # name -> schema (every registered entry)
_CHECKS: dict[str, dict[str, Callable[[DictConfig], None]]] = {}


def register_entry(name: str, schema: type, yamls: Sequence[str] | None = None,
                   rules: Callable[[DictConfig], None] | None = None, base: str | None = None) -> None:
    """Make ``schema`` (a dataclass) the config of entry point ``name``: ``compose(name, ...)``
    merges ``configs/<yaml>`` for each of ``yamls`` (default ``<name>.yaml``) over its defaults
    and runs ``rules(cfg)`` after the section rules. A name registered with another schema is
    refused (ValueError), never overwritten. Nothing is imported here: a module registers its
    own checks with :func:`register_check` as it is imported."""
    old = ENTRIES.get(name)
    if old is not None and (old.schema.__module__, old.schema.__qualname__) != (schema.__module__, schema.__qualname__):
        raise ValueError(f"entry point '{name}' is already registered with {old.schema.__module__}."
                         f"{old.schema.__qualname__}; choose another name for {schema.__qualname__}")
    ENTRIES[name] = Entry(name, schema, tuple(yamls if yamls is not None else (f"{name}.yaml",)), rules, base)
    ENTRY_SCHEMAS[name] = schema


def register_check(entry: str, fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Run ``fn(cfg)`` whenever a config of ``entry`` is checked (after the rules of
    :mod:`spindiff.config_rules`), from the moment the module defining ``fn`` is imported: for
    checks that need a registry above the config (sampler classes, training objectives). ``fn``
    raises a registered user error naming the key and the fix. Registering the same function
    again (a module imported twice) replaces it."""
    _CHECKS.setdefault(entry, {})[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


register_entry("train", TrainConfig, rules=check_train)
register_entry("sample", SampleConfig)
register_entry("evaluate", EvaluateConfig, yamls=("sample.yaml", "evaluate.yaml"), rules=check_evaluate, base="sample")
# "analysis" is registered by analysis/config.py when analysis is imported (spindiff never imports it)

# keys that moved to another entry point: the error says where they went
MOVED_KEYS = {
    "eval": "eval.* configures the evaluation, which has its own entry point: "
            "python -m spindiff.evaluate [sample.py keys] eval.n_draws=... (configs/evaluate.yaml)",
}


# --------------------------------------------------------------------------- checking
def check(entry: str, cfg: DictConfig) -> DictConfig:
    """Check a config of ``entry``: the section rules, the schema rules of the entry's base and
    the entry, then the checks registered for them (the base's first). Raises the first problem."""
    spec = ENTRIES[entry]
    check_sections(cfg)
    names = ([spec.base] if spec.base else []) + [entry]
    for name in names:
        if ENTRIES[name].rules is not None:
            ENTRIES[name].rules(cfg)
    for name in names:
        for fn in list(_CHECKS.get(name, {}).values()):
            fn(cfg)
    return cfg


def entry_config(entry: str, cfg: Any) -> DictConfig:
    """``cfg`` as a DictConfig of ``entry``'s schema: a DictConfig of that schema (or a subclass;
    what :func:`compose` returns) as is, the same object; anything else -- the schema dataclass, a
    config of another entry, a plain mapping -- merged over the schema's defaults (which equal the
    shipped YAML, so this composes like the CLI without its overrides). Unchecked."""
    schema = ENTRIES[entry].schema
    if isinstance(cfg, DictConfig) and issubclass(OmegaConf.get_type(cfg) or dict, schema):
        return cfg
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(OmegaConf.create(cfg)))


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


_KIND = (("Integer", "an integer"), ("Float", "a number"), ("bool", "true or false"),
         ("ListConfig", "a list like [a,b]"), ("'str'", "a string (quote it if it looks like a number)"))


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
        return ConfigError(f"{key}= is empty ({where}): give a value{empty}, e.g. {example(base, key)}")
    return ConfigError(f"{key}={fmt_value(raw)} is not valid ({where}): {need}; e.g. {example(base, key)}")


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
