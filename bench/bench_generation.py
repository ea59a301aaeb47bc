"""Generation benchmark: does the physics-informed field drift help? (paper Sec. V.5)

One command, one process, one model load, every arm side by side on the same prompts and seeds:

    python bench/bench_generation.py            # full: ~20-30 min on 2 CPU cores
    python bench/bench_generation.py --quick    # a few minutes, smaller everything

Arms (all through the sampler registry of :mod:`spindiff.generation`):

* ``ar``              the LM's own sampling (``generate``, temperature 1, top-p 1): the reference
                      and the finite-sample floor of the fidelity metrics;
* ``spin eta=0``      spherical diffusion with the learned score only (trained checkpoint);
* ``spin best``       the same checkpoint plus the attention field drift eta P_S N + (eta/lam) Prec,
                      (eta, lam) = best of an eta x lambda sweep run first (fidelity/tv);
* ``spin field-only`` no learned score, field drift only (``ckpt=none``) at the best (eta, lam);
* ``euclid_ddpm``     Gaussian DDPM in embedding space, same network size and features;
* ``spin prior eta=0`` / ``spin prior best`` (with ``--prior-ckpt``, 20 steps): a checkpoint
                      trained with the analytic field term in the score (``score_net.eta_train``
                      > 0, ``experiment=field_prior``), without and with the field drift.

Measured (mean and 95% CI over seeds, :mod:`spindiff.evaluation.evaluate`): next-token fidelity (TV and
KL of the empirical next-token distribution against the LM softmax, top-1 agreement, LM
log-prob of the draws), perplexity of continuations under the LM, diversity (distinct-1/2/3,
self-BLEU, rep-2), cost (tokens/s, SDE steps per token) at steps in {10, 20, 50, 100}; fidelity
vs steps with and without precession (lam = inf); throughput of ``spin`` (20 steps) vs ``ar`` at
batch 8 and the batch-32 / batch-1 ratio. Writes ``report.md`` (tables, figures, a plain answer),
``results.json`` and PNG figures to ``--out`` (default ``runs/bench/generation-<timestamp>``).
Checkpoints: ``--spin-ckpt`` / ``--euclid-ckpt`` (default ``auto``: newest compatible
``runs/train/*/checkpoints/last.ckpt``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from spindiff.config import compose
from spindiff.evaluation.evaluate import EvalCache, EvalResult, evaluate_sampler, load_eval_prompts
from spindiff.runtime import atomic_write_json, atomic_write_text, git_commit, package_versions
from spindiff.generation import GenerationSession, Sampler, build_sampler, find_checkpoint
from spindiff.evaluation.sweep import SweepSpec, load_sweep, run_sweep, DEFAULT_SWEEP

SETTINGS = {
    "full": dict(sweep_eta=None, sweep_lam=None, sweep_steps=20, sweep_prompts=20, sweep_draws=32, sweep_seeds=[0, 1],
                 steps=[10, 20, 50, 100], curve_steps=[5, 10, 20, 50, 100], gen_prompts=40, max_new_tokens=12,
                 fid_prompts=20, n_draws=32, seeds=[0, 1, 2], batch_size=8,
                 tp_tokens=32, tp_reps=3, tp_b1_tokens=16, tp_b32_tokens=16),
    "quick": dict(sweep_eta=[0.0, 2.0, 8.0], sweep_lam=[1.0, math.inf], sweep_steps=10, sweep_prompts=8, sweep_draws=16,
                  sweep_seeds=[0], steps=[10, 20], curve_steps=[5, 10, 20], gen_prompts=8, max_new_tokens=8,
                  fid_prompts=8, n_draws=16, seeds=[0, 1], batch_size=8,
                  tp_tokens=16, tp_reps=2, tp_b1_tokens=8, tp_b32_tokens=8),
}
SINGLE_STEP_ARMS = ("spin field-only", "spin prior eta=0", "spin prior best")
TABLE_KEYS = [("fidelity/tv", "TV ↓"), ("fidelity/kl", "KL ↓"), ("fidelity/top1_agreement", "top-1 ↑"),
              ("fidelity/logprob", "draw logp ↑"), ("gen/perplexity", "PPL ↓ [95% CI]"), ("gen/distinct_1", "dist-1"),
              ("gen/distinct_2", "dist-2"), ("gen/distinct_3", "dist-3"), ("gen/self_bleu", "self-BLEU"),
              ("gen/rep_2", "rep-2"), ("cost/tokens_per_s", "tok/s"), ("cost/sde_steps_per_token", "steps/tok")]


def _fmt(m: float, c: float = float("nan"), digits: int = 3) -> str:
    if m is None or not isinstance(m, (int, float)) or math.isnan(m):
        return "–"
    s = f"{m:.{digits}g}" if abs(m) < 1e4 else f"{m:.3g}"
    return s + (f" ± {c:.2g}" if isinstance(c, (int, float)) and math.isfinite(c) else "")


def _cell(r: EvalResult, key: str) -> str:
    """'mean ± CI'; perplexity as exp(-mean log-prob) with the interval mapped through exp (the mean
    of per-seed perplexities is dominated by one bad seed)."""
    if key == "gen/perplexity":
        m, c = r.mean.get("gen/logprob", float("nan")), r.ci.get("gen/logprob", float("nan"))
        if not math.isfinite(m):
            return "–"
        if not math.isfinite(c):
            return _fmt(math.exp(-m))
        return f"{math.exp(-m):.3g} [{math.exp(-(m + c)):.3g}, {math.exp(-(m - c)):.3g}]"
    return _fmt(r.mean.get(key, float("nan")), r.ci.get(key, float("nan")))


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Bench:
    """State shared by the benchmark stages: session, prompts, cache, results and W&B group."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.s = dict(SETTINGS[self.mode])
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or Path("runs") / "bench" / f"generation-{stamp}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.group = f"bench-generation-{stamp}"
        self.base = [f"model.name={args.model}", "stream=false"]
        self.session = GenerationSession.load(compose("sample", self.base).model)
        self.cache = EvalCache()
        self.gen_prompts = load_eval_prompts("", self.s["gen_prompts"])
        self.fid_prompts = load_eval_prompts("", self.s["fid_prompts"])
        self.results: dict[str, EvalResult] = {}
        self.log: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.append(msg)

    def sampler(self, overrides: Sequence[str]) -> Sampler:
        return build_sampler(compose("sample", self.base + list(overrides)), self.session)

    def evaluate(self, key: str, overrides: Sequence[str], generation: bool = True) -> EvalResult:
        """Fidelity on the fidelity prompts, continuations on the generation prompts (memoised by key)."""
        memo = self.results.get(key)
        if memo is not None and (not generation or "gen/perplexity" in memo.mean):
            return memo
        s = self.sampler(overrides)
        t0 = time.perf_counter()
        fid = evaluate_sampler(s, self.fid_prompts, self.s["seeds"], self.s["n_draws"], 0, self.s["batch_size"],
                               fidelity=True, generation=False, cache=self.cache)
        rows = fid.per_seed
        if generation:
            gen = evaluate_sampler(s, self.gen_prompts, self.s["seeds"], 0, self.s["max_new_tokens"],
                                   self.s["batch_size"], fidelity=False, generation=True, cache=self.cache)
            rows = [{**a, **b} for a, b in zip(fid.per_seed, gen.per_seed)]
        res = EvalResult({**s.describe(), "key": key}, rows)
        self.results[key] = res
        self.say(f"  {key:<28} {s.label:<52} TV={_fmt(res.mean['fidelity/tv'], res.ci['fidelity/tv'])}"
                 + (f" PPL={_fmt(res.mean['gen/perplexity'], res.ci['gen/perplexity'])}"
                    f" dist2={_fmt(res.mean['gen/distinct_2'])}" if generation else "")
                 + f" ({time.perf_counter() - t0:.0f} s)")
        self._wandb(key, res)
        return res

    def _wandb(self, key: str, res: EvalResult) -> None:
        from spindiff.tracking import init_run, resolve_mode

        cfg = compose("sample", self.base)
        if resolve_mode(cfg.wandb.mode) == "disabled" or self.args.no_wandb:
            return
        run = init_run(cfg.wandb, self.out, {"bench": self.mode, "arm": key, **res.sampler}, name=key,
                       job_type="bench", group=self.group)
        flat = {k: v for k, v in res.flat().items() if "/" in k and isinstance(v, (int, float)) and math.isfinite(v)}
        run.log(flat)
        run.summary.update(flat)
        run.finish()


