"""``python -m analysis <command> [key=value ...]``: a thin CLI over :class:`analysis.pipeline.Analysis`.

Every command composes the ``analysis`` config (``configs/analysis.yaml`` + overrides; choices,
ranges, head-spec syntax and prompt files checked before any model is loaded), loads the model,
checks what needs it (heads inside it, prompts tokenised), and only then calls ``prepare_run``
(config.yaml, run.json with versions and seeds) and ``record_model`` (the model actually used),
runs its stages and returns a dict of results (``main([...])`` in tests). Bad input (a registered user error: config, prompt file, head spec,
model) prints ``error: ...`` and exits 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

import analysis.config  # noqa: F401  (registers the "analysis" entry and its user errors)
from analysis import beyond
from analysis.errors import step_errors  # issue 21
from analysis.repetition import step_repetition  # issue 21
from analysis.pipeline import Analysis
from analysis.reproduce import cmd_reproduce
from spindiff.config import USER_ERRORS, ConfigError, parse_cli
from spindiff.lm.models import LoadedModel, load_model
from spindiff.runtime import apply_threads, notice, prepare_run, progress_bars, record_model

USAGE = """\
python -m analysis <command> [key=value ...]

Per-head spin-bath logit-gap analysis (docs/analysis.md).

commands:
  gaps         dL_theory of every head and dL_actual of every prompt          -> gaps.csv
  stats        gaps + per-head r, p, BH q, permutation FWER, bootstrap CI,
               split-half stability, held-out replication, Fig. 1, heatmap    -> heads.csv, report.json/.md
  ablate       zero- and mean-ablation of `ablate` heads on ablation_prompt   -> ablation.csv, fig4_ablation.png
  scan         every head ablated alone on scan_prompts prompts; does
               dL_theory predict the causal effect?                           -> scan.csv, fig_causal.png
  temperature  mean entropy (bits) and P(top-1) vs T, one forward per prompt  -> temperature.csv, fig3_temperature.png
  landscape    Fig. 2 decision plane of `head` on prompt `landscape_prompt`   -> fig2_landscape.png
  all          everything above                                              -> + report.json, report.md
  reproduce    the paper's GPT-2 table (protocol paper vs paper_fixed vs in_situ, Fig. 4 numbers)

beyond the two-body term (on the scan prompts and heads):
  paths        first-order path decomposition of every head's ablation effect:
               direct / via later heads (Q, K, V) / via later MLPs            -> paths.csv, fig_paths.png
  attribution  attribution patching (AtP, AtP* QK fix), zero and mean,
               one forward + one backward per batch                           -> attribution.csv
  pairs        joint zero-ablation of every pair of the pair_top_k heads with
               the largest exact effect vs the sum of the singles             -> pairs.csv, fig_pairs.png
  beyond       all three + the exact scans: each predictor's correlation with
               the exact effect, recall, cost; the answer to Sec. IV.4        -> predictors.csv, fig_predictors.png, report.md

failures (issue 21; quick=true: a small grid):
  repetition   continuations over temperature x top-k, loops, the field as an
               attractor, heads vs induction scores, onset prediction, head
               gains vs repetition_penalty / no_repeat_ngram_size             -> loops.csv, repetition.json, fig_*.png
  errors       dL of right vs wrong prompts split into attention heads / MLPs /
               rest; antagonist heads, held-out replication                   -> errors.csv, errors.json, fig_errors.png

examples:
  python -m analysis all model.name=smollm2-135m out=runs/analysis-smollm2
  python -m analysis beyond model.name=smollm2-135m out=runs/beyond-smollm2
  python -m analysis stats prompts=paper protocol=paper model.name=smollm2-135m
  python -m analysis ablate ablate=L3H5,L0H0 model.name=smollm2-135m
  python -m analysis repetition model.name=smollm2-135m out=runs/repetition quick=true
  python -m analysis reproduce model.name=gpt2      (needs hub access; falls back to smollm2-135m offline)
