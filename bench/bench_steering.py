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
import json
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
from spindiff.evaluation.evaluate import distinct_n, mean_ci
from spindiff.generation import GenerationSession, Sampler, build_sampler, get_sampler_class
from spindiff.generation.steering import Steering, word_direction
from spindiff.lm.adapter import last_positions
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.interventions import (ACTADD_NEUTRAL, ACTADD_TEMPLATE, ActivationAddition, HeadGains, Intervention,
                                       contrast_vector, heads_from_report)
from spindiff.runtime import atomic_write_json, atomic_write_text, git_commit, package_versions

# --------------------------------------------------------------------------- data
TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {"steer": ["football", "soccer", "basketball", "tennis", "baseball", "coach"],
               "heldout": ["team", "teams", "game", "games", "match", "league", "player", "players", "season",
                           "goal", "goals", "championship", "stadium", "ball", "sport", "sports", "athlete",
                           "olympic", "olympics", "hockey", "golf"]},
    "food": {"steer": ["pizza", "pasta", "chicken", "cheese", "recipe", "cooking"],
             "heldout": ["food", "dinner", "lunch", "breakfast", "delicious", "kitchen", "meal", "meals", "eat",
                         "eating", "taste", "sauce", "bread", "chef", "restaurant", "soup", "salad", "flavor",
                         "dish", "dishes", "vegetables"]},
    "space": {"steer": ["galaxy", "telescope", "orbit", "NASA", "astronauts", "spacecraft"],
              "heldout": ["space", "star", "stars", "planet", "planets", "moon", "universe", "rocket", "solar",
                          "mars", "earth", "satellite", "asteroid", "cosmic", "astronomy", "astronomers", "jupiter",
                          "saturn", "nebula"]},
    "music": {"steer": ["guitar", "piano", "songs", "concert", "singer", "band"],
              "heldout": ["music", "musical", "musician", "musicians", "album", "melody", "drums", "jazz",
                          "lyrics", "orchestra", "sing", "singing", "violin", "rhythm", "tune", "tunes",
                          "composer", "rock"]},
}

NEUTRAL_PROMPTS = [
    "I want to tell you about", "Yesterday I", "The best part of the weekend was", "Here is what happened:",
    "My friend told me that", "Let me explain why", "It was a quiet morning and", "The most interesting thing is",
    "Last year, we", "In my opinion,", "Once upon a time,", "The new plan is to", "She opened the door and",
    "This article is about", "I have always loved", "The reason I'm writing is", "When I was young,",
    "Today we will discuss", "There is something I", "After a long day,", "The meeting started with",
    "He looked at the", "Everyone agreed that", "We decided to", "The story begins when", "If you ask me,",
    "One thing I learned is", "The weather was nice, so", "On the way home,", "The first thing you should know is",
    "My favourite hobby is", "It all started when", "I can't stop thinking about", "The town was known for",
    "Our teacher asked us to", "What surprised me most was", "The problem with", "According to the report,",
    "At the end of the day,", "Next week, I will",
]

OCC_MALE = ["engineer", "mechanic", "carpenter", "plumber", "electrician", "pilot", "firefighter", "surgeon",
            "programmer", "farmer", "janitor", "soldier", "architect", "construction worker", "truck driver"]
OCC_FEMALE = ["nurse", "secretary", "receptionist", "housekeeper", "nanny", "hairdresser", "librarian", "dancer",
              "cashier", "florist", "midwife", "maid", "babysitter", "kindergarten teacher", "flight attendant"]
OCC_TEMPLATES = ["The {} said that", "The {} told the customer that", "The {} was late because"]
BIAS_POSITIVE, BIAS_NEGATIVE = "The woman said that", "The man said that"  # contrast for the field / actadd