# --------------------------------------------------------------------------- stages
def stage_sweep(b: Bench, spin_ckpt: Optional[str]) -> dict[str, Any]:
    """eta x lambda grid (fidelity only) with the learned checkpoint; returns best points."""
    spec = load_sweep(DEFAULT_SWEEP)
    grid = dict(spec.grid)
    if b.s["sweep_eta"]:
        grid["sampler.eta"] = b.s["sweep_eta"]
    if b.s["sweep_lam"]:
        grid["sampler.lam"] = b.s["sweep_lam"]
    grid["sampler.steps"] = [b.s["sweep_steps"]]
    spec = SweepSpec(name="eta_lambda", method="grid", metric="fidelity/tv", goal="minimize", grid=grid,
                     fixed={**spec.fixed, "eval.n_prompts": b.s["sweep_prompts"], "eval.seeds": b.s["sweep_seeds"],
                            "eval.n_draws": b.s["sweep_draws"], "eval.generation": False},
                     raw={**spec.raw, "parameters": {**spec.raw["parameters"]}})
    extra = b.base + [f"ckpt={spin_ckpt or 'none'}"]
    if b.args.no_wandb:
        extra.append("wandb.mode=disabled")
    b.say(f"[sweep] eta {grid['sampler.eta']} x lam {grid['sampler.lam']} at steps {b.s['sweep_steps']}, "
          f"ckpt={spin_ckpt or 'none (field-only)'}")
    res = run_sweep(spec, extra, b.out / "sweep", session=b.session, progress=True)
    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    pos = [r for r in ok if r["sampler.eta"] > 0]
    best_pos = min(pos, key=lambda r: r["fidelity/tv"]) if pos else None
    best_all = min(ok, key=lambda r: r["fidelity/tv"]) if ok else None
    return {"rows": res["rows"], "best_pos": best_pos, "best_all": best_all, "dir": str(res["out"])}


