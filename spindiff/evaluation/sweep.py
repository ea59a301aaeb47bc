"""Grid sweeps over sampler settings (eta x lambda x steps), offline, logged to W&B.

    python -m spindiff.sweep [SWEEP.yaml] [--quick] [--out DIR] [key=value ...]

``SWEEP.yaml`` (default ``configs/sweep/eta_lambda.yaml``) is a W&B sweep file: ``method: grid``,
``parameters`` with ``values`` (swept) or ``value`` (fixed) for keys of ``sample.py``/``spindiff.evaluation.evaluate``,
and ``metric`` (name, goal) to pick the best point. The same file works online with
``wandb sweep`` / ``wandb agent`` (its ``command`` runs ``python -m spindiff.evaluate`` with
``${args_no_hyphens}``). Offline, this module loads the model once, evaluates every grid
point in-process (:func:`spindiff.evaluation.evaluate.evaluate`, sharing the LM forward of the prompt
set), logs each point as one W&B run (offline unless a key is configured) under one group,
and writes to the output folder (default ``runs/sweep/<name>-<timestamp>``):

* ``summary.csv``: one row per point, every metric's mean and 95% CI half-width over seeds;
* ``heatmap_<metric>[_steps<k>].png``: eta x lambda heatmaps (one per steps value);
* ``best.json``: the best point by ``metric`` (and the best by a few other metrics);
* ``sweep.yaml`` (the resolved sweep) and ``run.json``.

Extra ``key=value`` arguments override every point (e.g. ``model.name=tiny-gpt2 ckpt=none``);
``--quick`` shrinks the evaluation (8 prompts, one seed, 32 draws, no generation).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf

from spindiff.config import CONFIG_DIR, ConfigError, compose
from spindiff.runtime import atomic_savefig, atomic_write_json, atomic_write_text, git_commit, package_versions

__all__ = ["SweepSpec", "load_sweep", "grid_points", "run_sweep", "write_heatmaps", "main"]

DEFAULT_SWEEP = CONFIG_DIR / "sweep" / "eta_lambda.yaml"
QUICK = ["eval.n_prompts=8", "eval.seeds=[0]", "eval.n_draws=32", "eval.generation=false"]
HEATMAP_METRICS = ("fidelity/tv", "fidelity/kl", "fidelity/top1_agreement", "fidelity/logprob",
                   "gen/perplexity", "gen/distinct_2", "cost/tokens_per_s")
GOALS = {"fidelity/tv": "minimize", "fidelity/kl": "minimize", "fidelity/top1_agreement": "maximize",
         "fidelity/logprob": "maximize", "gen/perplexity": "minimize"}


@dataclass
class SweepSpec:
    """A parsed W&B-format grid sweep: swept ``grid`` values and ``fixed`` values per key."""

    name: str
    method: str
    metric: str
    goal: str
    grid: dict[str, list[Any]]
    fixed: dict[str, Any]
    raw: dict[str, Any]


def _override(key: str, value: Any) -> str:
    """key=value in the form OmegaConf's dotlist parses back to the same value."""
    if isinstance(value, float) and math.isinf(value):
        return f"{key}={'inf' if value > 0 else '-inf'}"
    if value is None:
        return f"{key}=null"
    if isinstance(value, (list, dict, bool)):
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Parse and check a sweep file (ConfigError naming the problem otherwise)."""
    import spindiff.generation.sample  # noqa: F401 - registers the sample entry's checks (sampler classes, steering)

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file {path} not found (default: {DEFAULT_SWEEP})")
    raw = yaml.safe_load(path.read_text()) or {}
    method = raw.get("method", "grid")
    if method != "grid":
        raise ConfigError(f"{path}: method={method!r}; the offline runner does grids only (use method: grid, "
                          "or run random/bayes sweeps online with `wandb sweep` + `wandb agent`)")
    params = raw.get("parameters") or {}
    if not params:
        raise ConfigError(f"{path} has no 'parameters'")
    grid, fixed = {}, {}
    for key, spec in params.items():
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec)):
            raise ConfigError(f"{path}: parameter {key!r} needs 'values: [...]' or 'value: x' (grid sweeps)")
        if "values" in spec:
            vals = list(spec["values"])
            if not vals:
                raise ConfigError(f"{path}: parameter {key!r} has an empty 'values' list")
            grid[key] = vals
        else:
            fixed[key] = spec["value"]
    metric = raw.get("metric") or {}
    compose("evaluate", [_override(k, v) for k, v in {**fixed, **{k: v[0] for k, v in grid.items()}}.items()])
    return SweepSpec(name=str(raw.get("name", path.stem)), method=method, metric=str(metric.get("name", "fidelity/tv")),
                     goal=str(metric.get("goal", "minimize")), grid=grid, fixed=fixed, raw=raw)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the swept values, in file order (last key fastest)."""
    keys = list(spec.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))]


