"""Evaluation of next-token samplers: plain metric functions and a runner.

Metrics: :mod:`spindiff.evaluation.metrics` (next-token fidelity, continuations, continuation-level
exactness ``gen/excess``, cost, attractor diagnostics; re-exported here).

Every number is computed once per seed; the runner reports the mean and a 95% Student-t
confidence interval over seeds (:func:`mean_ci`).

Runner: ``python -m spindiff.evaluate [key=value ...]`` (config entry ``evaluate``:
:class:`spindiff.config.EvaluateConfig`, configs/sample.yaml then configs/evaluate.yaml) takes
the keys of ``sample.py`` plus ``eval.*`` (prompts, n_prompts, seeds, n_draws, fidelity,
generation); it writes ``metrics.json`` and logs to W&B (offline unless a key is configured). :func:`evaluate` is the
function behind it; sweeps and the benchmark call it with a shared :class:`GenerationSession`
and :class:`EvalCache` (the LM forward of the prompt set is done once for every sampler).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from spindiff.config import check, entry_config
from spindiff.lm.field import FieldOutput
from spindiff.runtime import atomic_write_json, prepare_run, quiet_third_party, record_model
from spindiff.evaluation.metrics import (bleu, continuation_metrics, distinct_n, empirical_distribution,  # noqa: F401
                                         excess_metrics, fidelity_metrics, kl_divergence, mean_ci, mean_draw_logprob,
                                         ngrams, perplexity, repetition_rate, self_bleu, token_excess, top1_agreement,
                                         total_variation)
from spindiff.generation import GenerationSession, Sampler, build_sampler

__all__ = [
    "total_variation", "kl_divergence", "empirical_distribution", "top1_agreement", "mean_draw_logprob",
    "perplexity", "ngrams", "distinct_n", "bleu", "self_bleu", "repetition_rate", "mean_ci",
    "fidelity_metrics", "continuation_metrics", "token_excess", "excess_metrics", "EvalCache", "EvalResult", "evaluate", "evaluate_sampler",
    "default_eval_prompts", "load_eval_prompts", "main",
]


# --------------------------------------------------------------------------- prompts
def default_eval_prompts() -> list[str]:
    """The packaged held-out prompt set (spindiff/data/eval_prompts.txt)."""
    text = resources.files("spindiff").joinpath("data/eval_prompts.txt").read_text()
    return [ln.replace("\\n", "\n") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def load_eval_prompts(spec: str = "", n: int = 0) -> list[str]:
    """``""`` -> the packaged set; else FILE (one prompt a line, '#' comments); first ``n`` if n > 0."""
    from spindiff.generation.sample import load_prompt_list

    prompts = default_eval_prompts() if not spec else load_prompt_list(spec)
    return prompts[:n] if n > 0 else prompts


# --------------------------------------------------------------------------- runner
class EvalCache:
    """LM forwards of a prompt set, shared across samplers with the same field settings.

    ``output(sampler, prompts)`` returns one :class:`FieldOutput` for all prompts (left padded,
    KV cache dropped): field, hidden and logits of the last position.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, FieldOutput] = {}

    def output(self, sampler: Sampler, prompts: Sequence[str], batch_size: int = 64) -> FieldOutput:
        key = (id(sampler.provider), tuple(prompts))
        if key not in self._store:
            sess = sampler.session
            seqs = sess.encode(prompts)
            parts = []
            for i in range(0, len(seqs), batch_size):
                ids, mask = sess.batch(seqs[i:i + batch_size])
                with torch.no_grad():
                    o = sampler.provider(ids, mask, use_cache=False)
                parts.append(o)
            self._store[key] = FieldOutput(
                per_head=torch.empty(0), field=torch.cat([o.field for o in parts]),
                field_norm=torch.cat([o.field_norm for o in parts]), hidden=torch.cat([o.hidden for o in parts]),
                logits=torch.cat([o.logits for o in parts]))
        return self._store[key]


