"""Data, summaries, figures and report of bench/bench_steering.py (split from it: the numbers
in, markdown and PNGs out; ``--resummarize DIR`` rebuilds them from DIR/results.json with no model).

``b`` below is that script's ``Bench`` or, from :func:`resummarize`, a namespace with the same
``s`` (settings), ``out``, ``session.name``, ``prompts`` and ``mode``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spindiff.evaluation.metrics import mean_ci
from spindiff.runtime import atomic_write_json, atomic_write_text

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

METHOD_NAMES = {"ar+bias": "ar + logit bias (weighted decoding)", "ar+actadd": "ar + activation addition",
                "ar+heads": "ar + head gains", "spin+prior": "spin, field in the prior logits",
                "spin+dyn": "spin, field in the SDE drift (damping)",
                "spin+dyn+prec": "spin, field in the SDE drift (damping + precession)"}


def _ci(vals: Sequence[float]) -> tuple[float, float]:
    return mean_ci([float(v) for v in vals])


def _fmt(m: float, c: float = float("nan"), d: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "–"
    return f"{m:.{d}g}" + (f" ± {c:.2g}" if math.isfinite(c) else "")



# --------------------------------------------------------------------------- summaries
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


def summarize_topics(b: Any, rows: list[dict]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- figures and report
def figures(b: Any, topics: dict[str, Any], bias: Optional[dict[str, Any]]) -> list[str]:
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


def verdict(b: Any, topics: dict[str, Any], section: str = "matched") -> list[str]:
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


def write_report(b: Any, info: dict, topics: dict, bias: Optional[dict], cost: Optional[dict], figs: list[str]) -> str:
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