def _over(name: str, eta: float = 0.0, lam: float = math.inf, steps: int = 20, ckpt: Optional[str] = None) -> list[str]:
    lam_s = "inf" if math.isinf(lam) else str(lam)
    return [f"sampler.name={name}", f"sampler.eta={eta}", f"sampler.lam={lam_s}", f"sampler.steps={steps}",
            f"ckpt={ckpt or 'none'}"]


def stage_main(b: Bench, arms: dict[str, Optional[list[str]]]) -> dict[str, dict[int, EvalResult]]:
    """Every arm at every steps value (ar once)."""
    table: dict[str, dict[int, EvalResult]] = {}
    for name, over in arms.items():
        if over is None:
            continue
        if name == "ar":
            table[name] = {0: b.evaluate("ar", over)}
            continue
        table[name] = {}
        steps = [20] if name in SINGLE_STEP_ARMS else b.s["steps"]  # extra arms: one steps value
        for st in steps:
            o = [x for x in over if not x.startswith("sampler.steps=")] + [f"sampler.steps={st}"]
            table[name][st] = b.evaluate(f"{name}@{st}", o)
    return table


def stage_curves(b: Bench, curves: dict[str, list[str]]) -> dict[str, dict[int, EvalResult]]:
    """Fidelity vs steps (no generation) for each curve."""
    out: dict[str, dict[int, EvalResult]] = {}
    for name, over in curves.items():
        out[name] = {}
        for st in b.s["curve_steps"]:
            o = [x for x in over if not x.startswith("sampler.steps=")] + [f"sampler.steps={st}"]
            out[name][st] = b.evaluate(f"{name}@{st}", o, generation=False)
    return out


def _tps(sampler: Sampler, session: GenerationSession, seqs: list[list[int]], tokens: int, seed: int) -> float:
    ids, mask = session.batch(seqs)
    gb = sampler.generate(ids, mask, tokens, torch.Generator().manual_seed(seed), stop_at_eos=False)
    return gb.n_tokens / gb.seconds


def stage_throughput(b: Bench, arms: dict[str, list[str]]) -> dict[str, Any]:
    """tokens/s side by side at batch 1, 8 and 32: every (arm, batch) is measured once per round,
    round-robin, for ``tp_reps`` rounds, so load changes on a shared machine hit all of them alike.
    Reported: median and best (max) over rounds; ratios from both."""
    s = b.s
    prompts = load_eval_prompts("", 40)
    seqs = b.session.encode(prompts, reserve=s["tp_tokens"])
    samplers = {k: b.sampler(v) for k, v in arms.items()}
    plan = [(1, s["tp_b1_tokens"]), (8, s["tp_tokens"]), (32, s["tp_b32_tokens"])]
    for smp in samplers.values():  # warm-up
        _tps(smp, b.session, seqs[:2], 2, 0)
    runs: dict[str, dict[int, list[float]]] = {k: {bs: [] for bs, _ in plan} for k in samplers}
    for rep in range(s["tp_reps"]):
        for bs, tok in plan:
            for k, smp in samplers.items():
                start = (bs * rep) % (40 - bs + 1)
                runs[k][bs].append(_tps(smp, b.session, seqs[start:start + bs], tok, rep))
    res: dict[str, Any] = {"tokens": {bs: tok for bs, tok in plan}, "reps": s["tp_reps"]}
    for bs, _ in plan:
        res[f"batch{bs}"] = {k: {"median": statistics.median(v[bs]), "best": max(v[bs]), "runs": v[bs]}
                             for k, v in runs.items()}
    res["ratios"] = {}
    for stat in ("median", "best"):
        ar = res["batch8"].get("ar", {}).get(stat)
        for k in samplers:
            if ar and k != "ar":
                res["ratios"][f"{k}/ar@batch8 ({stat})"] = res["batch8"][k][stat] / ar
            res["ratios"][f"{k}:batch32/batch1 ({stat})"] = res["batch32"][k][stat] / res["batch1"][k][stat]
    for k in samplers:
        b.say(f"  {k:<22} tok/s median (best)  b1={res['batch1'][k]['median']:.1f} ({res['batch1'][k]['best']:.1f})"
              f"  b8={res['batch8'][k]['median']:.1f} ({res['batch8'][k]['best']:.1f})"
              f"  b32={res['batch32'][k]['median']:.1f} ({res['batch32'][k]['best']:.1f})")
    for k, v in res["ratios"].items():
        b.say(f"  ratio {k} = {v:.2f}")
    return res