def _fmt_val(v: Any) -> str:
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:g}" if isinstance(v, float) else str(v)


def run_sweep(spec: SweepSpec, extra: Sequence[str] = (), out: Optional[str | os.PathLike] = None,
              session: Any = None, log_wandb: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate every grid point; write summary.csv, heatmaps and best.json. Returns
    {"rows": [...], "best": {...}, "out": Path, "group": str}."""
    from spindiff.evaluation.evaluate import EvalCache, evaluate
    from spindiff.generation import GenerationSession, SampleError
    from spindiff.generation.sample import resolve_model

    base = [_override(k, v) for k, v in spec.fixed.items()] + list(extra)
    points = grid_points(spec)
    cfgs = [compose("evaluate", base + [_override(k, v) for k, v in point.items()]) for point in points]  # all checked first
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else Path("runs") / "sweep" / f"{spec.name}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    group = f"sweep-{spec.name}-{stamp}"
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump({**spec.raw, "extra_overrides": list(extra)}, sort_keys=False))
    atomic_write_json(out / "run.json", {"kind": "sweep", "started": stamp, "argv": sys.argv, "group": group,
                                         "versions": package_versions(), "git_commit": git_commit()})
    cache = EvalCache()
    rows: list[dict[str, Any]] = []
    done: dict[str, Any] = {}  # canonical settings -> result (eta = 0 makes lam irrelevant)
    for i, (point, cfg) in enumerate(zip(points, cfgs)):
        canon = cfg.copy()
        if float(canon.sampler.eta) == 0.0:
            canon.sampler.lam = float("inf")  # no field term: precession off too, same sampler
        canon_key = OmegaConf.to_yaml(canon)
        resolve_model(cfg)  # model.name=auto + ckpt=PATH: the checkpoint's model
        if session is None:
            session = GenerationSession.load(cfg.model)
        tag = ",".join(f"{k.split('.')[-1]}={_fmt_val(v)}" for k, v in point.items())
        row: dict[str, Any] = {k: v for k, v in point.items()}
        try:
            res = done[canon_key] if canon_key in done else evaluate(cfg, session=session, cache=cache, log=False)
            done[canon_key] = res
        except SampleError as e:
            row.update(status="skipped", reason=str(e))
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(points)}] {tag}: skipped ({str(e)[:100]})", file=sys.stderr, flush=True)
            continue
        flat = res.flat()
        row.update(status="ok", label=flat.get("label"), field_only=flat.get("field_only"), ckpt=flat.get("ckpt"))
        row.update({k: v for k, v in flat.items() if "/" in k})
        rows.append(row)
        if progress:
            m = spec.metric
            print(f"[{i + 1}/{len(points)}] {tag}: {m}={flat.get(m, float('nan')):.4g}"
                  + (f" ± {flat.get(m + '_ci'):.2g}" if math.isfinite(flat.get(m + "_ci", float("nan"))) else ""),
                  file=sys.stderr, flush=True)
        if log_wandb:
            _log_point(cfg, out, group, tag, res)
    _write_csv(out / "summary.csv", rows)
    best = best_points(rows, spec.metric, spec.goal)
    atomic_write_json(out / "best.json", best)
    write_heatmaps(rows, out, spec)
    return {"rows": rows, "best": best, "out": out, "group": group}


def best_points(rows: Sequence[dict[str, Any]], metric: str, goal: str) -> dict[str, Any]:
    """The best ok row by ``metric`` (and by each metric of GOALS present)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    res: dict[str, Any] = {"metric": metric, "goal": goal}
    for m, g in {metric: goal, **GOALS}.items():
        cand = [r for r in ok if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
        if not cand:
            continue
        b = (min if g == "minimize" else max)(cand, key=lambda r: r[m])
        res["best" if m == metric else f"best_by/{m}"] = {k: (None if isinstance(v, float) and not math.isfinite(v)
                                                               and not math.isinf(v) else v) for k, v in b.items()}
    return res


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_val(v) if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _log_point(cfg: Any, out: Path, group: str, name: str, res: Any) -> None:
    from spindiff.tracking import log_once

    log_once(cfg.wandb, out, cfg, {k: v for k, v in res.flat().items() if "/" in k}, name=name,
             job_type="sweep", group=group)


def write_heatmaps(rows: Sequence[dict[str, Any]], out: Path, spec: SweepSpec) -> list[Path]:
    """eta x lambda heatmaps of each metric (one figure per steps value). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ek, lk, sk = "sampler.eta", "sampler.lam", "sampler.steps"
    if ek not in spec.grid or lk not in spec.grid:
        return []
    etas, lams = spec.grid[ek], spec.grid[lk]
    steps_vals = spec.grid.get(sk, [spec.fixed.get(sk)])
    paths = []
    for metric in HEATMAP_METRICS:
        if not any(isinstance(r.get(metric), (int, float)) for r in rows):
            continue
        for st in steps_vals:
            Z = np.full((len(etas), len(lams)), np.nan)
            for r in rows:
                if r.get("status") != "ok" or (sk in spec.grid and r.get(sk) != st):
                    continue
                i, j = etas.index(r[ek]), lams.index(r[lk])
                v = r.get(metric)
                Z[i, j] = v if isinstance(v, (int, float)) else np.nan
            if np.isnan(Z).all():
                continue
            fig, ax = plt.subplots(figsize=(1.3 + 1.1 * len(lams), 1.0 + 0.6 * len(etas)))
            im = ax.imshow(Z, cmap="viridis_r" if GOALS.get(metric) == "minimize" else "viridis", aspect="auto")
            ax.set_xticks(range(len(lams)), [_fmt_val(float(x)) for x in lams])
            ax.set_yticks(range(len(etas)), [_fmt_val(float(x)) for x in etas])
            ax.set_xlabel("lambda (Gilbert damping; inf = no precession)")
            ax.set_ylabel("eta (field strength)")
            for i in range(len(etas)):
                for j in range(len(lams)):
                    nan = bool(np.isnan(Z[i, j]))
                    ax.text(j, i, "skip" if nan else f"{Z[i, j]:.3g}", ha="center", va="center",
                            color="0.4" if nan else "w", fontsize=8)
            ax.set_title(f"{metric} ({spec.name}, steps={st})", fontsize=9)
            fig.colorbar(im, ax=ax)
            name = metric.replace("/", "_")
            path = out / (f"heatmap_{name}.png" if len(steps_vals) == 1 else f"heatmap_{name}_steps{st}.png")
            atomic_savefig(fig, path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


USAGE = __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module docstring). Exit 2 with ``error: ...`` on bad input."""
    import spindiff.checkpoint  # noqa: F401 - registers CheckpointError as a user error
    import spindiff.evaluation.evaluate  # noqa: F401 - SampleError (via spindiff.generation.sample)
    import spindiff.lm.models  # noqa: F401 - ModelLoadError
    from spindiff.config import USER_ERRORS

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    path, out, quick, extra = DEFAULT_SWEEP, None, False, []
    it = iter(argv)
    for a in it:
        if a == "--quick":
            quick = True
        elif a == "--out":
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif "=" in a:
            extra.append(a)
        elif a.endswith((".yaml", ".yml")):
            path = Path(a)
        else:
            print(f"error: unexpected argument {a!r} (expected SWEEP.yaml, --quick, --out DIR or key=value)",
                  file=sys.stderr)
            return 2
    try:
        spec = load_sweep(path)
        res = run_sweep(spec, (QUICK if quick else []) + extra, out)
    except tuple(USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = res["best"].get("best")
    print(f"wrote {res['out'] / 'summary.csv'}, heatmaps and best.json (W&B group {res['group']})", file=sys.stderr)
    if best:
        print(f"best by {spec.metric} ({spec.goal}): " + json.dumps({k: v for k, v in best.items()
                                                                      if k.startswith("sampler.") or k == spec.metric}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
