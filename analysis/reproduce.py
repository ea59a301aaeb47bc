"""``python -m analysis reproduce``: the paper's GPT-2 table under ``protocol=paper`` next to the
corrected protocols ``paper_fixed`` and ``in_situ``, and the Fig. 4 ablation (``ablate`` heads on
``ablation_prompt``; the config's defaults are the paper's case), on the paper's 20 prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analysis.ablation import ablation_table
from analysis.figures import fig_heatmap
from analysis.gaps import PROTOCOLS
from analysis.pipeline import Analysis, _jsonable
from analysis.prompts import from_triples, tokenize_set
from analysis.report import PAPER_NUMBERS, fnum, md_table, write_csv
from analysis.stats import HeadStats
from spindiff.lm.adapter import HeadSpecError
from spindiff.runtime import atomic_write_json, atomic_write_text


PAPER_HEADS = tuple(PAPER_NUMBERS["heads"])  # the heads the paper reports r for
# the paper's Fig. 4 case (its published numbers are shown next to ours only for this prompt)
PAPER_FIG4 = ("Lions are carnivores. Cows are", "herbivores", "omnivores")


def cmd_reproduce(A: Analysis) -> dict[str, Any]:
    """The paper's table under protocol=paper and the corrected protocols side by side."""
    c = A.cfg
    spec = "paper"
    out_stats: dict[str, HeadStats] = {}
    for proto in PROTOCOLS:
        A.gaps(spec, proto)
        out_stats[proto] = A.stats(spec, proto)
    A.report.update(A._header())
    A.report["prompts"] = A.prompts_info(spec)
    known = {}
    rows = []
    for name in PAPER_HEADS:
        try:
            l, h = A.one_head(name)
        except HeadSpecError as e:
            known[name] = str(e)
            continue
        row = {"head": name, "paper_r": PAPER_NUMBERS["heads"][name]}
        for proto, st in out_stats.items():
            k = st.index_of(l, h)
            row[f"r_{proto}"] = float(st.r[k]) if k is not None else float("nan")
            row[f"p_{proto}"] = float(st.p[k]) if k is not None else float("nan")
            row[f"rank_{proto}"] = int(np.nonzero(st.order == k)[0][0]) + 1 if k is not None else -1
        rows.append(row)
    tops = {proto: st.ranked(5) for proto, st in out_stats.items()}
    fw = {proto: {"p_family": st.perm.p_family, "threshold_abs_r": st.perm.threshold(c.alpha),
                  "surviving": [st.name(int(k)) for k in st.order if st.p_fwer[k] < c.alpha]}
          for proto, st in out_stats.items()}
    for proto, st in out_stats.items():
        rmap = np.full((A.ad.n_layers, A.ad.n_heads), np.nan)
        rmap[st.layer, st.head] = st.r
        A.figures[f"heatmap_{proto}"] = Path(fig_heatmap(
            rmap, A.out / f"fig_heatmap_r_{proto}.png", f"{A.lm.name} [{proto}] r over {st.n} paper prompts",
            [(int(st.layer[k]), int(st.head[k])) for k in st.order[:5]])).name
    abl = None
    try:
        heads = A.ad.parse_heads(c.ablate)
    except HeadSpecError as e:
        known["ablation"] = str(e)
    else:
        pset = from_triples([(c.ablation_prompt, c.ablation_good, c.ablation_bad)], name="fig4")
        ts = tokenize_set(A.tok, pset, A.window, c.add_bos, "first_token", warn=False)
        abl = ablation_table(A.model, A.ad, ts, heads, ("zero",), None, A.pad_id)
    # one table, printed and written
    cols = ["head", "paper_r"] + [f"{k}_{p}" for p in PROTOCOLS for k in ("r", "p", "rank")]
    write_csv(A.out / "reproduce.csv", cols, rows)
    if abl:
        write_csv(A.out / "ablation.csv", ["prompt_id", "mode", "ablated", "dl_base", "dl_ablated", "delta"], abl)
    A.report.update({"reproduce": {"paper_heads": rows, "top5": tops, "family_wise": fw, "not_in_model": known,
                                   "ablation_fig4": abl, "paper_numbers": PAPER_NUMBERS},
                     "heads_ranked": [{"layer": int(out_stats[c.protocol].layer[k]),
                                       "head": int(out_stats[c.protocol].head[k]),
                                       "r": float(out_stats[c.protocol].r[k])} for k in out_stats[c.protocol].order]})
    md = _reproduce_md(A, rows, tops, fw, abl, known)
    A.report["timings_s"] = {k: round(v, 3) for k, v in A.timings.items()}
    atomic_write_json(A.out / "report.json", _jsonable(A.report))
    atomic_write_text(A.out / "report.md", md)
    print(md)
    return {"stats": out_stats, "rows": rows, "ablation": abl, "report": A.report}


