"""Generation benchmark of the posterior-score spin sampler, every arm next to its limit.

One command, one process, one model load, every arm side by side on the same held-out prompts
(spindiff/data/eval_prompts.txt, disjoint from the training seed prompts) and seeds:

    python bench/bench_generation.py --ckpt field+hidden=PATH --ckpt hidden=PATH --ckpt field=PATH \
        --ckpt none=PATH --euclid-ckpt PATH            # full: ~15-25 min on 2 CPU cores
    python bench/bench_generation.py --quick           # a few minutes, smaller everything

Arms (all through the sampler registry of :mod:`spindiff.generation`):

* ``ar``                the LM's own sampling: the reference; its TV is the finite-sample floor;
* ``oracle``            the spin sampler with the LM's own logits as the prior (``prior=lm``,
                        ``ckpt=none``): the limit every spin arm can reach; its distance to ``ar``
                        isolates the SDE's discretisation (decoded at t_eps, where the posterior is
                        one-hot: ``post_p`` is reported);
* ``learned:<name>``    trained checkpoints (``--ckpt name=PATH``), e.g. features field+hidden,
                        hidden, field (the attention field alone), prior none;
* ``field-prior@E``     the field's token prior eta_train N . e_v with no network, E swept;
* precession on/off     marginal-preserving precession (gamma) on the oracle and the main checkpoint;
* ``llg(eta,lam)``      the paper's LLG field drift added to the main checkpoint (changes the target);
* ``euclid_ddpm``       the Euclidean DDPM baseline (``--euclid-ckpt``).

Stages: (1) the oracle over integrators x grids x steps {5, 10, 20, 50, 100}, decoding at the end
vs nearest cosine vs an early exit; (2) every arm at the shipped sampler settings: next-token TV /
KL / top-1 / draw log p against the LM's softmax, continuation perplexity under the LM,
distinct-n, self-BLEU, mean and 95% CI over seeds; (3) steps curves of the main checkpoint;
(4) tokens/s side by side at batch 1 / 8 / 32. Writes report.md, results.json and PNG figures to
--out (default runs/bench/generation-<timestamp>); W&B offline runs under one group.
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
from omegaconf import OmegaConf

from spindiff.config import compose
from spindiff.evaluation.evaluate import EvalCache, EvalResult, evaluate_sampler, load_eval_prompts
from spindiff.generation import GenerationSession, Sampler, build_sampler
from spindiff.runtime import atomic_write_json, atomic_write_text, git_commit, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's helpers, also when loaded by path
from _generation_report import _fmt, cold_bias_lines, throughput_lines, tv_figure, write_report  # noqa: E402

SETTINGS = {
    "full": dict(fid_prompts=40, n_draws=32, seeds=[0, 1], gen_prompts=16, max_new_tokens=8, batch_size=8,
                 grids=["uniform"], oracle_steps=[5, 10, 20], curve_steps=[5, 10, 20], eta_train=[10.0, 20.0, 40.0],
                 precession=[20.0], llg=[(8.0, 1.0)], tp_tokens=16, tp_reps=2, tp_b1_tokens=8, tp_b32_tokens=8),
    "long": dict(fid_prompts=40, n_draws=32, seeds=[0, 1, 2], gen_prompts=40, max_new_tokens=12, batch_size=8,
                 grids=["uniform", "speciation"], oracle_steps=[5, 10, 20, 50, 100], curve_steps=[5, 10, 20, 50, 100],
                 eta_train=[5.0, 10.0, 20.0, 40.0], precession=[5.0, 20.0], llg=[(2.0, 1.0), (8.0, 1.0), (8.0, math.inf)],
                 tp_tokens=24, tp_reps=3, tp_b1_tokens=12, tp_b32_tokens=12),
    "cold": dict(fid_prompts=40, n_draws=64, seeds=[0, 1, 2, 3, 4, 5], gen_prompts=8, max_new_tokens=8, batch_size=8,
                 grids=["uniform"], oracle_steps=[10], curve_steps=[10], eta_train=[20.0], precession=[], llg=[],
                 tp_tokens=16, tp_reps=3, tp_b1_tokens=8, tp_b32_tokens=8),
    "quick": dict(fid_prompts=8, n_draws=16, seeds=[0, 1], gen_prompts=8, max_new_tokens=6, batch_size=8,
                  grids=["uniform", "speciation"], oracle_steps=[5, 10], curve_steps=[5, 10], eta_train=[10.0, 20.0], precession=[20.0],
                  llg=[(8.0, 1.0)], tp_tokens=8, tp_reps=2, tp_b1_tokens=4, tp_b32_tokens=4),
}
METHODS = ("geodesic_em", "geodesic_midpoint", "geodesic_heun")
class Bench:
    """Session, prompts, cache, results and W&B group shared by the stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else ("long" if args.long else ("cold" if args.cold_bias else "full"))
        self.s = dict(SETTINGS[self.mode])
        for key in ("oracle_steps", "curve_steps"):
            value = getattr(args, key, "")
            if value:
                self.s[key] = [int(n) for n in str(value).split(",") if n.strip()]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or Path("runs") / "bench" / f"generation-{stamp}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.group = f"bench-generation-{stamp}"
        self.base = [f"model.name={args.model}", "stream=false"]
        self.session = GenerationSession.load(compose("sample", self.base).model)
        self.cache = EvalCache()
        self.fid_prompts = load_eval_prompts("", self.s["fid_prompts"])
        self.gen_prompts = load_eval_prompts("", self.s["gen_prompts"])
        self.results: dict[str, EvalResult] = {}
        self.log: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.append(msg)

    def sampler(self, overrides: Sequence[str]) -> Sampler:
        return build_sampler(compose("sample", self.base + list(overrides)), self.session)

    def evaluate(self, key: str, overrides: Sequence[str], generation: bool = True) -> EvalResult:
        """Fidelity on the fidelity prompts (+ continuations on the generation prompts), memoised by key."""
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
        res = EvalResult({**s.describe(), "key": key, "overrides": list(overrides)}, rows)
        self.results[key] = res
        self.say(f"  {key:<30} {s.label:<58} TV={_fmt(res.mean['fidelity/tv'], res.ci['fidelity/tv'])}"
                 + (f" PPL={_fmt(res.mean['gen/perplexity'], res.ci['gen/perplexity'])}" if generation else "")
                 + f" ({time.perf_counter() - t0:.0f} s)")
        self._wandb(key, res)
        return res

    def _wandb(self, key: str, res: EvalResult) -> None:
        from spindiff.tracking import finish_run, log_metrics, start_run

        if self.args.no_wandb:
            return
        cfg = compose("sample", self.base)
        record = OmegaConf.create({"bench": self.mode, "arm": key, **res.sampler})  # the run's W&B config
        run = start_run(cfg.wandb, self.out, record, name=key, job_type="bench", group=self.group)
        if run is None:
            return
        flat = {k: v for k, v in res.flat().items() if "/" in k and isinstance(v, (int, float)) and math.isfinite(v)}
        log_metrics(run, flat, summary=True)
        finish_run(run)