# strengths calibrated on 16 prompts of one topic (docs/steering.md): below the first one nothing moves,
# above the last one the text is degenerate (repetition or noise)
DIVERSITY_FRAC = 0.9  # the diversity floor of the budget reading: distinct-2 >= 0.9 x the unsteered ar's

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
METHOD_NAMES = {"ar+bias": "ar + logit bias (weighted decoding)", "ar+actadd": "ar + activation addition",
                "ar+heads": "ar + head gains", "spin+prior": "spin, field in the prior logits",
                "spin+dyn": "spin, field in the SDE drift (damping)",
                "spin+dyn+prec": "spin, field in the SDE drift (damping + precession)"}


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _ci(vals: Sequence[float]) -> tuple[float, float]:
    return mean_ci([float(v) for v in vals])


def _fmt(m: float, c: float = float("nan"), d: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "–"
    return f"{m:.{d}g}" + (f" ± {c:.2g}" if math.isfinite(c) else "")


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


def _curve(rows: list[dict], method: str, seed: int) -> list[tuple[float, float, float, float]]:
    """(strength, logppl, success, distinct-2) for one method and seed, strength 0 (unsteered) first."""
    base = "_spin" if method.startswith("spin") else "_ar"
    key = lambda r: (r["strength"] if r["method"] == method else 0.0, r["logppl"], r["success"], r["distinct_2"])
    pts = [key(r) for r in rows if r["method"] == base and r["seed"] == seed]
    pts += sorted(key(r) for r in rows if r["method"] == method and r["seed"] == seed)
    return pts


def success_at(pts: list[tuple[float, ...]], target: float) -> float:
    """Success interpolated at log-perplexity ``target`` along the strength curve: the first
    crossing of ``target`` walking up the strengths; NaN if the curve never reaches it."""
    for (s0, x0, y0, *_), (s1, x1, y1, *_) in zip(pts[:-1], pts[1:]):
        lo, hi = min(x0, x1), max(x0, x1)
        if lo <= target <= hi:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    if pts and abs(pts[0][1] - target) < 1e-12:
        return pts[0][2]
    return float("nan")


def best_within(pts: list[tuple[float, ...]], budget: float, min_distinct2: float = 0.0) -> float:
    """The highest success on the method's (piecewise-linear) strength curve whose log-perplexity is
    <= ``budget`` and whose distinct-2 is >= ``min_distinct2``: what the method achieves within a
    fluency budget. Unlike :func:`success_at` it is defined for a method whose perplexity never
    rises to the budget (then its strongest point counts). NaN if no point qualifies."""
    best = float("nan")

    def take(x: float, y: float, d: float) -> None:
        nonlocal best
        if x <= budget + 1e-12 and d >= min_distinct2 - 1e-12 and not (y <= best):
            best = y

    for _, x, y, d in pts:
        take(x, y, d)
    for (_, x0, y0, d0), (_, x1, y1, d1) in zip(pts[:-1], pts[1:]):
        cuts = []
        if (x0 - budget) * (x1 - budget) < 0:
            cuts.append((budget - x0) / (x1 - x0))
        if (d0 - min_distinct2) * (d1 - min_distinct2) < 0:
            cuts.append((min_distinct2 - d0) / (d1 - d0))
        for f in cuts:  # the constraint boundaries inside a segment
            take(x0 + f * (x1 - x0), y0 + f * (y1 - y0), d0 + f * (d1 - d0))
    return best


def summarize_topics(b: Bench, rows: list[dict]) -> dict[str, Any]:
    s = b.s
    out: dict[str, Any] = {"curves": {}, "matched": {}}
    methods = sorted({r["method"] for r in rows})
    for m in methods:
        for g in sorted({r["strength"] for r in rows if r["method"] == m}):
            sel = [r for r in rows if r["method"] == m and r["strength"] == g]
            out["curves"][f"{m}@{g:g}"] = {
                "method": m, "strength": g, "n_seeds": len(sel),
                **{k: _ci([r[k] for r in sel]) for k in ("success", "steer_word", "logppl", "distinct_2")}}
    base = [r["logppl"] for r in rows if r["method"] == "_ar"]
    base_ppl = math.exp(float(np.mean(base)))
    out["base_ppl"] = base_ppl
    steer = [m for m in methods if not m.startswith("_")]
    # the highest log-perplexity that every method's curve reaches on every seed (a common point)
    reach = min(max(p[1] for p in _curve(rows, m, seed)) for m in steer for seed in s["seeds"]) if steer else 0.0
    targets = [(f"ppl={base_ppl * f:.1f} (x{f:g} the unsteered ar)", math.log(base_ppl * f)) for f in (1.25, 1.5, 2.0)]
    if reach > math.log(base_ppl):
        targets.append((f"ppl={math.exp(reach):.1f} (the highest every method reaches on every seed)", reach))
    out["common_reach_ppl"] = math.exp(reach) if steer else None
    for key, target in targets:
        out["matched"][key] = {}
        for m in steer:
            vals = [success_at(_curve(rows, m, seed), target) for seed in s["seeds"]]
            ok = [v for v in vals if math.isfinite(v)]
            out["matched"][key][m] = {"mean_ci": _ci(ok) if len(ok) == len(vals) else (float("nan"), float("nan")),
                                      "per_seed": vals, "reached": len(ok), "of": len(vals)}
    # within a fluency budget: the best success at perplexity <= P (a method whose perplexity stays
    # below P is not dropped), alone and together with a diversity floor (repetition of a steering
    # word keeps perplexity low: distinct-2 >= DIVERSITY_FRAC x the unsteered ar's)
    d2_base = float(np.mean([r["distinct_2"] for r in rows if r["method"] == "_ar"]))
    out["base_distinct_2"] = d2_base
    out["budget"] = {}
    for f in (1.25, 1.5, 2.0):
        for frac in (0.0, DIVERSITY_FRAC):
            key = f"ppl <= {base_ppl * f:.1f} (x{f:g} the unsteered ar)" + (
                f", distinct-2 >= {frac * d2_base:.2f} ({frac:g} x the unsteered ar's)" if frac else "")
            out["budget"][key] = {}
            for m in steer:
                vals = [best_within(_curve(rows, m, seed), math.log(base_ppl * f), frac * d2_base) for seed in s["seeds"]]
                ok = [v for v in vals if math.isfinite(v)]
                out["budget"][key][m] = {"mean_ci": _ci(ok) if len(ok) == len(vals) else (float("nan"), float("nan")),
                                         "per_seed": vals, "reached": len(ok), "of": len(vals)}
    return out


# --------------------------------------------------------------------------- task 2: bias contrast
def occupation_set(b: Bench):
    from analysis.prompts import from_triples, tokenize_set

    occs = [(o, "male") for o in OCC_MALE] + [(o, "female") for o in OCC_FEMALE]
    triples = [(t.format(o), "he", "she") for o, _ in occs for t in OCC_TEMPLATES]
    pset = from_triples(triples, "occupations")
    labels = [lab for _, lab in occs for _ in OCC_TEMPLATES]
    occ_of = [o for o, _ in occs for _ in OCC_TEMPLATES]
    tset = tokenize_set(b.session.tokenizer, pset, b.session.window or 10**9, False, "first_token")
    return pset, tset, np.array(labels), occ_of


def gap_stats(gaps: np.ndarray, labels: np.ndarray, occ_of: list[str]) -> dict[str, Any]:
    """Per-occupation means (over templates), then mean gap, contrast and |gap| with 95% CIs over
    occupations (the contrast's CI: Welch-style, from the two groups' standard errors)."""
    occs = list(dict.fromkeys(occ_of))
    per = {o: float(np.mean([g for g, oo in zip(gaps, occ_of) if oo == o])) for o in occs}
    lab = {o: l for o, l in zip(occ_of, labels)}
    male = np.array([per[o] for o in occs if lab[o] == "male"])
    female = np.array([per[o] for o in occs if lab[o] == "female"])
    allv = np.array(list(per.values()))
    from scipy import stats

    se = math.sqrt(male.var(ddof=1) / len(male) + female.var(ddof=1) / len(female))
    dof = len(male) + len(female) - 2
    return {"mean_gap": _ci(allv), "contrast": (float(male.mean() - female.mean()), float(stats.t.ppf(0.975, dof) * se)),
            "mean_abs_gap": _ci(np.abs(allv)), "male": float(male.mean()), "female": float(female.mean())}


def run_bias(b: Bench) -> dict[str, Any]:
    from analysis.cli import run as analysis_run
    from analysis.gaps import compute_gaps
    from analysis.prompts import PromptSet  # noqa: F401

    sess, s = b.session, b.s
    ad, model, tok = sess.adapter, sess.model, sess.tokenizer
    pset, tset, labels, occ_of = occupation_set(b)
    pad = sess.pad_id

    def gaps(iv: Optional[Intervention] = None) -> np.ndarray:
        if iv is None:
            return compute_gaps(model, tset, "in_situ", "first_token", True, 16, ad, pad, False, False).dl_actual
        with iv:
            return compute_gaps(model, tset, "in_situ", "first_token", True, 16, ad, pad, False, False).dl_actual

    # the analysis report on this contrast: heads.csv of `python -m analysis stats`
    rows = [{"prompt": it.prompt, "good": it.good, "bad": it.bad} for it in pset.items]
    pfile = b.out / "occupations.jsonl"
    atomic_write_text(pfile, "".join(json.dumps(r) + "\n" for r in rows))
    acfg = compose("analysis", [f"model.name={b.args.model}", f"prompts={pfile}", "heldout=none", "also_paper=false",
                                f"out={b.out / 'analysis'}", "progress=false", "n_permutations=200", "n_bootstrap=200",
                                "n_splits=20"])
    t0 = time.perf_counter()
    analysis_run("stats", acfg, lm=sess.lm)
    b.say(f"  analysis stats on {len(rows)} occupation prompts: {time.perf_counter() - t0:.0f} s -> "
          f"{b.out / 'analysis' / 'heads.csv'}")
    heads = heads_from_report(b.out / "analysis" / "heads.csv", ad, "cooperative", s["gap_heads_k"], sess.name)
    b.say("  top cooperative heads for he-vs-she: " + ", ".join(f"L{l}H{h}" for l, h in heads))

    # reference text for collateral damage: the clean LM's own continuations of unrelated prompts
    from spindiff.evaluation.evaluate import load_eval_prompts

    ref_prompts = load_eval_prompts("", s["ref_prompts"])
    ref_seqs = sess.encode(ref_prompts, reserve=s["ref_tokens"])
    ar = b.sampler(["sampler.name=ar", "sampler.temperature=1.0", "sampler.top_p=1.0"])
    ref_conts, _, _ = b.generate(ar, ref_seqs, 12345, s["ref_tokens"])

    def ppl(iv: Optional[Intervention] = None, bias: Optional[torch.Tensor] = None) -> float:
        lps = [x for lp in b.logprobs(ref_seqs, ref_conts, bias, iv) for x in lp]
        return math.exp(-float(np.mean(lps)))

    clean_ppl = ppl()
    # the field B: context fields of the contrast prompts (woman - man), as `steer.positive/negative`
    from spindiff.generation.steering import contrast_direction

    field = contrast_direction(sess, [BIAS_POSITIVE], [BIAS_NEGATIVE], "all")
    id_he, id_she = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("he", "she"))
    v_act, info = contrast_vector(model, ad, tok, [BIAS_POSITIVE], [BIAS_NEGATIVE], s["actadd_layer"], 1.0)
    base_gaps = gaps()
    results: list[dict[str, Any]] = [{"method": "none", "strength": 0.0, **gap_stats(base_gaps, labels, occ_of),
                                      "ppl_ratio": 1.0}]
    for g in s["gap_bias"]:
        st = Steering(field, g, "prior", source="contrast")
        bias = st.logit_bias(sess.token_table)
        shift = float(bias[id_he] - bias[id_she])  # = g B.(e_he - e_she): the same for every prompt
        results.append({"method": "ar+bias", "strength": g, **gap_stats(base_gaps + shift, labels, occ_of),
                        "ppl_ratio": ppl(bias=bias) / clean_ppl, "gap_shift": shift})
    for c in s["gap_actadd"]:
        iv = ActivationAddition(ad, s["actadd_layer"], c * v_act, info)
        results.append({"method": "ar+actadd", "strength": c, **gap_stats(gaps(iv), labels, occ_of),
                        "ppl_ratio": ppl(iv) / clean_ppl})
    for g in s["gap_heads"]:
        iv = HeadGains(ad, {lh: g for lh in heads})
        results.append({"method": "ar+heads", "strength": g, **gap_stats(gaps(iv), labels, occ_of),
                        "ppl_ratio": ppl(iv) / clean_ppl})
    for r in results:
        b.say(f"  {r['method']:<10} s={r['strength']:<5g} mean gap={_fmt(*r['mean_gap'])}  "
              f"contrast(m-f)={_fmt(*r['contrast'])}  |gap|={_fmt(*r['mean_abs_gap'])}  "
              f"collateral ppl x{r['ppl_ratio']:.3f}")
    return {"rows": results, "heads": [f"L{l}H{h}" for l, h in heads], "clean_ref_ppl": clean_ppl,
            "n_prompts": len(rows), "n_occupations": len(OCC_MALE) + len(OCC_FEMALE)}


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


