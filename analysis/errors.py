"""``python -m analysis errors``: where wrong answers come from (docs/analysis.md, "Where wrong answers
come from"; issue 21).

Huo & Johnson's hallucination mechanism: a wrong token wins when the context field N points at
it (the good/bad boundary is the hyperplane normal to N). On the factual prompt sets (good / bad
candidates), with the final norm frozen at the last position (exact for the logit gap), the
model's gap splits into

    dL = logit(good) - logit(bad) = attn + mlp + rest
    attn = sum over heads of the two-body term N_proj(l, h) . (e_good - e_bad)   (dL_theory, in_situ)
    mlp  = sum over layers of fn(MLP output) . (e_good - e_bad)
    rest = dL - attn - mlp   (token + position embeddings, attention output biases, norm biases)

A prompt is *wrong* when dL < 0. Reported per set (main and held-out): the parts on right and
wrong prompts with bootstrap CIs, the share of var(dL) each part carries (cov(part, dL) / var(dL),
the shares sum to 1), how often the attention part / the MLP part points at the wrong token on
wrong prompts, and the antagonist heads (most negative mean push on wrong prompts), ranked on
the main set and replicated on the held-out set.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.gaps import compute_gaps, unembedding_diff
from analysis.loops import boot_ci, wilson
from analysis.report import write_csv
from analysis.repetition_figs import fig_errors
from spindiff.lm.adapter import last_positions
from spindiff.lm.hooks import layer_values, record
from spindiff.lm.tokens import pad_left
from spindiff.runtime import atomic_write_json

PARTS = ("attn", "mlp", "rest")


@torch.no_grad()
def mlp_part(A: Any, tset: Any) -> np.ndarray:
    """Sum over layers of the MLP outputs' direct push on e_good - e_bad at the last position,
    through the final norm frozen there: (P,) float64."""
    ad, bs = A.ad, int(A.cfg.batch_size)
    out = np.empty(len(tset))
    with record(ad, ["blocks.*.mlp.out", "ln_final.in"], last_only=True) as acts:
        for s in range(0, len(tset), bs):
            idx = list(range(s, min(s + bs, len(tset))))
            ids, mask = pad_left([tset.ids[i] for i in idx], A.pad_id)
            A.model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1)
            mlps = layer_values(acts, "mlp.out")  # {layer: (B, D)}
            m = torch.stack([mlps[l] for l in range(ad.n_layers)]).sum(0)  # (B, D)
            scale, center = ad.final_norm_scale(acts["ln_final.in"])
            if center:
                m = m - m.mean(-1, keepdim=True)
            de = unembedding_diff(ad, tset.good_first[idx], tset.bad_first[idx])
            out[idx] = ((m * scale) * de.to(m.dtype)).sum(-1).double().numpy()
    return out


def decompose(A: Any, spec: str) -> dict[str, Any]:
    """dL and its attention / MLP / rest parts for every usable prompt of the set ``spec``."""
    ts = A.tset(spec)
    gt = compute_gaps(A.model, ts, "in_situ", "first_token", True, A.cfg.batch_size, A.ad, A.pad_id,
                      progress=A.cfg.progress)
    v = gt.valid
    heads = gt.flat()[v]  # (P, LH)
    dl = gt.dl_actual[v]
    attn = heads.sum(1)
    mlp = mlp_part(A, ts)[v]
    return {"set": ts.pset.name, "ids": np.nonzero(v)[0], "items": [ts.pset.items[i] for i in np.nonzero(v)[0]],
            "dl": dl, "attn": attn, "mlp": mlp, "rest": dl - attn - mlp, "heads": heads}


def summarize(d: dict[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    """Right vs wrong statistics of one decomposed set."""
    wrong = d["dl"] < 0
    res: dict[str, Any] = {"set": d["set"], "n": int(len(wrong)), "n_wrong": int(wrong.sum()),
                           "accuracy": float(1 - wrong.mean())}
    rng = np.random.default_rng(seed)
    for g, m in (("right", ~wrong), ("wrong", wrong)):
        res[g] = {p: boot_ci(d[p][m], n_boot, seed) for p in PARTS + ("dl",)}
    for p in PARTS:
        a, b = d[p][wrong], d[p][~wrong]
        if len(a) and len(b):
            bs = [a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean()
                  for _ in range(n_boot)]
            res.setdefault("wrong_minus_right", {})[p] = (float(a.mean() - b.mean()), float(np.quantile(bs, 0.025)),
                                                          float(np.quantile(bs, 0.975)))
        k = int((d[p][wrong] < 0).sum())
        res.setdefault("wrong_points_at_bad", {})[p] = {"fraction": k / max(int(wrong.sum()), 1),
                                                        "ci": wilson(k, int(wrong.sum()))}
    P = len(d["dl"])
    idx = rng.integers(0, P, (n_boot, P))
    share = {}
    for p in PARTS:
        f = lambda i: np.cov(d[p][i], d["dl"][i])[0, 1] / np.var(d["dl"][i], ddof=1)  # noqa: E731
        bs = [f(i) for i in idx]
        share[p] = (float(f(np.arange(P))), float(np.quantile(bs, 0.025)), float(np.quantile(bs, 0.975)))
    res["variance_share"] = share
    return res


def antagonists(main: dict[str, Any], held: dict[str, Any] | None, n_heads: int, top: int, n_boot: int,
                seed: int) -> dict[str, Any]:
    """Heads with the most negative mean push (dL_theory) on the main set's wrong prompts, with
    bootstrap CIs, their mean on right prompts and on the held-out set's wrong prompts."""
    w = main["dl"] < 0
    Hw = main["heads"][w]
    mean_w = Hw.mean(0)
    order = np.argsort(mean_w)[:top]
    rng = np.random.default_rng(seed)
    bs = np.stack([Hw[rng.integers(0, len(Hw), len(Hw))].mean(0) for _ in range(n_boot)])
    hw = held["heads"][held["dl"] < 0] if held is not None else None
    rows = []
    for k in order:
        rows.append({"head": f"L{k // n_heads}H{k % n_heads}", "main": float(mean_w[k]),
                     "ci": [float(np.quantile(bs[:, k], 0.025)), float(np.quantile(bs[:, k], 0.975))],
                     "main_right": float(main["heads"][~w][:, k].mean()) if (~w).any() else None,
                     "heldout": float(hw[:, k].mean()) if hw is not None and len(hw) else None,
                     "heldout_ci": list(boot_ci(hw[:, k], n_boot, seed)[1:]) if hw is not None and len(hw) > 1 else None})
    res: dict[str, Any] = {"top": rows}
    if hw is not None and len(hw) > 1:
        res["replicated_negative"] = int(sum(r["heldout"] < 0 for r in rows))
        res["replicated_ci_below_zero"] = int(sum(r["heldout_ci"][1] < 0 for r in rows))
        res["r_head_means_main_vs_heldout"] = float(np.corrcoef(mean_w, hw.mean(0))[0, 1])
        res["n_heldout_wrong"] = int(len(hw))
    return res


