"""Writing results: CSV tables, report.json and a readable report.md that embeds the figures."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from spindiff.runtime import atomic_write_text

# the paper's published numbers (GPT-2 small, protocol=paper, 20 prompts)
PAPER_NUMBERS = {
    "heads": {"L3H5": -0.691, "L0H2": 0.547, "L0H7": 0.542},
    "L3H5_p": 7.38e-4,
    "ablation": {"baseline": -0.85, "L3H5": -0.88, "L0H0": -1.72},
    "temperature": {"entropy_T0.1": 0.2, "entropy_T2.5": 14.0, "p_top1_T0.1": 0.95, "p_top1_T2.5": 0.02},
}


def write_csv(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict[str, Any] | Sequence[Any]]) -> str:
    """Atomic CSV write; rows are dicts (keyed by ``fieldnames``) or sequences in that order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fieldnames)
    for r in rows:
        vals = [r.get(k, "") for k in fieldnames] if isinstance(r, dict) else list(r)
        w.writerow([_fmt(v) for v in vals])
    atomic_write_text(path, buf.getvalue())
    return str(path)


def _fmt(v: Any) -> Any:
    """A CSV cell that reads back with ``float()``: numpy scalars as plain Python numbers (numpy 2's
    repr of np.float64 is ``np.float64(...)``), small numbers in full precision."""
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "nan" if math.isnan(v) else repr(v) if abs(v) < 1e-4 and v != 0 else f"{v:.10g}"
    return v


def fnum(x: Any, nd: int = 3) -> str:
    """Compact number for markdown: 3 significant figures, scientific for small p."""
    if x is None:
        return "n/a"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{nd}f}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def heads_md(records: list[dict[str, Any]]) -> str:
    return md_table(["rank", "head", "r", "95% CI", "p", "q (BH)", "p (FWER)", "role"],
                    [(i + 1, r["name"], fnum(r["r"]), f"[{fnum(r['r_ci_low'], 2)}, {fnum(r['r_ci_high'], 2)}]",
                      fnum(r["p"]), fnum(r["q_bh"]), fnum(r["p_fwer"]), r["role"]) for i, r in enumerate(records)])


def verdict_lines(rep: dict[str, Any]) -> list[str]:
    """Plain statements of what survives multiple-testing control and replication."""
    out = []
    fw, n = rep["family_wise"], rep["n_prompts"]
    top = rep["top_heads"][0] if rep["top_heads"] else None
    if top:
        out.append(f"- Best head **{top['name']}**: r = {fnum(top['r'])} (n = {n} prompts), nominal p = "
                   f"{fnum(top['p'])}, 95% bootstrap CI [{fnum(top['r_ci_low'], 2)}, {fnum(top['r_ci_high'], 2)}].")
    floor = " (the smallest value this many permutations can give)" \
        if fw["p_family"] <= 1.0 / (fw["n_permutations"] + 1) + 1e-12 else ""
    out.append(f"- Family-wise (max-|r| permutation over {fw['n_heads']} heads, {fw['n_permutations']} "
               f"permutations): p = {fnum(fw['p_family'])}{floor}; chance alone gives max |r| >= "
               f"{fnum(fw['threshold_abs_r'])} in {int(round(rep['alpha'] * 100))}% of permutations. "
               + (f"**{len(fw['surviving'])} head(s) survive** family-wise control at {rep['alpha']}: "
                  f"{', '.join(fw['surviving'][:15])}{' ...' if len(fw['surviving']) > 15 else ''}."
                  if fw["surviving"] else "**No head survives family-wise control.**"))
    out.append(f"- Benjamini-Hochberg: {rep['bh']['n_significant']} head(s) with q < {rep['alpha']}.")
    sh = rep.get("split_half") or {}
    if sh:
        out.append(f"- Split-half stability of the top {sh['top_k']}: mean overlap {sh['overlap_mean']:.2f} "
                   f"(chance {sh['overlap_chance']:.2f}); the best head is the same in "
                   f"{100 * sh['top1_same_frac']:.0f}% of splits.")
    rp = rep.get("replication")
    if rp:
        names = [h["name"] for h in rp["heads"] if h["replicated"]]
        out.append(f"- Replication on the held-out set ({rp['n_heldout']} prompts): **{rp['n_replicated']} of the "
                   f"top {rp['top_k']} replicate** (same sign, BH q < {rep['alpha']} over those {rp['top_k']})"
                   + (f": {', '.join(names)}" if names else "")
                   + f". r of all heads, main vs held-out: {fnum(rp['r_across_heads'])}.")
    ps = rep.get("paper_set")
    if ps:
        t = ps["top_heads"][0]
        out.append(f"- On the paper's 20 prompts alone the best head is {t['name']} (r = {fnum(t['r'])}, p = "
                   f"{fnum(t['p'])}) but family-wise p = {fnum(ps['family_wise']['p_family'])} (chance threshold "
                   f"|r| = {fnum(ps['family_wise']['threshold_abs_r'])}); {ps['n_top_replicated']} of its top "
                   f"{len(ps['top_heads'])} heads replicate on '{rep['prompts']['name']}'.")
    sc = rep.get("scan")
    if sc:
        out.append(f"- Causal check ({sc['mode']}-ablation of {sc['n_heads']} heads on {sc['n_prompts']} prompts): "
                   f"r(dL_theory, change in dL_actual) = {fnum(sc['r_theory_effect'])} pooled over (prompt, head); "
                   f"median per prompt across heads {fnum(sc['r_per_prompt_median'])}.")
    return out