"""


def _stages(*names: str, markdown: bool = False, label: str = "") -> Callable[[Analysis], dict[str, Any]]:
    """A command that runs the named stages in order and writes the report (its wall time in
    ``timings[label]`` when a label is given)."""
    def cmd(A: Analysis) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = {name: STAGES[name](A) for name in names}
        if label:
            A.timings[label] = time.perf_counter() - t0
        res["report"] = A.write_report(markdown=markdown)
        return res
    return cmd


STAGES: dict[str, Callable[[Analysis], Any]] = {
    "gaps": Analysis.step_gaps, "stats": Analysis.step_stats, "ablation": Analysis.step_ablate,
    "scan": Analysis.step_scan, "temperature": Analysis.step_temperature, "landscape": Analysis.step_landscape,
    "paths": beyond.step_paths, "attribution": beyond.step_attribution, "pairs": beyond.step_pairs,
    "beyond": beyond.step_beyond,
    "repetition": step_repetition, "errors": step_errors}  # issue 21

COMMANDS: dict[str, Callable[[Analysis], dict[str, Any]]] = {
    "gaps": _stages("gaps"), "stats": _stages("gaps", "stats", markdown=True), "ablate": _stages("ablation"),
    "scan": _stages("scan"), "temperature": _stages("temperature"), "landscape": _stages("landscape"),
    "all": _stages("gaps", "stats", "ablation", "scan", "temperature", "landscape", markdown=True, label="all"),
    "reproduce": cmd_reproduce,
    "paths": _stages("paths", markdown=True), "attribution": _stages("attribution"),
    "pairs": _stages("pairs", markdown=True), "beyond": _stages("gaps", "beyond", markdown=True, label="beyond"),
    "repetition": _stages("repetition", label="repetition"), "errors": _stages("errors", label="errors")}  # issue 21


def run(command: str, cfg: DictConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run ``command`` with a composed config (raises a registered user error on bad input).

    Order: the config (composed and checked: choices, ranges, head-spec syntax, prompt files
    that exist and parse) -> the model -> what needs the model (:meth:`Analysis.check_inputs`:
    heads inside it, prompts tokenised) -> only then the run directory (config.yaml, run.json).
    stdout carries each stage's result line; the model line, notes and timings go to stderr."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}'; choose one of {', '.join(COMMANDS)}")
    if command == "reproduce":
        cfg.prompts, cfg.variant, cfg.candidates, cfg.heldout, cfg.also_paper = "paper", "reference", "first_token", "", False
    apply_threads(cfg)  # runtime.threads
    with progress_bars(bool(cfg.progress)):  # progress=false: no bar at all, the model load's included
        return _run(command, cfg, lm)


def _run(command: str, cfg: DictConfig, lm: LoadedModel | None) -> dict[str, Any]:
    lm = lm or load_model(cfg.model)
    A = Analysis(cfg, lm)
    A.check_inputs()
    out = prepare_run(cfg, "analysis")
    A.out = out
    record_model(out, lm.info)
    if lm.fallback_reason:
        notice(f"model used = {lm.name} ({lm.fallback_reason})", kind="note")
    else:
        print(f"model: {lm.name} ({lm.info['n_layers']} layers x {lm.info['n_heads']} heads)", file=sys.stderr)
    res = COMMANDS[command](A)
    if command == "all":
        print(f"all: done in {A.timings['all']:.0f} s -> {A.out / 'report.md'}", file=sys.stderr)
    res.update({"command": command, "out": str(out), "model": lm.name, "analysis": A})
    return res


def main(argv: Sequence[str] | None = None, lm: LoadedModel | None = None) -> dict[str, Any]:
    """CLI entry point; returns the results dict of the command. Bad input -> one-line error, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        parse_cli("analysis", ["--help"], USAGE)  # prints usage + config tree, exits 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of {', '.join(COMMANDS)} (--help for usage)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        cfg = parse_cli("analysis", rest, USAGE)
        return run(command, cfg, lm)
    except tuple(USER_ERRORS) as e:  # registered input errors only: a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