def _spin(steps: Optional[int] = None, method: Optional[str] = None, grid: Optional[str] = None,
          ckpt: Optional[str] = None, **kw: Any) -> list[str]:
    out = ["sampler.name=spin", f"ckpt={ckpt or 'none'}"]
    out += [f"sampler.steps={steps}"] if steps else []
    out += [f"sampler.method={method}"] if method else []
    out += [f"sampler.grid={grid}"] if grid else []
    return out + [f"sampler.{k}={v}" for k, v in kw.items()]


ORACLE = {"prior": "lm"}


# --------------------------------------------------------------------------- stages
def stage_oracle(b: Bench) -> dict[str, Any]:
    """TV of the oracle over integrators x grids x steps; decoding variants at the default steps."""
    rows: dict[str, dict[str, dict[int, float]]] = {}
    for grid in b.s["grids"]:
        for method in METHODS:
            cur = rows.setdefault(grid, {}).setdefault(method, {})
            for n in b.s["oracle_steps"]:
                r = b.evaluate(f"oracle/{grid}/{method}/{n}", _spin(n, method, grid, **ORACLE), generation=False)
                cur[n] = r.mean["fidelity/tv"]
    dflt = compose("sample", b.base).sampler
    decode = {
        "posterior at t_eps": b.evaluate("oracle/default", _spin(**ORACLE), generation=False),
        "nearest cosine": b.evaluate("oracle/nearest", _spin(decode="nearest", **ORACLE), generation=False),
        "early exit at kappa >= 100": b.evaluate("oracle/exit100", _spin(exit_kappa=100.0, **ORACLE), generation=False),
    }
    return {"tv": rows, "decode": decode, "default": (int(dflt.steps), str(dflt.method), str(dflt.grid))}