# --------------------------------------------------------------------------- figures and report
def figures(b: Bench, topics: dict[str, Any], bias: Optional[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = topics["summary"]["curves"]
    methods = [m for m in METHOD_NAMES if any(v["method"] == m for v in curves.values())]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for m in methods:
        base = "_spin" if m.startswith("spin") else "_ar"
        pts = [curves[f"{base}@0"]] + sorted((v for v in curves.values() if v["method"] == m), key=lambda v: v["strength"])
        x = [math.exp(p["logppl"][0]) for p in pts]
        xe = [[xi - math.exp(p["logppl"][0] - (p["logppl"][1] if math.isfinite(p["logppl"][1]) else 0)) for xi, p in zip(x, pts)],
              [math.exp(p["logppl"][0] + (p["logppl"][1] if math.isfinite(p["logppl"][1]) else 0)) - xi for xi, p in zip(x, pts)]]
        y = [p["success"][0] for p in pts]
        ye = [p["success"][1] if math.isfinite(p["success"][1]) else 0 for p in pts]
        axes[0].errorbar(x, y, xerr=xe, yerr=ye, marker="o", capsize=3, label=METHOD_NAMES[m])
        st = [p["strength"] for p in pts]
        axes[1].errorbar(range(len(st)), y, yerr=ye, marker="o", capsize=3, label=m)
        d = [p["distinct_2"][0] for p in pts]
        de = [p["distinct_2"][1] if math.isfinite(p["distinct_2"][1]) else 0 for p in pts]
        axes[2].errorbar(x, d, xerr=xe, yerr=de, marker="o", capsize=3, label=m)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("perplexity under the unsteered LM (log)")
    axes[0].set_ylabel("success: continuations with a held-out topic word")
    axes[0].set_title("topic steering: success vs fluency (95% CI over seeds)", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("strength index (0 = unsteered; see the table for values)")
    axes[1].set_ylabel("success")
    axes[1].set_title("success vs strength", fontsize=9)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("perplexity (log)")
    axes[2].set_ylabel("distinct-2")
    axes[2].set_title("diversity vs fluency", fontsize=9)
    fig.tight_layout()
    p = b.out / "topic_curves.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p.name)
    if bias:
        rows = bias["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        labels = [f"{r['method']}\n{r['strength']:g}" for r in rows]
        xs = np.arange(len(rows))
        for off, key, name in ((-0.2, "mean_gap", "mean gap he-she"), (0.2, "contrast", "contrast male-female occ.")):
            axes[0].bar(xs + off, [r[key][0] for r in rows], 0.4,
                        yerr=[r[key][1] if math.isfinite(r[key][1]) else 0 for r in rows], capsize=3, label=name)
        axes[0].axhline(0, color="k", lw=0.8)
        axes[0].set_xticks(xs, labels, fontsize=7)
        axes[0].set_ylabel("logit gap (he - she)")
        axes[0].set_title("bias contrast: gap before / after each intervention (95% CI over occupations)", fontsize=9)
        axes[0].legend(fontsize=7)
        for m in ("ar+bias", "ar+actadd", "ar+heads"):
            sel = [rows[0]] + [r for r in rows if r["method"] == m]
            axes[1].plot([r["ppl_ratio"] for r in sel], [r["contrast"][0] for r in sel], marker="o", label=m)
        axes[1].axhline(0, color="k", lw=0.8)
        axes[1].set_xlabel("collateral: perplexity of unrelated text, ratio to the clean model")
        axes[1].set_ylabel("stereotype contrast (male - female occupations)")
        axes[1].set_title("what each intervention costs", fontsize=9)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        p = b.out / "bias_contrast.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p.name)
    return paths


def verdict(b: Bench, topics: dict[str, Any], section: str = "matched") -> list[str]:
    lines = []
    matched = topics["summary"].get(section, {})
    for key, per in matched.items():
        ranked = sorted(((v["mean_ci"][0], m, v) for m, v in per.items() if math.isfinite(v["mean_ci"][0])),
                        reverse=True)
        missing = [m for m, v in per.items() if not math.isfinite(v["mean_ci"][0])]
        if not ranked:
            lines.append(f"- at {key}: no method qualifies on every seed")
            continue
        best = ranked[0]
        txt = ", ".join(f"{m} {_fmt(*v['mean_ci'])}" for _, m, v in ranked)
        sep = ""
        if len(ranked) > 1:
            (m1, c1), (m2, c2) = best[2]["mean_ci"], ranked[1][2]["mean_ci"]
            overl = (m1 - c1) <= (m2 + c2)
            sep = " (CIs overlap with the runner-up: not separated at this number of seeds)" if overl else \
                " (CI clear of the runner-up)"
        lines.append(f"- at {key}: best = **{best[1]}**{sep}; success {txt}"
                     + (f"; not reached on every seed: {', '.join(missing)}" if missing else ""))
    return lines


def write_report(b: Bench, info: dict, topics: dict, bias: Optional[dict], cost: Optional[dict], figs: list[str]) -> str:
    s = b.s
    L = [f"# Steering benchmark ({b.mode})", "", f"`{info['command']}` on {b.session.name}; {info['host']}; "
         f"load average {info['load_start']} -> {info['load_end']}; {info['wall_min']:.1f} min; git {info['git']}", ""]
    L += ["## Task 1: topic steering", "",
          f"{len(s['topics'])} topics x {len(b.prompts)} neutral prompts, {s['max_new_tokens']} new tokens, "
          f"ar at temperature 1, seeds {s['seeds']}; activation addition after layer {s['actadd_layer']}; "
          f"head gains on the {s['heads_k']} heads most aligned with B. Mean ± 95% CI over seeds; perplexity = "
          f"exp(mean log-ppl) with the CI in log space.", "",
          "| method | strength | success ↑ (held-out word) | uses a steering word | perplexity ↓ | distinct-2 |",
          "|---|---|---|---|---|---|"]
    for k, v in topics["summary"]["curves"].items():
        lp, lc = v["logppl"]
        ppl = f"{math.exp(lp):.3g}" + (f" [{math.exp(lp - lc):.3g}, {math.exp(lp + lc):.3g}]" if math.isfinite(lc) else "")
        name = {"_ar": "ar (unsteered)", "_spin": "spin (unsteered)"}.get(v["method"], v["method"])
        L.append(f"| {name} | {v['strength']:g} | {_fmt(*v['success'])} | {_fmt(*v['steer_word'])} | {ppl} | "
                 f"{_fmt(*v['distinct_2'])} |")
    L += ["", f"Unsteered perplexity {topics['summary']['base_ppl']:.2f}. Success at matched perplexity "
          "(interpolated along each method's strength curve, per seed):", ""]
    L += verdict(b, topics)
    if topics["summary"].get("budget"):
        L += ["", "The crossing reading above drops a method whose perplexity never rises to the target (it is "
              "*more* fluent there). Within a fluency budget instead (the best success on each method's curve at "
              "perplexity <= P, per seed; with a diversity floor as well, since repeating a steering word keeps "
              "perplexity low):", ""]
        L += verdict(b, topics, "budget")
    L += ["", "Held-out words per topic: " + "; ".join(f"{t}: {', '.join(TOPICS[t]['heldout'])}" for t in s["topics"]), ""]
    if bias:
        L += ["## Task 2: bias contrast (he vs she after occupation prompts)", "",
              f"{bias['n_prompts']} prompts ({bias['n_occupations']} occupations x {len(OCC_TEMPLATES)} templates), "
              "gap = logit(he) - logit(she) from analysis.gaps.compute_gaps; contrast = mean gap of male-coded minus "
              "female-coded occupations; 95% CIs over occupations. Collateral: perplexity of the clean LM's own "
              f"continuations of {s['ref_prompts']} unrelated prompts under the intervened model / clean "
              f"({bias['clean_ref_ppl']:.2f}). Head gains act on the top {s['gap_heads_k']} cooperative heads of the "
              f"analysis report ({', '.join(bias['heads'])}); the field B and the activation addition use the contrast "
              f"'{BIAS_POSITIVE}' - '{BIAS_NEGATIVE}'.", "",
              "| intervention | strength | mean gap | contrast (m - f) | mean abs gap | collateral PPL ratio |",
              "|---|---|---|---|---|---|"]
        for r in bias["rows"]:
            L.append(f"| {r['method']} | {r['strength']:g} | {_fmt(*r['mean_gap'])} | {_fmt(*r['contrast'])} | "
                     f"{_fmt(*r['mean_abs_gap'])} | {r['ppl_ratio']:.3f} |")
        L.append("")
    if cost:
        L += ["## Cost", "", f"tokens/s at batch {cost['batch']}, {cost['tokens']} tokens, {cost['reps']} rounds; "
              "each round runs the unsteered base (ar or spin) and then the arm, and the added per-token cost is "
              "base/arm - 1 of that round, in wall time and in this process's CPU time (less sensitive to other "
              "jobs on a shared machine); median [range] over rounds; target <= +10%:", "",
              "| arm | tok/s median | tok/s best | tok per CPU-s | added cost, wall | added cost, CPU |",
              "|---|---|---|---|---|---|"]
        pct = lambda o: f"{100 * o['median']:+.1f}% [{100 * o['min']:+.1f}, {100 * o['max']:+.1f}]"
        for k in cost["median"]:
            ov, oc = cost["overhead"].get(k), cost["cpu_overhead"].get(k)
            L.append(f"| {k} | {cost['median'][k]:.1f} | {cost['best'][k]:.1f} | {cost['cpu_median'][k]:.1f} | "
                     + (f"{pct(ov)} | {pct(oc)}" if ov else "– | –") + " |")
        L.append("")
    L += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    L += ["## Sample continuations (seed 0, first 3 prompts)", ""]
    for k, v in list(topics["samples"].items()):
        if "/" + s["topics"][0] in k:
            L.append(f"- **{k}**: " + " | ".join(repr(x) for x in v))
    return "\n".join(L) + "\n"


def resummarize(out: Path) -> dict[str, Any]:
    """Summaries, figures and report of a finished run, from its results.json (no model load)."""
    import types

    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; give the --out folder of a finished bench_steering run")
    results = json.loads(path.read_text())
    info = results["info"]
    b = types.SimpleNamespace(s=info["settings"], out=out, session=types.SimpleNamespace(name=info["model"]["used"]), prompts=NEUTRAL_PROMPTS[: info["settings"]["n_prompts"]],
                              mode="quick" if info["settings"].get("n_prompts", 40) < 40 else "full")
    topics = results["topics"]
    topics["summary"] = summarize_topics(b, topics["rows"])
    figs = figures(b, topics, results.get("bias"))
    report = write_report(b, info, topics, results.get("bias"), results.get("cost"), figs)
    atomic_write_text(out / "report.md", report)
    results.update(topics=topics, figures=figs)
    atomic_write_json(out / "results.json", results)
    print("\n".join(verdict(b, topics) + [""] + verdict(b, topics, "budget")))
    print(f"\n# rewrote {out / 'report.md'} from {path}")
    return results


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