@dataclass
class EvalResult:
    """Metrics of one sampler configuration: per seed, and mean / 95% CI half-width over seeds."""

    sampler: dict[str, Any]
    per_seed: list[dict[str, float]]
    mean: dict[str, float] = field(default_factory=dict)
    ci: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.mean and self.per_seed:
            keys = sorted({k for r in self.per_seed for k in r})
            for k in keys:
                self.mean[k], self.ci[k] = mean_ci([r.get(k, float("nan")) for r in self.per_seed])

    def flat(self) -> dict[str, Any]:
        """{metric: mean, metric_ci: half-width, plus the sampler description}."""
        out: dict[str, Any] = {k: v for k, v in self.sampler.items() if isinstance(v, (str, int, float, bool)) or v is None}
        for k, v in self.mean.items():
            out[k] = v
            out[f"{k}_ci"] = self.ci.get(k, float("nan"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "mean": self.mean, "ci95": self.ci, "per_seed": self.per_seed}


def evaluate_sampler(sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int], n_draws: int = 64,
                     max_new_tokens: int = 24, batch_size: int = 8, fidelity: bool = True, generation: bool = True,
                     cache: Optional[EvalCache] = None, stop_at_eos: bool = True,
                     progress: bool = False) -> EvalResult:
    """All metrics of ``sampler`` on ``prompts``, once per seed (see the module docstring)."""
    from spindiff.generation.sample import batch_records

    sess = sampler.session
    cache = cache or EvalCache()
    seqs = sess.encode(prompts, reserve=max_new_tokens if generation else 0)
    per_seed: list[dict[str, float]] = []
    for seed in seeds:
        row: dict[str, float] = {}
        if fidelity and n_draws > 0:
            out = cache.output(sampler, prompts)
            gen = torch.Generator().manual_seed(int(seed) * 7919 + 1)
            with torch.no_grad():
                draws = sampler.draw_from(out, n_draws, gen)  # (B, n)
            row.update(fidelity_metrics(draws, out.logits))
        if generation and max_new_tokens > 0:
            gen = torch.Generator().manual_seed(int(seed))
            records, seconds = [], 0.0
            for i in range(0, len(seqs), batch_size):
                ids, mask = sess.batch(seqs[i:i + batch_size])
                gb = sampler.generate(ids, mask, max_new_tokens, gen, stop_at_eos=stop_at_eos)
                seconds += gb.seconds
                records.extend(batch_records(sess, sampler, prompts[i:i + batch_size], gb, int(seed)))
            row.update(continuation_metrics(records, seconds, sampler.sde_steps))
            with quiet_third_party():
                row.update(excess_metrics(token_excess(sess.model, seqs, [r["token_ids"] for r in records],
                                                       sess.pad_id, batch_size)))
        per_seed.append(row)
        if progress:
            print(f"  seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k in SHORT), file=sys.stderr,
                  flush=True)
    return EvalResult(sampler.describe(), per_seed)


SHORT = ("fidelity/tv", "fidelity/top1_agreement", "gen/perplexity", "gen/excess", "gen/distinct_2", "cost/tokens_per_s")


