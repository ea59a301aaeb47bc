"""The report of bench/bench_generation.py: its tables (markdown), the TV-vs-steps figure and the
number format. ``b`` is that script's ``Bench`` (settings ``b.s``, prompts, output folder ``b.out``)."""
from __future__ import annotations

import math
from typing import Any, Optional

from spindiff.evaluation.evaluate import EvalResult
from spindiff.runtime import atomic_savefig, atomic_write_text

KEYS = (("fidelity/tv", "TV"), ("fidelity/kl", "KL"), ("fidelity/top1_agreement", "top-1"),
        ("fidelity/logprob", "draw log p"), ("fidelity/logprob_excess", "log p - E log p"), ("gen/perplexity", "PPL"), ("gen/distinct_2", "distinct-2"),
        ("gen/self_bleu", "self-BLEU"))


def _fmt(m: float, c: float = float("nan"), digits: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "n/a"
    s = f"{m:.{digits}g}" if abs(m) >= 1000 else f"{m:.{digits}f}"
    return s if not math.isfinite(c) else f"{s} ± {c:.{digits}f}"


def cold_bias_lines(res: dict[str, Any]) -> list[str]:
    lines = ["| arm | draw log p - E_p[log p] | TV | top-1 |", "|---|---|---|---|"]
    for k, r in res["rows"].items():
        lines.append(f"| {k} | {_fmt(r.mean['fidelity/logprob_excess'], r.ci['fidelity/logprob_excess'])} | "
                     f"{_fmt(r.mean['fidelity/tv'], r.ci['fidelity/tv'])} | "
                     f"{_fmt(r.mean['fidelity/top1_agreement'], r.ci['fidelity/top1_agreement'])} |")
    if res["throughput"]:
        lines += ["", "Throughput (tokens/s, median of rounds, side by side):", ""] + throughput_lines(res["throughput"])
    return lines


# --------------------------------------------------------------------------- report
def tv_figure(b: Any, oracle: dict[str, Any], curves: dict[str, dict[int, float]], floor: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for grid, by_method in oracle["tv"].items():
        for method, tv in by_method.items():
            axes[0].plot(list(tv), list(tv.values()), marker="o", ls="-" if grid == "uniform" else "--",
                         label=f"{method.replace('geodesic_', '')}, {grid}")
    for name, tv in curves.items():
        axes[1].plot(list(tv), list(tv.values()), marker="o", label=name)
    for ax, title in zip(axes, ("oracle prior: integrator x grid", "oracle vs learned (shipped settings)")):
        ax.axhline(floor, color="k", lw=1, ls=":", label="ar (finite-sample floor)")
        ax.set_xscale("log")
        ax.set_xlabel("SDE steps per token")
        ax.set_ylabel("next-token TV vs the LM")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = b.out / "tv_vs_steps.png"
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path.name


def _row(name: str, r: EvalResult, ar: EvalResult, oracle: EvalResult) -> str:
    cells = [_fmt(r.mean.get(k, float("nan")), r.ci.get(k, float("nan"))) for k, _ in KEYS]
    d_ar = r.mean["fidelity/tv"] - ar.mean["fidelity/tv"]
    d_or = r.mean["fidelity/tv"] - oracle.mean["fidelity/tv"]
    ppl = r.mean.get("gen/perplexity", float("nan")) / ar.mean.get("gen/perplexity", float("nan"))
    return f"| {name} | " + " | ".join(cells) + f" | {d_ar:+.3f} | {d_or:+.3f} | {_fmt(ppl, digits=2)} |"


def write_report(b: Any, info: dict[str, Any], oracle: dict[str, Any], arms: dict[str, EvalResult],
                 curves: dict[str, dict[int, float]], tp: Optional[dict[str, Any]], fig: str) -> str:
    ar, orc = arms["ar"], arms["oracle"]
    lines = [f"# Generation benchmark ({b.mode})", "",
             f"Model {info['model']}; {len(b.fid_prompts)} held-out prompts x {b.s['n_draws']} draws for fidelity, "
             f"{len(b.gen_prompts)} prompts x {b.s['max_new_tokens']} tokens for continuations; seeds {b.s['seeds']}; "
             f"mean ± 95% CI over seeds. Shipped sampler: {oracle['default'][0]} steps of {oracle['default'][1]} on the "
             f"{oracle['default'][2]} grid. Load average {info['loadavg']}; {info['wall_min']:.1f} min.", "",
             "## Oracle prior (the LM's own logits): TV by integrator, grid and steps", "",
             "| grid | integrator | " + " | ".join(str(n) for n in b.s["oracle_steps"]) + " |",
             "|---|---|" + "---|" * len(b.s["oracle_steps"])]
    for grid, by_method in oracle["tv"].items():
        for method, tv in by_method.items():
            lines.append(f"| {grid} | {method} | " + " | ".join(f"{tv[n]:.3f}" for n in b.s["oracle_steps"]) + " |")
    lines += ["", f"ar (direct draws from the LM, the finite-sample floor): TV {_fmt(ar.mean['fidelity/tv'], ar.ci['fidelity/tv'])}",
              "", "Decoding at the shipped settings: " + "; ".join(
                  f"{k}: TV {_fmt(v.mean['fidelity/tv'], v.ci['fidelity/tv'])}" for k, v in oracle["decode"].items()),
              "", f"![TV vs steps]({fig})", "", "## Arms at the shipped sampler settings", "",
              "| arm | " + " | ".join(n for _, n in KEYS) + " | TV - ar | TV - oracle | PPL / ar |",
              "|---|" + "---|" * (len(KEYS) + 3)]
    lines += [_row(k, r, ar, orc) for k, r in arms.items()]
    lines += ["", "## Steps (TV)", "", "| arm | " + " | ".join(str(n) for n in b.s["curve_steps"]) + " |",
              "|---|" + "---|" * len(b.s["curve_steps"])]
    lines += [f"| {k} | " + " | ".join(f"{v[n]:.3f}" for n in b.s["curve_steps"]) + " |" for k, v in curves.items()]
    if tp:
        lines += ["", "## Throughput (tokens/s, median of rounds, side by side)", ""] + throughput_lines(tp)
    lines += ["", "## Distances from the limits", ""]
    for k, r in arms.items():
        if k in ("ar", "oracle"):
            continue
        lines.append(f"- {k}: TV {r.mean['fidelity/tv'] - orc.mean['fidelity/tv']:+.3f} from the oracle, "
                     f"{r.mean['fidelity/tv'] - ar.mean['fidelity/tv']:+.3f} from ar.")
    lines += ["", f"Oracle vs ar: TV {orc.mean['fidelity/tv'] - ar.mean['fidelity/tv']:+.3f} (95% CIs "
              f"± {orc.ci['fidelity/tv']:.3f} / ± {ar.ci['fidelity/tv']:.3f}).", ""]
    text = "\n".join(lines) + "\n"
    atomic_write_text(b.out / "report.md", text)
    return text


def throughput_lines(tp: dict[str, Any]) -> list[str]:
    """The throughput table (median tokens/s at batch 1 / 8 / 32) and its ratios, as report lines."""
    lines = ["| arm | batch 1 | batch 8 | batch 32 |", "|---|---|---|---|"]
    lines += [f"| {k} | {tp['batch1'][k]['median']:.1f} | {tp['batch8'][k]['median']:.1f} | "
              f"{tp['batch32'][k]['median']:.1f} |" for k in tp["batch1"]]
    return lines + [""] + [f"- {k}: {v:.2f}" for k, v in tp["ratios"].items()]
