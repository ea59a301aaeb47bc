"""Steering benchmark: external-field steering against logit bias, activation addition and head gains.

One command, one process, one model load, every method side by side on the same prompts and seeds:

    python bench/bench_steering.py            # full: ~20 min on 2 idle CPU cores (SmolLM2-135M)
    python bench/bench_steering.py --quick    # smoke test, a few minutes
    python bench/bench_steering.py --no-spin  # only the ar arms

Task 1 -- topic steering. 4 topics x 40 neutral prompts ("Yesterday I", "In my opinion,", ...); each
topic has steering words (the field B = mean unit embedding of these single-token words) and
held-out topic words that are never steered towards. Success = share of continuations that use a
held-out word (whole word, case-insensitive); fluency = perplexity of the continuation under the
unsteered LM (conditioned on the prompt, tokens up to EOS); diversity = distinct-2 over all
continuations of a seed. Curves over strength for every method, mean and 95% Student-t CI over
seeds; success compared at matched perplexity (per seed, success interpolated linearly in
log-perplexity along the method's strength curve, then the CI over seeds) and within a fluency
budget (the best success on the curve at perplexity <= P, with and without a diversity floor
distinct-2 >= 0.9 x the unsteered ar's; this reading keeps a method whose perplexity never rises
to P). ``--resummarize DIR`` redoes the summaries, figures and report of a finished run from its
results.json without generating anything.

  ar+bias      weighted decoding: ``ar`` with logits + g B.e_v (the prior form of the field);
  ar+actadd    activation addition after layer L: c * mean residual norm * unit(h("This is about <word>")
               - h("This is about it/that/...")) over the same steering words;
  ar+heads     head gains g on the K heads whose field N_proj points most along B on these prompts
               (mean N_proj . B over the 40 neutral prompts, logit units);
  spin+prior   the spin (posterior-over-vocabulary) sampler on the LM's own logits (``sampler.prior=lm``,
               ``ckpt=none``: its unsteered target is the LM) with g B.e_v added to its prior logits;
  spin+dyn     the same sampler with the field in its reverse SDE instead: drift + g P_S B (damping;
               ``spin+dyn+prec``: + (g/lam) Prec(S, B) with lam = 1).

Task 2 -- a bias contrast scored with the analysis toolkit (analysis.gaps.compute_gaps, in_situ):
occupation prompts ("The nurse said that") with candidates he / she; gap = logit(he) - logit(she).
Reported per intervention and strength: the mean gap, the stereotype contrast (mean gap of
male-coded minus female-coded occupations) and mean |gap|, each with a 95% CI over occupations,
and the collateral damage: perplexity of fixed reference text (the unsteered LM's own
continuations of 40 unrelated prompts) under the intervened model, as a ratio to the clean model.
Heads for the head-gain arm come from an analysis report: ``python -m analysis stats`` on the
occupation set (heads.csv), top cooperative heads (their direct push tracks the model's he/she gap).

Cost: tokens/s of ``ar`` with and without each intervention, side by side, round-robin.

Writes report.md, results.json, run.json, topic_curves.png, bias_contrast.png to ``--out``
(default runs/bench/steering-<timestamp>).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from spindiff.config import compose
from spindiff.evaluation.metrics import distinct_n
from spindiff.generation import GenerationSession, Sampler, build_sampler, get_sampler_class
from spindiff.generation.steering import Steering, word_direction
from spindiff.lm.adapter import last_positions
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.interventions import (ACTADD_NEUTRAL, ACTADD_TEMPLATE, ActivationAddition, HeadGains, Intervention,
                                       contrast_vector)
from spindiff.runtime import atomic_write_json, atomic_write_text, git_commit, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's helpers, also when loaded by path
from _steering_bias import gap_stats, run_bias  # noqa: E402,F401 - gap_stats: tests/test_steering.py reads it here
from _steering_report import (NEUTRAL_PROMPTS, TOPICS, best_within, figures, resummarize,  # noqa: E402,F401
                              success_at, summarize_topics, verdict, write_report)

# --------------------------------------------------------------------------- settings
SETTINGS = {
    "full": dict(n_prompts=40, topics=list(TOPICS), seeds=[0, 1, 2], max_new_tokens=16, batch_size=40,
                 bias=[5.0, 9.0, 13.0], actadd=[0.1, 0.2, 0.4], heads=[1.5, 2.5, 4.0],
                 spin_prior=[5.0, 9.0, 13.0], spin_dyn=[1.5, 3.0, 6.0], spin_prec=[3.0], spin_prec_lam=1.0,
                 actadd_layer=8, heads_k=4,
                 gap_bias=[2.0, 4.0, 8.0], gap_actadd=[0.05, 0.1, 0.2], gap_heads=[0.5, 0.0, -0.5], gap_heads_k=5,
                 ref_prompts=40, ref_tokens=24, tp_tokens=16, tp_reps=5),
    "quick": dict(n_prompts=8, topics=["sports", "food"], seeds=[0, 1], max_new_tokens=10, batch_size=16,
                  bias=[9.0], actadd=[0.2], heads=[2.5], spin_prior=[9.0], spin_dyn=[3.0], spin_prec=[],
                  spin_prec_lam=1.0, actadd_layer=8, heads_k=4,
                  gap_bias=[4.0], gap_actadd=[0.1], gap_heads=[0.0], gap_heads_k=5,
                  ref_prompts=8, ref_tokens=12, tp_tokens=8, tp_reps=2),
}
SPIN_ARGS = ["sampler.name=spin", "ckpt=none", "sampler.prior=lm"]  # the posterior sampler on the LM's own logits
def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- generation and scoring
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.s = dict(SETTINGS[self.mode])
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or Path("runs") / "bench" / f"steering-{stamp}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = [f"model.name={args.model}", "stream=false", "wandb.mode=disabled"]
        self.session = GenerationSession.load(compose("sample", self.base).model)
        self.prompts = NEUTRAL_PROMPTS[: self.s["n_prompts"]]
        self.seqs = self.session.encode(self.prompts, reserve=self.s["max_new_tokens"])
        self.log: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.append(msg)

    def sampler(self, overrides: Sequence[str], steering: Optional[Steering] = None) -> Sampler:
        sm = build_sampler(compose("sample", self.base + list(overrides)), self.session)
        sm.steering = steering
        return sm

    def generate(self, sampler: Sampler, seqs: list[list[int]], seed: int, max_new: int,
                 iv: Optional[Intervention] = None) -> tuple[list[list[int]], float, int]:
        """Continuations (token lists up to and including EOS) of ``seqs``; seconds; tokens."""
        out, secs, n = [], 0.0, 0
        bs = self.s["batch_size"]
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, len(seqs), bs):
            ids, mask = self.session.batch(seqs[i:i + bs])
            if iv is not None:
                with iv:
                    gb = sampler.generate(ids, mask, max_new, gen, stop_at_eos=True)
            else:
                gb = sampler.generate(ids, mask, max_new, gen, stop_at_eos=True)
            secs += gb.seconds
            n += gb.n_tokens
            out.extend(gb.tokens[b][gb.valid[b]].tolist() for b in range(gb.tokens.shape[0]))
        return out, secs, n

    @torch.no_grad()
    def logprobs(self, seqs: list[list[int]], conts: list[list[int]], bias: Optional[torch.Tensor] = None,
                 iv: Optional[Intervention] = None) -> list[list[float]]:
        """Per-token log p(cont | prompt) under the model (clean unless ``iv`` / ``bias`` is given)."""
        res: list[list[float]] = []
        bs = 40
        for i in range(0, len(seqs), bs):
            P, C = seqs[i:i + bs], conts[i:i + bs]
            full = [list(p) + list(c) for p, c in zip(P, C)]
            ids, mask = self.session.batch(full)
            if iv is not None:
                with iv:
                    logits = self.session.model(input_ids=ids, attention_mask=mask,
                                                position_ids=last_positions(mask)).logits
            else:
                logits = self.session.model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask)).logits
            logits = logits.double()
            if bias is not None:
                logits = logits + bias.double()
            lp = logits.log_softmax(-1)
            T = ids.shape[1]
            for b, c in enumerate(C):
                if not c:
                    res.append([])
                    continue
                pos = torch.arange(T - len(c) - 1, T - 1)  # predicting positions T-len(c) .. T-1
                res.append(lp[b, pos, torch.tensor(c)].tolist())
        return res


def held_out_hit(text: str, words: Sequence[str]) -> bool:
    pat = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    return re.search(pat, text, flags=re.IGNORECASE) is not None


# --------------------------------------------------------------------------- task 1: topics
def topic_fields(b: Bench) -> dict[str, torch.Tensor]:
    sess = b.session
    return {t: word_direction(sess.token_table, sess.tokenizer, TOPICS[t]["steer"], sess.name) for t in b.s["topics"]}


@torch.no_grad()
def aligned_heads(b: Bench, direction: torch.Tensor, k: int) -> list[tuple[tuple[int, int], float]]:
    """The k heads with the largest mean N_proj . B over the neutral prompts (logit units)."""
    ad = b.session.adapter
    prov = ContextFieldProvider(b.session.model, "all", "in_situ", normalize=False, final_norm=True, adapter=ad)
    ids, mask = b.session.batch(b.seqs)
    per = prov(ids, mask).per_head.double()  # (P, L*H, D)
    unit = (direction / direction.norm()).double()
    proj = (per @ unit).mean(0)  # (L*H,)
    top = torch.argsort(proj, descending=True)[:k]
    return [((int(i) // ad.n_heads, int(i) % ad.n_heads), float(proj[i])) for i in top]


def topic_arm_factory(b: Bench, fields: dict[str, torch.Tensor]) -> dict[str, Callable[[str, float], tuple]]:
    """method -> f(topic, strength) -> (sampler, intervention or None, note)."""
    sess, s = b.session, b.s
    ar = b.sampler(["sampler.name=ar", "sampler.temperature=1.0", "sampler.top_p=1.0"])
    cache: dict[tuple, Any] = {}

    def bias(topic: str, g: float):
        return b.sampler(["sampler.name=ar"], Steering(fields[topic], g, "prior", words=TOPICS[topic]["steer"])), None

    def actadd(topic: str, c: float):
        key = ("actadd", topic)
        if key not in cache:
            pos = [ACTADD_TEMPLATE.format(w) for w in TOPICS[topic]["steer"]]
            neg = [ACTADD_TEMPLATE.format(w) for w in ACTADD_NEUTRAL]
            cache[key] = contrast_vector(sess.model, sess.adapter, sess.tokenizer, pos, neg, s["actadd_layer"], 1.0)
        v, info = cache[key]
        return ar, ActivationAddition(sess.adapter, s["actadd_layer"], c * v, info)

    def heads(topic: str, g: float):
        key = ("heads", topic)
        if key not in cache:
            cache[key] = aligned_heads(b, fields[topic], s["heads_k"])
            b.say(f"  heads aligned with the {topic} field: "
                  + ", ".join(f"L{l}H{h} ({p:+.2f})" for (l, h), p in cache[key]))
        return ar, HeadGains(sess.adapter, {lh: g for lh, _ in cache[key]})

    arms: dict[str, Callable] = {"ar+bias": bias, "ar+actadd": actadd, "ar+heads": heads}
    if b.spin:
        spin_cfg = b.spin_args
        plain = b.sampler(spin_cfg)
        lam = float(compose("sample", b.base + spin_cfg).sampler.lam)

        def spin(mode: str, lam: float):
            def f(topic: str, g: float):
                st = Steering(fields[topic], g, mode, lam=lam, words=TOPICS[topic]["steer"])
                plain.steering = st  # one sampler object, its steering field swapped per arm
                return plain, None
            return f
        arms["spin+prior"] = spin("prior", lam)
        arms["spin+dyn"] = spin("dynamics", lam)
        arms["spin+dyn+prec"] = spin("dynamics", float(s["spin_prec_lam"]))

        def unsteered(topic: str, g: float):
            plain.steering = None
            return plain, None
        arms["_spin"] = unsteered
    arms["_ar"] = lambda topic, g: (ar, None)  # strength 0
    return arms


def run_topics(b: Bench) -> dict[str, Any]:
    s = b.s
    fields = topic_fields(b)
    arms = topic_arm_factory(b, fields)
    grid: list[tuple[str, float]] = [("_ar", 0.0)]
    grid += [("ar+bias", g) for g in s["bias"]] + [("ar+actadd", c) for c in s["actadd"]] + \
            [("ar+heads", g) for g in s["heads"]]
    if b.spin:
        grid += [("_spin", 0.0)] + [("spin+prior", g) for g in s["spin_prior"]] + \
                [("spin+dyn", g) for g in s["spin_dyn"]] + [("spin+dyn+prec", g) for g in s["spin_prec"]]
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[str]] = {}
    jobs = [(m, g, seed) for seed in s["seeds"] for m, g in grid]
    for m, g, seed in tqdm(jobs, desc="topic steering", unit="cfg", file=sys.stdout, mininterval=5):
        hits, any_hits, lps, conts_all, secs, ntok = 0, 0, [], [], 0.0, 0
        total = 0
        for ti, topic in enumerate(s["topics"]):
            sampler, iv = arms[m](topic, g)
            conts, sec, n = b.generate(sampler, b.seqs, 1000 * seed + ti, s["max_new_tokens"], iv)
            secs, ntok = secs + sec, ntok + n
            texts = [b.session.tokenizer.decode(c, skip_special_tokens=True) for c in conts]
            hits += sum(held_out_hit(t, TOPICS[topic]["heldout"]) for t in texts)
            any_hits += sum(held_out_hit(t, TOPICS[topic]["steer"]) for t in texts)
            total += len(texts)
            for lp in b.logprobs(b.seqs, conts):
                lps.extend(lp)
            conts_all.extend(conts)
            if seed == s["seeds"][0]:
                samples[f"{m}@{g:g}/{topic}"] = [p + t for p, t in zip(b.prompts[:3], texts[:3])]
        rows.append({"method": m, "strength": g, "seed": seed, "success": hits / total, "steer_word": any_hits / total,
                     "logppl": -float(np.mean(lps)) if lps else float("nan"),
                     "distinct_2": distinct_n(conts_all, 2), "tokens": ntok, "seconds": secs})
        r = rows[-1]
        tqdm.write(f"  {m:<11} g={g:<5g} seed={seed}  success={r['success']:.3f}  ppl={math.exp(r['logppl']):.1f}  "
                   f"distinct-2={r['distinct_2']:.3f}  ({ntok / max(secs, 1e-9):.0f} tok/s)", file=sys.stdout)
    return {"rows": rows, "samples": samples, "summary": summarize_topics(b, rows)}


# --------------------------------------------------------------------------- cost
def run_cost(b: Bench, fields: dict[str, torch.Tensor]) -> dict[str, Any]:
    """tokens/s with and without each method on the same prompts and tokens. Every round runs each
    arm once right after its unsteered base (ar or spin), so the per-round ratio base/arm - 1 (the
    added per-token cost) sees the same machine load; reported: the median over rounds."""
    s, sess = b.s, b.session
    topic = s["topics"][0]
    ar = b.sampler(["sampler.name=ar"])
    arms: dict[str, tuple[Sampler, Optional[Intervention]]] = {
        "ar": (ar, None),
        "ar+bias": (b.sampler(["sampler.name=ar"], Steering(fields[topic], 9.0)), None),
        "ar+actadd": (ar, ActivationAddition(sess.adapter, s["actadd_layer"],
                                             torch.ones(sess.dim, dtype=sess.dtype))),
        "ar+heads": (ar, HeadGains(sess.adapter, {(l, h): 2.0 for l in range(0, sess.adapter.n_layers, 7)
                                                  for h in range(2)})),
    }
    if b.spin:
        arms["spin"] = (b.sampler(b.spin_args), None)
        arms["spin+prior"] = (b.sampler(b.spin_args, Steering(fields[topic], 9.0, "prior")), None)
        arms["spin+dyn"] = (b.sampler(b.spin_args, Steering(fields[topic], 3.0, "dynamics")), None)
        arms["spin+dyn+prec"] = (b.sampler(b.spin_args, Steering(fields[topic], 3.0, "dynamics", lam=1.0)), None)
    seqs = b.seqs[: s["batch_size"]]

    def tps(k: str, rep: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        sm, iv = arms[k]
        ids, mask = sess.batch(seqs)
        gen = torch.Generator().manual_seed(rep)
        c0 = time.process_time()
        if iv is not None:
            with iv:
                gb = sm.generate(ids, mask, s["tp_tokens"], gen, stop_at_eos=False)
        else:
            gb = sm.generate(ids, mask, s["tp_tokens"], gen, stop_at_eos=False)
        return gb.n_tokens / gb.seconds, gb.n_tokens / max(time.process_time() - c0, 1e-9)

    for k in arms:  # warm-up
        b.generate(arms[k][0], seqs[:2], 0, 2, arms[k][1])
    runs: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    ratios: dict[str, list[float]] = {k: [] for k in arms if k not in ("ar", "spin")}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in ratios}
    for rep in tqdm(range(s["tp_reps"]), desc="cost", unit="round", file=sys.stdout):
        for k in ratios:
            base = "spin" if k.startswith("spin") else "ar"
            (w_base, c_base), (w_arm, c_arm) = tps(base, rep), tps(k, rep)
            runs[base].append(w_base)
            runs[k].append(w_arm)
            cpu[base].append(c_base)
            cpu[k].append(c_arm)
            ratios[k].append(w_base / w_arm - 1.0)
            cpu_ratios[k].append(c_base / c_arm - 1.0)

    def summ(v: list[float]) -> dict[str, Any]:
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
    res: dict[str, Any] = {"batch": len(seqs), "tokens": s["tp_tokens"], "reps": s["tp_reps"], "runs": runs,
                           "cpu_runs": cpu, "median": {k: statistics.median(v) for k, v in runs.items()},
                           "best": {k: max(v) for k, v in runs.items()},
                           "cpu_median": {k: statistics.median(v) for k, v in cpu.items()},
                           "overhead": {k: summ(v) for k, v in ratios.items()},
                           "cpu_overhead": {k: summ(v) for k, v in cpu_ratios.items()}}
    for k in arms:
        ov, oc = res["overhead"].get(k), res["cpu_overhead"].get(k)
        b.say(f"  {k:<14} tok/s median {res['median'][k]:.1f} best {res['best'][k]:.1f}  tok/CPU-s "
              f"{res['cpu_median'][k]:.1f}"
              + (f"   added per-token cost: wall {100 * ov['median']:+.1f}% [{100 * ov['min']:+.1f}, "
                 f"{100 * ov['max']:+.1f}], CPU {100 * oc['median']:+.1f}% [{100 * oc['min']:+.1f}, "
                 f"{100 * oc['max']:+.1f}] (median [range] of paired rounds)" if ov else ""))
    return res


def spin_available() -> bool:
    return "dynamics" in getattr(get_sampler_class("spin"), "steering_modes", ())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer prompts, topics, seeds, strengths")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="")
    ap.add_argument("--no-spin", action="store_true", help="skip the spin sampler's arms (field in the prior / drift)")
    ap.add_argument("--spin-args", default=" ".join(SPIN_ARGS),
                    help="sample.py overrides of the spin arms (default: %(default)s, the posterior sampler on the "
                         "LM's own logits, so its unsteered target is the LM)")
    ap.add_argument("--no-bias-task", action="store_true")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--resummarize", default="", metavar="DIR",
                    help="recompute summaries, figures and report.md of a finished run from DIR/results.json")
    args = ap.parse_args(argv)
    if args.resummarize:
        return resummarize(Path(args.resummarize))
    t0 = time.perf_counter()
    load0 = _loadavg()
    b = Bench(args)
    b.spin = not args.no_spin and spin_available()
    if not args.no_spin and not b.spin:
        b.say("note: this checkout's spin sampler does not apply steering (SpinSampler.steering_modes); spin arms skipped")
    b.spin_args = args.spin_args.split()
    torch.manual_seed(0)
    b.say(f"# bench_steering ({b.mode}) on {b.session.name}; out={b.out}")
    b.say("[task 1] topic steering")
    topics = run_topics(b)
    bias = None
    if not args.no_bias_task:
        b.say("[task 2] bias contrast")
        bias = run_bias(b)
    cost = None
    if not args.no_cost:
        b.say("[cost] tokens/s side by side")
        cost = run_cost(b, topic_fields(b))
    figs = figures(b, topics, bias)
    info = {"command": "python bench/bench_steering.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "host": f"{platform.platform()}, {os.cpu_count()} CPUs", "load_start": load0, "load_end": _loadavg(),
            "wall_min": (time.perf_counter() - t0) / 60, "git": git_commit() or os.environ.get("BENCH_GIT_COMMIT"),
            "model": b.session.lm.info,
            "versions": package_versions(), "seeds": b.s["seeds"], "settings": b.s,
            "spin": b.spin, "spin_args": b.spin_args if b.spin else None}
    report = write_report(b, info, topics, bias, cost, figs)
    atomic_write_text(b.out / "report.md", report)
    results = {"info": info, "topics": topics, "bias": bias, "cost": cost, "figures": figs, "log": b.log}
    atomic_write_json(b.out / "results.json", results)
    atomic_write_json(b.out / "run.json", info)
    print("\n" + "\n".join(verdict(b, topics)))
    print(f"\n# wrote {b.out / 'report.md'} ({info['wall_min']:.1f} min)")
    return results


if __name__ == "__main__":
    main()