def stage_arms(b: Bench, ckpts: dict[str, str], euclid: Optional[str]) -> dict[str, EvalResult]:
    arms: dict[str, EvalResult] = {}
    arms["ar"] = b.evaluate("ar", ["sampler.name=ar"])
    arms["oracle"] = b.evaluate("oracle", _spin(**ORACLE))
    for name, path in ckpts.items():
        arms[f"learned:{name}"] = b.evaluate(f"learned:{name}", _spin(ckpt=path))
    fp = {e: b.evaluate(f"field-prior@{e:g}", _spin(prior="field", eta_train=e), generation=False)
          for e in b.s["eta_train"]}
    best_e = min(fp, key=lambda e: fp[e].mean["fidelity/tv"])
    arms[f"field-prior@{best_e:g} (best)"] = b.evaluate(f"field-prior@{best_e:g}", _spin(prior="field", eta_train=best_e))
    main = next(iter(ckpts.values()), None)
    for g in b.s["precession"]:
        arms[f"oracle+prec{g:g}"] = b.evaluate(f"oracle+prec{g:g}", _spin(precession=g, **ORACLE), generation=False)
        if main:
            arms[f"learned+prec{g:g}"] = b.evaluate(f"learned+prec{g:g}", _spin(ckpt=main, precession=g),
                                                    generation=False)
    if main:
        for eta, lam in b.s["llg"]:
            key = f"learned+llg({eta:g},{'inf' if math.isinf(lam) else f'{lam:g}'})"
            arms[key] = b.evaluate(key, _spin(ckpt=main, eta=eta, lam=lam), generation=False)
    if euclid:
        arms["euclid_ddpm"] = b.evaluate("euclid_ddpm", ["sampler.name=euclid_ddpm", f"ckpt={euclid}"])
    return arms