def _fmt(e: Any) -> str:
    return f"{e[0]:+.3f} [{e[1]:+.3f}, {e[2]:+.3f}]"


def answers(sums: list[dict[str, Any]], ant: dict[str, Any]) -> dict[str, str]:
    """Plain answers, main set first, held-out set as the replication."""
    out = {}
    for s in sums:
        if s["n_wrong"] == 0:
            out[f"{s['set']}: attention points at the wrong token"] = "not testable: no wrong prompt"
            continue
        wa, wm = s["wrong"]["attn"], s["wrong"]["mlp"]
        fa, fm = s["wrong_points_at_bad"]["attn"], s["wrong_points_at_bad"]["mlp"]
        va = "yes" if wa[2] < 0 else "no" if wa[1] > 0 else "not resolved"
        out[f"{s['set']}: attention points at the wrong token on wrong prompts"] = (
            f"{va}: mean attention part {_fmt(wa)} logits; negative on {fa['fraction']:.0%} of {s['n_wrong']} wrong "
            f"prompts (MLP part {_fmt(wm)}, negative on {fm['fraction']:.0%})")
        d = s.get("wrong_minus_right", {})
        if d:
            carrier = min(d, key=lambda p: d[p][0])
            out[f"{s['set']}: what separates wrong from right"] = (
                f"{carrier} (wrong - right: " + ", ".join(f"{p} {_fmt(d[p])}" for p in PARTS) + "); share of var(dL): "
                + ", ".join(f"{p} {_fmt(s['variance_share'][p])}" for p in PARTS))
    if "replicated_negative" in ant:
        out["antagonist heads replicate"] = (
            f"{ant['replicated_negative']}/{len(ant['top'])} of the main set's top antagonists also push toward the "
            f"wrong token on held-out wrong prompts ({ant['replicated_ci_below_zero']} with the CI below 0); "
            f"r(head means, main vs held-out) = {ant['r_head_means_main_vs_heldout']:+.3f}")
    return out