def evaluate(cfg: Any, session: Optional[GenerationSession] = None, cache: Optional[EvalCache] = None,
             out: Optional[Path] = None, log: bool = True) -> EvalResult:
    """Evaluate the sampler of an EvaluateConfig (``compose("evaluate", ...)``: the keys of
    ``sample.py`` plus ``eval.*``; a sample config without ``eval`` gets configs/evaluate.yaml's).

    Writes ``metrics.json`` to ``out`` (or ``cfg.out`` / ``runs/eval/<timestamp>`` when ``log``)
    and logs the mean metrics to W&B. Every metric draws from generators seeded by ``eval.seeds``.
    Raises :class:`~spindiff.generation.SampleError` / :class:`~spindiff.config.ConfigError` for bad settings (before
    any model is loaded). ``cfg``: a composed config, the dataclass or a mapping (:func:`as_eval_config`).
    """
    from spindiff.generation.sample import resolve_model

    cfg = as_eval_config(cfg)
    check("evaluate", cfg)  # a programmatic call is checked exactly like the CLI
    resolve_model(cfg)
    e = cfg.eval
    prompts = load_eval_prompts(e.prompts, int(e.n_prompts))
    if session is None:
        session = GenerationSession.load(cfg.model)
    sampler = build_sampler(cfg, session)
    with quiet_third_party():
        result = evaluate_sampler(sampler, prompts, [int(s) for s in e.seeds], int(e.n_draws),
                                  int(cfg.max_new_tokens), int(cfg.sampler.batch_size), bool(e.fidelity),
                                  bool(e.generation), cache, bool(cfg.stop_at_eos))
    result.sampler.update(model=session.name, n_prompts=len(prompts), max_new_tokens=int(cfg.max_new_tokens),
                          n_draws=int(e.n_draws))
    if log:
        out = out or prepare_run(cfg, "eval")
        record_model(out, session.lm.info)
        atomic_write_json(Path(out) / "metrics.json", result.to_json())
        _log_wandb(cfg, Path(out), result)
    return result


def as_eval_config(cfg: Any) -> DictConfig:
    """An EvaluateConfig as a DictConfig: a composed ``evaluate`` config as is; the dataclass, a
    sample config or a plain mapping merged over the ``evaluate`` defaults (configs/evaluate.yaml;
    :func:`spindiff.config.entry_config`)."""
    return entry_config("evaluate", cfg)


def _log_wandb(cfg: DictConfig, out: Path, result: EvalResult) -> None:
    from spindiff.tracking import log_once

    log_once(cfg.wandb, out, cfg, result.flat(), name=result.sampler.get("label"), job_type="eval",
             group=cfg.wandb.group or "eval")


def format_table(rows: Sequence[EvalResult], keys: Sequence[str] = SHORT) -> str:
    """A plain-text table: one row per result, 'mean ± CI' per key."""
    head = ["sampler"] + list(keys)
    lines = [" | ".join(head)]
    for r in rows:
        cells = [str(r.sampler.get("label"))]
        for k in keys:
            m, c = r.mean.get(k, float("nan")), r.ci.get(k, float("nan"))
            cells.append(f"{m:.4g}" + ("" if not math.isfinite(c) else f" ± {c:.2g}"))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


USAGE = """usage: python -m spindiff.evaluate [key=value ...]

Evaluate one sampler on the held-out prompt set (spindiff/data/eval_prompts.txt): next-token
fidelity vs the LM softmax, perplexity, diversity, cost; mean and 95% CI over eval.seeds.
Keys: those of sample.py plus eval.prompts, eval.n_prompts, eval.seeds, eval.n_draws,
eval.fidelity, eval.generation (defaults: configs/evaluate.yaml). Bad input prints
`error: ...` and exits with status 2 before anything is loaded or written. Example:
  python -m spindiff.evaluate sampler.name=spin sampler.eta=1 sampler.lam=1 sampler.steps=20 \\
      ckpt=auto eval.n_prompts=10 eval.seeds=[0,1] max_new_tokens=16"""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the metric table and the path of metrics.json; ``error: ...`` and exit 2 on bad input."""
    import spindiff.checkpoint  # noqa: F401 - registers CheckpointError as a user error
    import spindiff.lm.models  # noqa: F401 - ModelLoadError
    from spindiff.config import run_cli

    def run(cfg: DictConfig) -> None:
        res = evaluate(cfg)
        print(format_table([res]))
        print(json.dumps({k: v for k, v in res.mean.items()}, indent=1))
        print(f"wrote {Path(cfg.out) / 'metrics.json'}", file=sys.stderr)

    return run_cli("evaluate", argv, USAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