def stage_curves(b: Bench, ckpts: dict[str, str]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    targets = {"oracle": dict(ORACLE)} | {f"learned:{k}": {"ckpt": v} for k, v in list(ckpts.items())[:1]}
    for name, kw in targets.items():
        out[name] = {}
        for n in b.s["curve_steps"]:
            out[name][n] = b.evaluate(f"{name}/steps{n}", _spin(n, **kw), generation=False).mean["fidelity/tv"]
    return out


def _tps(sampler: Sampler, session: GenerationSession, seqs: list[list[int]], tokens: int, seed: int) -> float:
    ids, mask = session.batch(seqs)
    gb = sampler.generate(ids, mask, tokens, torch.Generator().manual_seed(seed), stop_at_eos=False)
    return gb.n_tokens / gb.seconds


def stage_throughput(b: Bench, arms: dict[str, list[str]]) -> dict[str, Any]:
    """tokens/s side by side at batch 1, 8 and 32, round-robin over arms for ``tp_reps`` rounds
    (load changes on a shared machine hit every arm alike); median and best over rounds."""
    s = b.s
    prompts = load_eval_prompts("", 40)
    seqs = b.session.encode(prompts, reserve=s["tp_tokens"])
    samplers = {}
    for k, v in arms.items():  # "+brownian=interval": the spin sampler's noise from a torchsde BrownianInterval
        samplers[k] = b.sampler([o for o in v if not o.startswith("+brownian=")])
        for o in v:
            if o.startswith("+brownian="):
                samplers[k].brownian = o.split("=", 1)[1]
    plan = [(1, s["tp_b1_tokens"]), (8, s["tp_tokens"]), (32, s["tp_b32_tokens"])]
    for smp in samplers.values():  # warm-up
        _tps(smp, b.session, seqs[:2], 2, 0)
    runs: dict[str, dict[int, list[float]]] = {k: {bs: [] for bs, _ in plan} for k in samplers}
    for rep in range(s["tp_reps"]):
        for bs, tok in plan:
            for k, smp in samplers.items():
                start = (bs * rep) % (40 - bs + 1)
                runs[k][bs].append(_tps(smp, b.session, seqs[start:start + bs], tok, rep))
    res: dict[str, Any] = {f"batch{bs}": {k: {"median": statistics.median(v[bs]), "best": max(v[bs])}
                                          for k, v in runs.items()} for bs, _ in plan}
    res["ratios"] = {}
    for k in samplers:
        if k != "ar":
            res["ratios"][f"{k}/ar@batch8"] = res["batch8"][k]["median"] / res["batch8"]["ar"]["median"]
        res["ratios"][f"{k}:batch32/batch1"] = res["batch32"][k]["median"] / res["batch1"][k]["median"]
    for k in samplers:
        b.say(f"  {k:<16} tok/s (median)  b1={res['batch1'][k]['median']:.1f}  b8={res['batch8'][k]['median']:.1f}"
              f"  b32={res['batch32'][k]['median']:.1f}")
    for k, v in res["ratios"].items():
        b.say(f"  ratio {k} = {v:.2f}")
    return res


COLD_BEFORE = {"tail": "drop", "grid": "uniform", "exit_kappa": "null"}  # the spin defaults before the cold-bias fix
COLD_ARMS = {  # name -> sampler overrides (midpoint, top_k = 512 throughout; steps 10 unless named)
    "before: uniform grid, to t_eps, tail dropped": dict(COLD_BEFORE),
    "+ tail drawn directly": {"tail": "direct", "grid": "uniform", "exit_kappa": "null"},
    "+ speciation grid, exit at kappa = 1000": {"tail": "direct", "grid": "speciation", "exit_kappa": 1000},
    "+ speciation grid, exit at kappa = 300": {"tail": "direct", "grid": "speciation", "exit_kappa": 300},
    "+ speciation grid, exit at kappa = 100": {"tail": "direct", "grid": "speciation", "exit_kappa": 100},
    "+ speciation grid, exit at kappa = 1000, 5 steps": {"tail": "direct", "grid": "speciation", "exit_kappa": 1000,
                                                         "steps": 5},
}
SHIPPED_COLD = "+ speciation grid, exit at kappa = 100"  # = the defaults (configs/sample.yaml)


def stage_cold_bias(b: Bench, ckpts: dict[str, str]) -> dict[str, Any]:
    """logprob_excess (draw log p minus the exact E_p[log p]: 0 exact, > 0 colder) and TV of the spin
    sampler's settings, oracle prior and the main checkpoint, next to ``ar``; then tokens/s of
    ``ar``, the settings before the fix and the shipped ones, side by side."""
    rows: dict[str, EvalResult] = {"ar": b.evaluate("cold/ar", ["sampler.name=ar"], generation=False)}
    priors = {"oracle": dict(ORACLE)} | {f"learned:{k}": {"ckpt": v} for k, v in list(ckpts.items())[:1]}
    for pname, pkw in priors.items():
        for name, kw in COLD_ARMS.items():
            rows[f"{pname}: {name}" + (" (shipped)" if name == SHIPPED_COLD else "")] = b.evaluate(f"cold/{pname}/{name}", _spin(**pkw, **kw), generation=False)
    tp_arms = {"ar": ["sampler.name=ar"]}
    for pname, pkw in priors.items():
        tp_arms[f"{pname} before"] = _spin(**pkw, **COLD_BEFORE)
        tp_arms[f"{pname} shipped"] = _spin(**pkw)
    if b.args.brownian_interval:  # the torchsde BrownianInterval in the per-token loop, side by side
        tp_arms["oracle shipped, BrownianInterval"] = _spin(**ORACLE) + ["+brownian=interval"]
    tp = None if b.args.no_throughput else stage_throughput(b, tp_arms)
    return {"rows": rows, "throughput": tp}


def throughput_arms(args: argparse.Namespace, ckpts: dict[str, str]) -> dict[str, list[str]]:
    """ar, the oracle and the first learned checkpoint, at each of ``--tp-steps`` (default: shipped)."""
    steps = [int(n) for n in str(args.tp_steps).split(",") if n.strip()] or [None]
    arms = {"ar": ["sampler.name=ar"]}
    for n in steps:
        tag = "" if n is None else f"@{n}"
        arms[f"spin(oracle){tag}"] = _spin(steps=n, **ORACLE)
        if ckpts:
            arms[f"spin(learned){tag}"] = _spin(steps=n, ckpt=next(iter(ckpts.values())))
    return arms


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-minute version (fewer prompts, seeds, steps)")
    ap.add_argument("--long", action="store_true", help="every grid, steps up to 100, 3 seeds (~1 h on 2 cores)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help="a trained posterior checkpoint (repeatable; the first is the main one)")
    ap.add_argument("--euclid-ckpt", default="", help="a euclid_ddpm checkpoint")
    ap.add_argument("--oracle-steps", default="", help="comma-separated steps of the oracle table (default: per mode)")
    ap.add_argument("--curve-steps", default="", help="comma-separated steps of the steps curves (default: per mode)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--tp-steps", default="", help="comma-separated SDE steps of the spin throughput arms "
                                                   "(default: the shipped sampler's)")
    ap.add_argument("--only-throughput", action="store_true", help="only the throughput stage (its own report)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log arms to W&B (offline by default)")
    ap.add_argument("--cold-bias", action="store_true", help="only the cold-bias table: logprob_excess and TV of the "
                    "spin settings (oracle, first --ckpt) next to ar, and their tokens/s (its own report)")
    ap.add_argument("--brownian-interval", action="store_true", help="with --cold-bias: also time the shipped "
                    "oracle arm with torchsde's BrownianInterval noise instead of GaussianIncrements")
    args = ap.parse_args(argv)
    ckpts = dict(c.split("=", 1) for c in args.ckpt)
    t0 = time.perf_counter()
    b = Bench(args)
    b.say(f"# bench_generation ({b.mode}) on {b.session.name}, out={b.out}")
    if args.cold_bias:
        res = stage_cold_bias(b, ckpts)
        lines = ["# Cold bias of the spin sampler (logprob_excess: 0 = exact, > 0 = colder than the LM)", "",
                 f"Model {b.session.name}; {len(b.fid_prompts)} held-out prompts x {b.s['n_draws']} draws x seeds "
                 f"{b.s['seeds']}; mean ± 95% CI over seeds; load average {_loadavg()}; "
                 f"{(time.perf_counter() - t0) / 60:.1f} min.", ""] + cold_bias_lines(res)
        atomic_write_text(b.out / "report.md", "\n".join(lines) + "\n")
        atomic_write_json(b.out / "results.json", {
            "cold_bias": {k: r.to_json() for k, r in res["rows"].items()}, "throughput": res["throughput"],
            "settings": b.s, "argv": list(argv or sys.argv[1:]), "git": git_commit(), "packages": package_versions()})
        print("\n".join(lines))
        return {"out": str(b.out), **res}
    if args.only_throughput:
        tp = stage_throughput(b, throughput_arms(args, ckpts))
        lines = ["# Generation throughput (tokens/s, median of rounds, side by side)", "",
                 f"Model {b.session.name}; load average {_loadavg()}; {(time.perf_counter() - t0) / 60:.1f} min.", ""]
        lines += throughput_lines(tp)
        atomic_write_text(b.out / "report.md", "\n".join(lines) + "\n")
        atomic_write_json(b.out / "results.json", {"throughput": tp, "settings": b.s, "argv": list(argv or sys.argv[1:]),
                                                   "git": git_commit(), "packages": package_versions()})
        print("\n".join(lines))
        return {"out": str(b.out), "throughput": tp}
    b.say("## oracle: integrators x grids x steps")
    oracle = stage_oracle(b)
    b.say("## arms")
    arms = stage_arms(b, ckpts, args.euclid_ckpt or None)
    b.say("## steps")
    curves = stage_curves(b, ckpts)
    tp = None
    if not args.no_throughput:
        b.say("## throughput")
        tp = stage_throughput(b, throughput_arms(args, ckpts))
    info = {"model": b.session.name, "loadavg": _loadavg(), "wall_min": (time.perf_counter() - t0) / 60,
            "host": platform.node(), "python": sys.version.split()[0], "git": git_commit(),
            "packages": package_versions(), "argv": list(argv or sys.argv[1:]), "checkpoints": ckpts}
    fig = tv_figure(b, oracle, curves, arms["ar"].mean["fidelity/tv"])
    text = write_report(b, info, oracle, arms, curves, tp, fig)
    atomic_write_json(b.out / "results.json", {
        "info": info, "settings": b.s, "oracle_tv": oracle["tv"], "curves": curves, "throughput": tp,
        "arms": {k: r.to_json() for k, r in arms.items()}, "all": {k: r.to_json() for k, r in b.results.items()}})
    print(text)
    return {"out": str(b.out), "arms": arms, "oracle": oracle, "curves": curves, "throughput": tp}


if __name__ == "__main__":
    main()