def step_errors(A: Any) -> dict[str, Any]:
    """Decompose, summarise, write errors.csv, errors.json and fig_errors.png under ``A.out``."""
    c = A.cfg
    t0 = time.perf_counter()
    nb, seed = int(c.n_bootstrap), int(c.seed)
    if c.candidates != "first_token":
        A.note("errors decomposes the first-token logit gap (exact with the frozen final norm); candidates=full "
               "does not apply here")
    main = decompose(A, c.prompts)
    held = decompose(A, c.heldout) if c.heldout and str(c.heldout).lower() != "none" else None
    sets = [main] + ([held] if held is not None else [])
    sums = [summarize(d, nb, seed) for d in sets]
    H = A.ad.n_heads
    ant = antagonists(main, held, H, int(c.top_k), nb, seed)
    rows = []
    for d in sets:
        for j, pid in enumerate(d["ids"]):
            k = int(np.argmin(d["heads"][j]))
            it = d["items"][j]
            rows.append({"set": d["set"], "prompt_id": int(pid), "prompt": it.prompt, "good": it.good, "bad": it.bad,
                         "dl_actual": d["dl"][j], "attn": d["attn"][j], "mlp": d["mlp"][j], "rest": d["rest"][j],
                         "wrong": bool(d["dl"][j] < 0), "top_antagonist": f"L{k // H}H{k % H}",
                         "top_antagonist_push": d["heads"][j, k]})
    write_csv(A.out / "errors.csv", list(rows[0]), rows)
    groups = {f"{s['set']} {g} (n={s['n'] - s['n_wrong'] if g == 'right' else s['n_wrong']})": s[g]
              for s in sums for g in ("right", "wrong") if (s["n_wrong"] if g == "wrong" else s["n"] - s["n_wrong"])}
    A.figures["errors"] = Path(fig_errors(groups, ant["top"], A.out / "fig_errors.png", A.lm.name)).name
    res = {"sets": sums, "antagonists": ant, "answers": answers(sums, ant), "seconds": time.perf_counter() - t0,
           "decomposition": "dL = attn (sum of heads' two-body terms, in_situ) + mlp + rest, final norm frozen"}
    atomic_write_json(A.out / "errors.json", res)
    A.report["errors"] = {"answers": res["answers"], "seconds": res["seconds"]}
    for s in sums:
        print(f"errors: {s['set']}: {s['n_wrong']}/{s['n']} wrong; attention part on wrong prompts "
              f"{_fmt(s['wrong']['attn']) if s['n_wrong'] else 'n/a'}, MLP part "
              f"{_fmt(s['wrong']['mlp']) if s['n_wrong'] else 'n/a'}")
    for k, v in res["answers"].items():
        print(f"errors: {k}: {v}")
    print(f"errors: done in {res['seconds']:.0f} s -> {A.out / 'errors.csv'}")
    return res