def render_markdown(rep: dict[str, Any], figures: dict[str, str]) -> str:
    """report.md from the report dict; ``figures`` maps a key to a PNG file name in the run dir."""
    m = rep["model"]
    lines = [f"# Head analysis: {m['used']} ({rep['protocol']} protocol)", ""]
    if m.get("fallback_reason"):
        lines += [f"> **Model used: {m['used']}**, not the requested '{m['requested']}' "
                  f"({m['fallback_reason']}). Numbers below are for {m['used']}.", ""]
    pr = rep.get("prompts") or {}
    lines += [f"Model: **{m['used']}** ({m['class']}, {m['n_layers']} layers x {m['n_heads']} heads, "
              f"{m['n_kv_heads']} KV heads, d = {m['d_model']}, {m['dtype']}). Protocol `{rep['protocol']}`"
              + (" (through the frozen final norm)" if rep["protocol"] == "in_situ" and rep["final_norm"] else "")
              + f", candidates `{rep['candidates']}`"
              + (f", prompt set '{pr['name']}' (n = {rep['n_prompts']}, {pr['n_rows_single_token']} rows with "
                 "single-token candidates)." if pr else "."), ""]
    if rep.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    if "top_heads" in rep:
        lines += _two_body_lines(rep, figures)
    lines += beyond_lines(rep, figures)
    lines += _stage_lines(rep, figures)
    return "\n".join(lines)


def _figure(figures: dict[str, str], key: str, alt: str) -> list[str]:
    """The markdown lines embedding figure ``key`` (with alt text ``alt``), none when it was not drawn."""
    return [f"![{alt}]({figures[key]})", ""] if key in figures else []


def _two_body_lines(rep: dict[str, Any], figures: dict[str, str]) -> list[str]:
    lines = ["## Verdict", ""]
    lines += verdict_lines(rep)
    lines += ["", f"## Top {len(rep['top_heads'])} heads by |r|", "", heads_md(rep["top_heads"]), ""]
    lines += _figure(figures, "fig1", "Fig. 1")
    lines += _figure(figures, "heatmap", "r heatmap")
    rp = rep.get("replication")
    if rp:
        lines += ["## Replication on the held-out set", "",
                  md_table(["head", "r (main)", "r (held-out)", "p (held-out)", "q (BH, top-k)", "replicated"],
                           [(h["name"], fnum(h["r_main"]), fnum(h["r_heldout"]), fnum(h["p_heldout"]),
                             fnum(h["q_heldout"]), "yes" if h["replicated"] else "no") for h in rp["heads"]]), ""]
    ps = rep.get("paper_set")
    if ps:
        lines += ["## The paper's 20 prompts", "",
                  f"Family-wise p of the best head: {fnum(ps['family_wise']['p_family'])}.", "",
                  md_table(["head", "r (paper set)", "p", "p (FWER)", f"r on '{rep['prompts']['name']}'", "replicated"],
                           [(h["name"], fnum(h["r"]), fnum(h["p"]), fnum(h["p_fwer"]), fnum(h["r_on_main"]),
                             "yes" if h["replicated"] else "no") for h in ps["top_heads"]]), ""]
        mt = ps.get("prompts", {}).get("multi_token") or []
        if mt:
            lines += [f"Multi-token candidates in the paper set ({len(mt)}; first token scored): "
                      + ", ".join(f"#{m['prompt_id']} {m['word']} ({' '.join(m['tokens'])})" for m in mt), ""]
    return lines


