"""The ``analysis`` entry point's config (``python -m analysis <command>``; docs/analysis.md).

Registered with :func:`spindiff.config.register_entry` when this module is imported (``import
analysis`` does it), so ``spindiff.config.compose("analysis", ...)`` merges ``configs/analysis.yaml``
over these defaults and then runs :func:`check_config`. spindiff never imports analysis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from analysis.gaps import CANDIDATES, PROTOCOLS
from analysis.loops import RepetitionConfig, check_rep  # issue 21
from analysis.predictors import BeyondConfig, check_beyond  # issue 20
from analysis.prompts import PromptFileError, PromptTokenError, load_prompts
from spindiff.config import ConfigError, ModelConfig, RuntimeConfig, register_check, register_entry, register_user_error
from spindiff.lm.adapter import HeadSpecError

ABLATIONS = ("zero", "mean")
VARIANTS = ("paper", "reference")


@dataclass
class AnalysisConfig:
    """``python -m analysis <command>``: per-head logit-gap analysis (docs/analysis.md).

    protocol: ``paper`` (the reference code exactly, incl. its W_O slice), ``paper_fixed``
    (correct W_O block), ``in_situ`` (each head's real output, direct logit attribution).
    prompts / heldout: ``paper`` | ``extended`` | ``heldout`` (bundled) or a .jsonl/.json/.csv
    file with prompt, good, bad. ``prompt_id`` in every output = 0-based row of the set.
    """

    model: ModelConfig = _field(default_factory=ModelConfig)
    runtime: RuntimeConfig = _field(default_factory=RuntimeConfig)  # threads (README: Timings)
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
    ablate: str = "L3H5,L0H0"  # heads for the targeted ablation (the paper's Fig. 4 heads; on a model
    #                            they do not fit, `all` uses the two top heads of the stats stage)
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
    pair_top_k: int = 10  # beyond / pairs: heads (largest exact zero-ablation effect) whose pairs are ablated
    qkv_split: bool = True  # beyond / paths: split the head paths into queries, keys and values
    qk_fix: bool = True  # beyond / attribution: the AtP* attention-saturation correction
    hybrid_layers: int = 2  # beyond: the hybrid predictor scans the heads of layers < this exactly (0 = off)
    batch_size: int = 16
    progress: bool = True
    seed: int = 0
    out: str = ""
    # --- issue 21: `repetition` / `errors` commands (analysis/repetition.py, analysis/errors.py)
    quick: bool = False  # repetition: a small grid (under 2 minutes on 2 cores)
    repetition: RepetitionConfig = _field(default_factory=RepetitionConfig)
    # --- issue 20: `beyond` predictors past AtP (analysis/predictors.py, analysis/predictor_table.py)
    beyond: BeyondConfig = _field(default_factory=BeyondConfig)


def default(key: str):
    """The dataclass default of a top-level key (how a stage knows a value was not chosen)."""
    return AnalysisConfig.__dataclass_fields__[key].default


def check_config(cfg: DictConfig) -> None:
    """Choices and ranges of the analysis keys, checked when the config is composed (before any
    model is loaded)."""
    for key, choices in (("protocol", PROTOCOLS), ("candidates", CANDIDATES), ("ablation", ABLATIONS),
                         ("variant", VARIANTS)):
        if cfg[key] not in choices:
            raise ConfigError(f"{key}={cfg[key]}: use one of {', '.join(choices)} (e.g. {key}={choices[0]})")
    for key, low in (("top_k", 1), ("n_permutations", 1), ("n_bootstrap", 1), ("n_splits", 1), ("t_steps", 2),
                     ("batch_size", 1), ("scan_prompts", 0), ("pair_top_k", 2), ("landscape_prompt", 0),
                     ("hybrid_layers", 0)):
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]}: must be >= {low} (e.g. {key}={default(key)})")
    if not 0 < cfg.alpha < 1:
        raise ConfigError(f"alpha={cfg.alpha}: must lie in (0, 1) (e.g. alpha=0.05)")
    if not 0 < cfg.t_min < cfg.t_max:
        raise ConfigError(f"t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 < t_min < t_max (e.g. t_min=0.1 t_max=2.5)")
    check_head_syntax(cfg)
    check_prompt_files(cfg)
    if "repetition" in cfg:  # issue 21
        check_rep(RepetitionConfig(**OmegaConf.to_container(cfg.repetition, resolve=True)))
    if "beyond" in cfg:  # issue 20
        check_beyond(BeyondConfig(**OmegaConf.to_container(cfg.beyond, resolve=True)))


_HEAD_ITEM = re.compile(r"L\d+(H\d+)?|all", re.IGNORECASE)


def check_head_syntax(cfg: DictConfig) -> None:
    """The head specs (``heads``, ``head``, ``ablate``, ``scan_heads``) parse -- without the
    model; whether they lie inside it is checked right after it is loaded
    (:meth:`analysis.pipeline.Analysis.check_inputs`)."""
    for key in ("heads", "ablate", "scan_heads", "head"):
        spec = str(cfg.get(key) or "")
        if not spec and key in ("scan_heads", "head"):
            continue  # the defaults: `heads` / the top head
        items = [s for s in spec.replace(" ", "").split(",") if s]
        bad = [s for s in items if not _HEAD_ITEM.fullmatch(s)]
        if not items or bad:
            raise HeadSpecError(f"{key}={spec}: cannot parse head spec '{bad[0] if bad else spec}'; "
                                f"write e.g. {key}=L3H5, {key}=L3H5,L0H2 or {key}=L11 (a whole layer)"
                                + (" or all" if key != "head" else ""))
        if key == "head" and not (len(items) == 1 and re.fullmatch(r"L\d+H\d+", items[0], re.IGNORECASE)):
            raise HeadSpecError(f"head={spec} must name exactly one head, e.g. head=L3H5")


def check_prompt_files(cfg: DictConfig) -> None:
    """``prompts`` and ``heldout`` name a bundled set or a file that exists and parses (every
    row: prompt, good, bad), and ``landscape_prompt`` is a row of ``prompts`` -- read now, before
    any model is loaded."""
    n = len(load_prompts(str(cfg.prompts), str(cfg.variant)))
    if not 0 <= cfg.landscape_prompt < n:
        raise ConfigError(f"landscape_prompt={cfg.landscape_prompt} is outside the prompt set '{cfg.prompts}' "
                          f"(e.g. landscape_prompt=0; rows 0 .. {n - 1})")
    if cfg.heldout and str(cfg.heldout).lower() != "none":
        load_prompts(str(cfg.heldout), str(cfg.variant))


for _err in (PromptFileError, PromptTokenError, HeadSpecError):
    register_user_error(_err)
register_entry("analysis", AnalysisConfig)
register_check("analysis", check_config)