def _reproduce_md(A: Analysis, rows, tops, fw, abl, known) -> str:
    m = A.lm.info
    lines = [f"# Reproduction of the paper's GPT-2 numbers: model used = **{m['used']}**", ""]
    if m["used"] != "gpt2" and not str(m["used"]).startswith("gpt2"):
        lines += [f"> The paper's numbers are for GPT-2 small; this run used **{m['used']}** "
                  f"(requested '{m['requested']}'{'; ' + m['fallback_reason'] if m.get('fallback_reason') else ''}). "
                  "Head indices do not correspond across models.", ""]
    lines += ["Prompt set: the paper's 20 prompts with the reference code's 'twenty' variant; candidates = first "
              "token of ' ' + word; no BOS.", "",
              "## Paper heads, r over the 20 prompts", "",
              md_table(["head", "paper (GPT-2)"] + [f"r [{p}]" for p in PROTOCOLS] + [f"rank [{p}]" for p in PROTOCOLS],
                       [[r["head"], fnum(r["paper_r"])] + [fnum(r[f"r_{p}"]) for p in PROTOCOLS]
                        + [r[f"rank_{p}"] for p in PROTOCOLS] for r in rows]), ""]
    for k, v in known.items():
        lines += [f"- {k}: {v}"]
    lines += ["", "## Top 5 heads by |r| per protocol", "",
              md_table(["rank"] + list(PROTOCOLS),
                       [[i + 1] + [f"{tops[p][i]['name']} ({fnum(tops[p][i]['r'])}, p={fnum(tops[p][i]['p'])})"
                                   if i < len(tops[p]) else "" for p in PROTOCOLS] for i in range(5)]), "",
              md_table(["", *PROTOCOLS],
                       [["family-wise p (max abs r permutation)"] + [fnum(fw[p]["p_family"]) for p in PROTOCOLS],
                        ["abs r needed to survive"] + [fnum(fw[p]["threshold_abs_r"]) for p in PROTOCOLS],
                        ["heads surviving"] + [", ".join(fw[p]["surviving"]) or "none" for p in PROTOCOLS]]), ""]
    if abl:
        c = A.cfg
        pn = PAPER_NUMBERS["ablation"] if (c.ablation_prompt, c.ablation_good, c.ablation_bad) == PAPER_FIG4 else {}
        base = abl[0]["dl_base"]
        vals = {r["ablated"]: r["dl_ablated"] for r in abl}
        lines += [f"## Fig. 4: '{c.ablation_prompt}' {c.ablation_good} vs {c.ablation_bad} (zero-ablation)", "",
                  md_table(["", "paper (GPT-2)", m["used"]],
                           [["baseline dL", pn.get("baseline", "n/a"), fnum(base)]]
                           + [[f"{name} ablated", pn.get(name, "n/a"), fnum(v)] for name, v in vals.items()]), ""]
    for p in PROTOCOLS:
        lines += [f"![r heatmap {p}]({A.figures[f'heatmap_{p}']})", ""]
    return "\n".join(lines)