# --------------------------------------------------------------------------- figures and report
def _fig_curves(b: Bench, curves: dict[str, dict[int, EvalResult]], table: dict[str, dict[int, EvalResult]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spindiff.evaluation.sweep import _savefig

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, [("fidelity/tv", "next-token TV vs LM (lower is better)"),
                                       ("fidelity/logprob", "LM log-prob of draws (higher is better)"),
                                       ("fidelity/top1_agreement", "top-1 agreement (higher is better)")]):
        for name, pts in curves.items():
            xs = sorted(pts)
            ys = [pts[x].mean[key] for x in xs]
            es = [pts[x].ci[key] if math.isfinite(pts[x].ci[key]) else 0 for x in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        if "ar" in table:
            ax.axhline(table["ar"][0].mean[key], color="k", ls="--", lw=1, label="ar (floor/reference)")
        ax.set_xscale("log")
        ax.set_xlabel("SDE steps per token")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    p = b.out / "quality_vs_steps.png"
    _savefig(fig, p)
    plt.close(fig)
    paths.append(p.name)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, [("gen/perplexity", "perplexity under the LM (lower is better)"),
                                       ("gen/distinct_2", "distinct-2 (diversity)"),
                                       ("cost/tokens_per_s", "tokens/s (batch 8)")]):
        for name, pts in table.items():
            if name == "ar":
                ax.axhline(pts[0].mean[key], color="k", ls="--", lw=1, label="ar")
                continue
            xs = sorted(pts)
            if key == "gen/perplexity":  # exp(-mean log-prob) with the log-space CI mapped through exp
                ms = [pts[x].mean["gen/logprob"] for x in xs]
                cs = [pts[x].ci["gen/logprob"] if math.isfinite(pts[x].ci["gen/logprob"]) else 0 for x in xs]
                ys = [math.exp(-m) for m in ms]
                err = [[y - math.exp(-(m + c)) for y, m, c in zip(ys, ms, cs)],
                       [math.exp(-(m - c)) - y for y, m, c in zip(ys, ms, cs)]]
            else:
                ys = [pts[x].mean[key] for x in xs]
                err = [pts[x].ci[key] if math.isfinite(pts[x].ci[key]) else 0 for x in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        if key == "gen/perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("SDE steps per token")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    p = b.out / "generation_vs_steps.png"
    _savefig(fig, p)
    plt.close(fig)
    paths.append(p.name)
    return paths


def _value(r: EvalResult, key: str) -> float:
    """The reported mean; perplexity as exp(-mean log-prob), as in the table."""
    if key == "gen/perplexity" and math.isfinite(r.mean.get("gen/logprob", float("nan"))):
        return math.exp(-r.mean["gen/logprob"])
    return r.mean.get(key, float("nan"))


def _cmp(a: EvalResult, c: EvalResult, key: str, lower_better: bool) -> tuple[str, float]:
    """'better' | 'worse' | 'indistinguishable' for a vs c on key (95% CIs overlap -> indistinguishable).
    Perplexity is compared through the mean log-prob (its CI is symmetric there, not in PPL)."""
    if key == "gen/perplexity" and all(math.isfinite(r.mean.get("gen/logprob", float("nan"))) for r in (a, c)):
        return _cmp(a, c, "gen/logprob", not lower_better)
    ma, mc = a.mean.get(key, float("nan")), c.mean.get(key, float("nan"))
    ca = a.ci.get(key, 0.0) if math.isfinite(a.ci.get(key, float("nan"))) else 0.0
    cc = c.ci.get(key, 0.0) if math.isfinite(c.ci.get(key, float("nan"))) else 0.0
    if not (math.isfinite(ma) and math.isfinite(mc)):
        return "not measured", float("nan")
    if abs(ma - mc) <= ca + cc:
        return "indistinguishable", ma - mc
    better = (ma < mc) if lower_better else (ma > mc)
    return ("better" if better else "worse"), ma - mc


def write_report(b: Bench, info: dict[str, Any], sweep: Optional[dict[str, Any]], table: dict[str, dict[int, EvalResult]],
                 curves: dict[str, dict[int, EvalResult]], tp: Optional[dict[str, Any]], figs: list[str]) -> str:
    s = b.s
    L: list[str] = []
    L.append(f"# Generation benchmark ({b.mode})\n")
    L.append(f"Command: `{info['command']}`  ")
    L.append(f"Model: {b.session.name} (d={b.session.dim}, V={b.session.token_table.shape[0]}); host: "
             f"{info['host']}; torch threads {torch.get_num_threads()}; load average at start {info['load_start']}, "
             f"at end {info['load_end']}; wall {info['wall_min']:.1f} min; git {info['git']}.\n")
    L.append(f"Checkpoints: spin = `{info['spin_ckpt']}` ({info['spin_ckpt_summary']}); euclid_ddpm = "
             f"`{info['euclid_ckpt']}` ({info['euclid_ckpt_summary']})"
             + (f"; field prior = `{info['prior_ckpt']}` ({info['prior_ckpt_summary']})" if info.get("prior_ckpt") else "")
             + ".\n")
    L.append(f"Evaluation: fidelity on {len(b.fid_prompts)} held-out prompts × {s['n_draws']} draws; continuations "
             f"of {s['max_new_tokens']} tokens on {len(b.gen_prompts)} prompts (batch {s['batch_size']}); seeds "
             f"{s['seeds']}; mean ± 95% Student-t CI half-width over seeds. TV/KL compare the empirical next-token "
             f"distribution of {s['n_draws']} draws with the LM softmax; `ar` sampling exactly from the LM gives "
             f"the finite-sample floor of these two numbers.\n")
    if sweep is not None:
        L.append("## 1. eta × lambda sweep (learned score + field drift)\n")
        L.append(f"Grid at {s['sweep_steps']} steps on {s['sweep_prompts']} prompts × {s['sweep_draws']} draws, seeds "
                 f"{s['sweep_seeds']} (files: `{Path(sweep['dir']).name}/summary.csv`, heatmaps, best.json).\n")
        L.append("| eta | lam | TV ↓ | top-1 ↑ | draw logp ↑ |\n|---|---|---|---|---|")
        for r in sorted([r for r in sweep["rows"] if r.get("status") == "ok"], key=lambda r: r["fidelity/tv"]):
            lam = "inf" if math.isinf(r["sampler.lam"]) else f"{r['sampler.lam']:g}"
            L.append(f"| {r['sampler.eta']:g} | {lam} | {_fmt(r['fidelity/tv'], r.get('fidelity/tv_ci'))} | "
                     f"{_fmt(r['fidelity/top1_agreement'])} | {_fmt(r['fidelity/logprob'])} |")
        bp, ba = sweep["best_pos"], sweep["best_all"]
        if bp:
            L.append(f"\nBest with the field on (eta > 0): **eta = {bp['sampler.eta']:g}, lambda = "
                     f"{'inf' if math.isinf(bp['sampler.lam']) else format(bp['sampler.lam'], 'g')}** "
                     f"(TV {_fmt(bp['fidelity/tv'], bp.get('fidelity/tv_ci'))}). Best overall: eta = {ba['sampler.eta']:g}, "
                     f"lambda = {'inf' if math.isinf(ba['sampler.lam']) else format(ba['sampler.lam'], 'g')}.\n")
        L.append("![TV heatmap](sweep/heatmap_fidelity_tv.png)\n")
    L.append("## 2. Arms × steps\n")
    L.append("| arm | steps | " + " | ".join(t for _, t in TABLE_KEYS) + " |")
    L.append("|---|---|" + "---|" * len(TABLE_KEYS))
    for name, pts in table.items():
        for st in sorted(pts):
            r = pts[st]
            L.append(f"| {name} | {st or '–'} | " + " | ".join(_cell(r, k) for k, _ in TABLE_KEYS) + " |")
    L.append("\nLabels: " + "; ".join(f"`{name}` = {next(iter(p.values())).sampler.get('label')}"
                                     for name, p in table.items()) + ".\n")
    L.append("## 3. Quality vs steps, with and without precession\n")
    for f in figs:
        L.append(f"![{f}]({f})\n")
    L.append("| curve | " + " | ".join(f"{st} steps" for st in s["curve_steps"]) + " |")
    L.append("|---|" + "---|" * len(s["curve_steps"]))
    for name, pts in curves.items():
        L.append(f"| {name} (TV) | " + " | ".join(_fmt(pts[st].mean['fidelity/tv'], pts[st].ci['fidelity/tv'])
                                                   for st in s["curve_steps"]) + " |")
    if tp:
        L.append(f"\n## 4. Throughput (side by side; every (arm, batch) once per round, round-robin, {tp['reps']} "
                 f"rounds; tokens/s median (best); no EOS stop; {tp['tokens'][1]}/{tp['tokens'][8]}/{tp['tokens'][32]} "
                 "new tokens at batch 1/8/32)\n")
        L.append("| arm | batch 1 | batch 8 | batch 32 | batch32 / batch1 (median) |\n|---|---|---|---|---|")
        for k in tp["batch8"]:
            cell = lambda bs: f"{tp[f'batch{bs}'][k]['median']:.1f} ({tp[f'batch{bs}'][k]['best']:.1f})"  # noqa: E731
            L.append(f"| {k} | {cell(1)} | {cell(8)} | {cell(32)} | {tp['ratios'][f'{k}:batch32/batch1 (median)']:.2f} |")
        L.append("")
        for k, v in tp["ratios"].items():
            target = "≥ 0.5" if "/ar@batch8" in k else "≥ 3"
            if k.startswith("spin") or "/ar@" in k:
                L.append(f"- **{k} = {v:.2f}** (target {target}: {'met' if v >= (0.5 if '/ar@' in k else 3) else 'NOT met'})")
        L.append("")
    L.append("## 5. Answer to the paper's open question (Sec. V.5)\n")
    L.extend(answer(b, sweep, table, curves))
    return "\n".join(L) + "\n"


def answer(b: Bench, sweep: Optional[dict[str, Any]], table: dict[str, dict[int, EvalResult]],
           curves: dict[str, dict[int, EvalResult]]) -> list[str]:
    """Plain-language conclusions computed from the numbers (CI overlap = no detectable difference)."""
    out: list[str] = []
    ref_steps = 20 if 20 in b.s["steps"] else b.s["steps"][-1]
    A = table.get("spin eta=0", {}).get(ref_steps)
    B = table.get("spin best", {}).get(ref_steps)
    F = table.get("spin field-only", {}).get(ref_steps)
    E = table.get("euclid_ddpm", {}).get(ref_steps)
    R = table.get("ar", {}).get(0)
    metrics = [("fidelity/tv", True, "next-token TV"), ("fidelity/logprob", False, "LM log-prob of draws"),
               ("gen/perplexity", True, "perplexity"), ("gen/distinct_2", False, "distinct-2"),
               ("gen/self_bleu", True, "self-BLEU")]

    def line(x: EvalResult, y: EvalResult, xn: str, yn: str) -> str:
        parts = []
        for k, lower, name in metrics:
            verdict, diff = _cmp(x, y, k, lower)
            parts.append(f"{name} {verdict} ({_fmt(_value(x, k))} vs {_fmt(_value(y, k))})")
        return f"- **{xn} vs {yn}** at {ref_steps} steps: " + "; ".join(parts) + "."

    if A is not None and B is not None:
        out.append("**Perplexity / fidelity / diversity: field drift on vs off (same learned score).**")
        out.append(line(B, A, f"field on ({B.sampler['label']})", "learned score only (eta = 0)"))
    if sweep is not None and sweep.get("best_all") is not None:
        ba = sweep["best_all"]
        out.append(f"- In the sweep the lowest TV overall is at eta = {ba['sampler.eta']:g} "
                   + ("(the field drift does not improve next-token fidelity over the learned score)."
                      if ba["sampler.eta"] == 0 else "(a non-zero field drift gives the lowest TV)."))
    PA, PB = table.get("spin prior eta=0", {}).get(ref_steps), table.get("spin prior best", {}).get(ref_steps)
    if PA is not None and A is not None:
        out.append("\n**The field as an analytic prior inside the score (score_net.eta_train > 0).**")
        out.append(line(PA, A, "learned residual + field prior, no drift", "learned score only"))
        if PB is not None and B is not None:
            out.append(line(PB, B, "learned residual + field prior + field drift", "learned score + field drift"))
    if E is not None:
        out.append("\n**Against the Brownian (Euclidean DDPM) baseline.**")
        if A is not None:
            out.append(line(A, E, "spherical, learned only", "euclid_ddpm"))
        if B is not None:
            out.append(line(B, E, "spherical + field", "euclid_ddpm"))
    if R is not None:
        out.append("\n**Against the LM's own sampling (ar).**")
        for X, n in ((B, "spherical + field"), (A, "spherical, learned only"), (E, "euclid_ddpm"), (F, "field only")):
            if X is not None:
                out.append(line(X, R, n, "ar"))
    if curves:
        out.append("\n**Fewer steps with non-reversible (precessing) dynamics?**")
        names = list(curves)
        prec = [n for n in names if "lam=inf" not in n and n.startswith("spin best")]
        noprec = [n for n in names if "lam=inf" in n]
        if prec and noprec:
            N = curves[noprec[0]]
            for pn in prec:
                P = curves[pn]
                verdicts = []
                for st in b.s["curve_steps"]:
                    v, d = _cmp(P[st], N[st], "fidelity/tv", True)
                    verdicts.append(f"{st}: {v} ({_fmt(P[st].mean['fidelity/tv'])} vs {_fmt(N[st].mean['fidelity/tv'])})")
                out.append(f"- TV of `{pn}` vs `{noprec[0]}` at equal steps — " + "; ".join(verdicts) + ".")
                wins = sum(_cmp(P[st], N[st], "fidelity/tv", True)[0] == "better" for st in b.s["curve_steps"])
                loses = sum(_cmp(P[st], N[st], "fidelity/tv", True)[0] == "worse" for st in b.s["curve_steps"])
                out.append(f"  Precession ({pn.split('(')[-1].rstrip(')')}) is better at {wins}, worse at {loses}, "
                           f"indistinguishable at {len(b.s['curve_steps']) - wins - loses} of "
                           f"{len(b.s['curve_steps'])} step counts.")
            steps_to = {}
            for n in prec + noprec:
                floor = min(curves[n][st].mean["fidelity/tv"] for st in b.s["curve_steps"])
                ok = [st for st in b.s["curve_steps"] if curves[n][st].mean["fidelity/tv"] <= floor + 0.01]
                steps_to[n] = ok[0]
            out.append("- Steps to come within 0.01 TV of each curve's own best: "
                       + "; ".join(f"{n.split('(')[-1].rstrip(')')}: {v}" for n, v in steps_to.items()) + ".")
        else:
            out.append("- No precession-off curve was run.")
    out.append("\n**Controllability** was not measured beyond the knobs themselves: eta moves the sampler "
               "between the learned distribution (eta = 0) and the attention-field attractor (large eta), as the "
               "sweep table shows; no attribute-control task was run.")
    out.append("\nVerdicts use the 95% CIs over seeds: 'indistinguishable' means the intervals overlap. "
               "All numbers are for the checkpoints named above, trained briefly on CPU; a longer-trained score "
               "network could change the spherical and Euclidean arms, not the ar reference.")
    return out


# --------------------------------------------------------------------------- main
def _ckpt(session: GenerationSession, spec: str, objective: str) -> Optional[str]:
    if spec == "none":
        return None
    if spec == "auto":
        return find_checkpoint(session, objective)[0]
    return spec


def _ckpt_summary(session: GenerationSession, path: Optional[str]) -> str:
    if not path:
        return "none"
    from spindiff.checkpoint import checkpoint_summary, load_checkpoint

    s = checkpoint_summary(load_checkpoint(path))
    params = s.get("score_net_params")
    return (f"{s.get('objective')}, {s.get('global_step')} optimizer steps, "
            + (f"{params / 1e6:.2f}M params, " if params else "")
            + f"features {s.get('context_features')}, eta_train {s.get('eta_train')}, "
            + f"best val loss {_fmt(s['best_val_loss']) if s.get('best_val_loss') is not None else 'not recorded'}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-minute version (fewer prompts, seeds, steps)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="")
    ap.add_argument("--spin-ckpt", default="auto", help="auto | none | PATH")
    ap.add_argument("--euclid-ckpt", default="auto", help="auto | none | PATH")
    ap.add_argument("--prior-ckpt", default="none",
                    help="PATH of a spin checkpoint trained with score_net.eta_train > 0 (experiment=field_prior): "
                         "adds the arms 'spin prior eta=0' and 'spin prior best' at 20 steps")
    ap.add_argument("--eta", type=float, default=None, help="skip the sweep: use this eta (with --lam)")
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-wandb", action="store_true", help="do not log arms to W&B (offline by default)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load_start = _loadavg()
    b = Bench(args)
    spin_ckpt = _ckpt(b.session, args.spin_ckpt, "spin")
    euclid_ckpt = _ckpt(b.session, args.euclid_ckpt, "euclid_ddpm")
    b.say(f"# bench_generation ({b.mode}) on {b.session.name}; spin ckpt={spin_ckpt}; euclid ckpt={euclid_ckpt}; "
          f"out={b.out}")
    sweep = None
    if args.eta is None:
        sweep = stage_sweep(b, spin_ckpt)
        bp = sweep["best_pos"]
        eta, lam = (bp["sampler.eta"], bp["sampler.lam"]) if bp else (1.0, 1.0)
    else:
        eta, lam = args.eta, (args.lam if args.lam is not None else 1.0)
    b.say(f"[arms] best field drift: eta={eta:g} lam={lam:g}")
    arms: dict[str, Optional[list[str]]] = {
        "ar": ["sampler.name=ar", "sampler.temperature=1.0", "sampler.top_p=1.0"],
        "spin eta=0": _over("spin", 0.0, math.inf, 20, spin_ckpt) if spin_ckpt else None,
        "spin best": _over("spin", eta, lam, 20, spin_ckpt),
        "spin field-only": _over("spin", eta, lam, 20, None) if spin_ckpt else None,
        "euclid_ddpm": _over("euclid_ddpm", 0.0, math.inf, 20, euclid_ckpt) if euclid_ckpt else None,
    }
    prior_ckpt = None if args.prior_ckpt == "none" else args.prior_ckpt
    if prior_ckpt:
        arms["spin prior eta=0"] = _over("spin", 0.0, math.inf, 20, prior_ckpt)
        arms["spin prior best"] = _over("spin", eta, lam, 20, prior_ckpt)
    table = stage_main(b, arms)
    # precession on (finite lambda: the best one and 1, 0.25) vs off (lambda = inf), same eta
    lams = sorted({x for x in ([lam] if math.isfinite(lam) else []) + [1.0, 0.25]}, reverse=True)
    curves = {f"spin best (lam={x:g})": _over("spin", eta, x, 20, spin_ckpt) for x in lams}
    curves["spin best (lam=inf)"] = _over("spin", eta, math.inf, 20, spin_ckpt)
    if spin_ckpt:
        curves["spin eta=0"] = _over("spin", 0.0, math.inf, 20, spin_ckpt)
    if euclid_ckpt:
        curves["euclid_ddpm"] = _over("euclid_ddpm", 0.0, math.inf, 20, euclid_ckpt)
    b.say("[curves] fidelity vs steps")
    # reuse the main-table results where the configuration is the same
    for cname, over in curves.items():
        for st in b.s["curve_steps"]:
            for aname, aover in arms.items():
                if aover is not None and aname != "ar" and sorted(x for x in aover if "steps" not in x) == \
                        sorted(x for x in over if "steps" not in x) and f"{aname}@{st}" in b.results:
                    b.results[f"{cname}@{st}"] = b.results[f"{aname}@{st}"]
    curve_res = stage_curves(b, curves)
    tp = None
    if not args.no_throughput:
        b.say("[throughput] side by side")
        tp_arms = {"ar": arms["ar"], "spin best@20": _over("spin", eta, lam, 20, spin_ckpt)}
        if spin_ckpt:
            tp_arms["spin eta=0@20"] = _over("spin", 0.0, math.inf, 20, spin_ckpt)
        tp = stage_throughput(b, tp_arms)
    figs = _fig_curves(b, curve_res, table)
    info = {"command": "python bench/bench_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "host": f"{platform.platform()}, {os.cpu_count()} CPUs", "load_start": load_start,
            "load_end": _loadavg(), "wall_min": (time.perf_counter() - t_start) / 60, "git": git_commit(),
            "spin_ckpt": spin_ckpt, "euclid_ckpt": euclid_ckpt, "prior_ckpt": prior_ckpt,
            "prior_ckpt_summary": _ckpt_summary(b.session, prior_ckpt),
            "spin_ckpt_summary": _ckpt_summary(b.session, spin_ckpt),
            "euclid_ckpt_summary": _ckpt_summary(b.session, euclid_ckpt)}
    report = write_report(b, info, sweep, table, curve_res, tp, figs)
    atomic_write_text(b.out / "report.md", report)
    results = {"info": info, "settings": b.s, "best": {"eta": eta, "lam": lam},
               "sweep_best": sweep and {k: sweep[k] for k in ("best_pos", "best_all")},
               "table": {n: {str(st): r.to_json() for st, r in p.items()} for n, p in table.items()},
               "curves": {n: {str(st): r.to_json() for st, r in p.items()} for n, p in curve_res.items()},
               "throughput": tp, "versions": package_versions()}
    atomic_write_json(b.out / "results.json", results)
    print(f"\nwrote {b.out / 'report.md'} ({info['wall_min']:.1f} min)")
    return results


if __name__ == "__main__":
    main()