def _sections(rep: dict[str, Any], figures: dict[str, str],
              specs: Sequence[tuple[str, str, Callable[[dict[str, Any], dict[str, Any]], list[str]], str, str]]
              ) -> list[str]:
    """For each ``(key, title, body, figure, alt)`` whose stage ran (``rep[key]`` is there):
    ``## title``, a blank line, ``body(rep[key], rep)`` and the figure ``figure`` when it was drawn."""
    lines: list[str] = []
    for key, title, body, fig, alt in specs:
        if rep.get(key):
            lines += [f"## {title}", "", *body(rep[key], rep), *_figure(figures, fig, alt)]
    return lines


def _ablation_body(ab: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    lines = [f"Prompt: '{ab['prompt']}' good '{ab['good']}' vs bad '{ab['bad']}'. Baseline dL_actual = "
             f"{fnum(ab['baseline'])} (paper, GPT-2: {PAPER_NUMBERS['ablation']['baseline']}). Mean-ablation "
             "uses each head's mean z over the analysis prompt set.", "",
             md_table(["ablated", "mode", "dL_actual", "change"],
                      [(r["ablated"], r["mode"], fnum(r["dl_ablated"]), fnum(r["delta"])) for r in ab["rows"]]), ""]
    if ab.get("multi_token"):
        lines += [f"Multi-token candidates in this case (first token scored): {ab['multi_token']}", ""]
    return lines


def _scan_body(sc: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    return [f"{sc['mode']}-ablation of each of {sc['n_heads']} heads alone on {sc['n_prompts']} prompts "
            f"(prompt ids {sc['prompt_ids'][:8]}{'...' if len(sc['prompt_ids']) > 8 else ''}). "
            f"Correlation of dL_theory with the change in dL_actual: pooled r = {fnum(sc['r_theory_effect'])}"
            f" (p = {fnum(sc['p_theory_effect'])}); per prompt across heads, median r = "
            f"{fnum(sc['r_per_prompt_median'])}; per head (means over prompts) r = {fnum(sc['r_head_means'])}. "
            "For zero-ablation the head's direct effect is -dL_theory (in_situ), so a strongly negative r "
            "means the direct logit attribution predicts the causal effect; the rest is mediated by later "
            f"layers. Scan time {sc['seconds']:.1f} s for {sc['gflop_fast']:.0f} GFLOP "
            f"({sc['gflop_per_s']:.1f} GFLOP/s; one full forward per head would be {sc['gflop_full']:.0f} GFLOP).",
            "", "Largest causal effects (mean |change| over prompts):", "",
            md_table(["head", "mean change", "mean abs change", "mean dL_theory"],
                     [(h["name"], fnum(h["mean_effect"]), fnum(h["mean_abs_effect"]), fnum(h["mean_theory"]))
                      for h in sc["top_causal"]]), ""]


def _landscape_body(lc: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    return [f"{lc['head']} on prompt #{lc['prompt_id']} '{lc['prompt']}': N0.(S_good - S_bad) = "
            f"{fnum(lc['dl_theory'])} (S_A = W_O[h] @ e_A, paper Eq. 5).", ""]


def _temperature_body(tp: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    return [f"One forward pass per prompt, logits rescaled. Mean entropy {fnum(tp['entropy_bits_at_tmin'], 2)} bits "
            f"at T = {tp['t_min']} -> {fnum(tp['entropy_bits_at_tmax'], 2)} bits at T = {tp['t_max']}; "
            f"P(top-1) {fnum(tp['p_top1_at_tmin'], 3)} -> {fnum(tp['p_top1_at_tmax'], 3)} (paper, GPT-2: "
            "~0.2 -> ~14 bits, 0.95 -> 0.02).", ""]


STAGE_SECTIONS = (("ablation", "Causal ablation (Fig. 4 case)", _ablation_body, "fig4", "Fig. 4"),
                  ("scan", "Full ablation scan: does dL_theory predict the causal effect?", _scan_body, "causal",
                   "causal check"),
                  ("landscape", "Decision landscape (Fig. 2)", _landscape_body, "fig2", "Fig. 2"),
                  ("temperature", "Temperature sweep (Fig. 3)", _temperature_body, "fig3", "Fig. 3"))


def _stage_lines(rep: dict[str, Any], figures: dict[str, str]) -> list[str]:
    lines = _sections(rep, figures, STAGE_SECTIONS)
    pr = rep.get("prompts") or {}
    if pr.get("multi_token"):
        lines += ["## Multi-token candidates", "",
                  f"{len(pr['multi_token'])} candidate word(s) are several tokens; under `first_token` only the "
                  "first is scored (the paper's rule):", "",
                  md_table(["prompt_id", "which", "word", "tokens"],
                           [(r["prompt_id"], r["which"], r["word"], " ".join(r["tokens"])) for r in pr["multi_token"]]),
                  ""]
    if pr.get("shared_first"):
        lines += [f"Prompt ids {pr['shared_first']}: good and bad share their first token; excluded from the "
                  "statistics.", ""]
    lines += ["## Files", "", "gaps.csv (prompt_id, layer, head, dl_theory, dl_actual), heads.csv (all heads), "
              "ablation.csv, scan.csv, temperature.csv, paths.csv, attribution.csv, predictors.csv, pairs.csv (those "
              "of the stages that ran), report.json, config.yaml, run.json.", "",
              "Run time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rep.get("timings_s", {}).items()) + ".", "",
              f"Seeds: {rep['seeds']}. Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()
                                                               if k in ("torch", "transformers", "numpy", "scipy")),
              ""]
    return lines


def _ci(v: list[float]) -> str:
    return f"[{v[0]:.2f}, {v[1]:.2f}]"


def _beyond_body(by: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    lines = [f"Every one of {by['n_heads']} heads ablated alone on {by['n_prompts']} prompts (exact scan, the "
             "ground truth) against predictors that cost one forward + one backward per batch. r: Pearson r "
             "pooled over (prompt, head) and across the heads' means over prompts, 95% bootstrap CIs over "
             "prompts; recall: of the 10 heads with the largest mean |effect|, how many the predictor ranks in "
             "its top 10 (head means / per prompt); explained: 1 - SSE/SST of effect = prediction (no fit).",
             "", f"**Does adding three-body terms substantially improve the correlation?** {by['answer']}", ""]
    for mode, mo in by["modes"].items():
        lines += [f"### {mode}-ablation (exact scan {mo['exact_seconds']:.1f} s)", "",
                  md_table(["predictor", "r pooled", "95% CI", "r head means", "95% CI", "median r per prompt",
                            "top-10 recall", "slope", "explained", "cost (s)", "speed-up"],
                           [(r["label"], fnum(r["r"]), _ci(r["r_ci"]), fnum(r["r_means"]), _ci(r["r_means_ci"]),
                             fnum(r["r_per_prompt_median"]), f"{r['recall10']:.1f} / {r['recall10_per_prompt']:.2f}",
                             fnum(r["slope"]), fnum(r["explained"]), f"{r['seconds']:.2f}", f"{r['speedup']:.0f}x")
                            for r in mo["predictors"].values()]), "",
                  "Steps of the hierarchy (change in pooled r, paired bootstrap 95% CI): " + "; ".join(
                      f"{k}: {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" for k, d in mo["steps"].items())
                  + "." + (f" AtP without the heads of layers 0-1: r = {mo['atp_r_without_layers_0_1']:.3f}."
                           if mo.get("atp_r_without_layers_0_1") is not None else ""), ""]
    return lines


def _paths_body(pa: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    modes = [m for m in ("zero", "mean") if m in pa]
    return ["Mean |term| over (prompt, head): " + "; ".join(
                f"{m}: " + ", ".join(f"{k} {fnum(v)}" for k, v in pa[m]["mean_abs"].items()) for m in modes)
            + ". direct + via_heads + via_mlps = total (first order, = AtP) to "
            + fnum(max(pa[m]["max_abs_sum_error"] for m in modes)) + ".", ""]


def _pairs_body(pr: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    return [f"Top {len(pr['heads'])} heads by exact zero-ablation effect ({', '.join(pr['heads'])}); every pair "
            f"ablated jointly on {pr['n_prompts']} prompts. {pr['rule']}. {pr['cooperative']} cooperative, "
            f"{pr['antagonistic']} antagonistic, {pr['additive']} additive of {pr['n_pairs']} pairs; mean |I| "
            f"{fnum(pr['mean_abs_interaction'])} vs mean |single effect| {fnum(pr['mean_abs_single'])}.", "",
            md_table(["pair", "e(a)", "e(b)", "e(ab)", "I", "sd", "q (BH)", "role"],
                     [(f"{r['head_a']}+{r['head_b']}", fnum(r["effect_a"]), fnum(r["effect_b"]),
                       fnum(r["effect_ab"]), fnum(r["interaction"]), fnum(r["interaction_sd"]),
                       fnum(r["q_bh"]), r["role"]) for r in pr["top"]]), ""]


BEYOND_SECTIONS = (("beyond", "Beyond the two-body term: which predictor explains the causal effect?", _beyond_body,
                    "predictors", "predicted vs exact"),
                   ("paths", "First-order path decomposition", _paths_body, "paths", "paths"),
                   ("pairs", "Head-pair interactions", _pairs_body, "pairs", "pair interactions"))


def beyond_lines(rep: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Sections of the stages beyond the two-body term (analysis.beyond), those that ran."""
    return _sections(rep, figures, BEYOND_SECTIONS)
