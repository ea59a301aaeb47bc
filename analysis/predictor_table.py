"""The predictors past attribution patching on a prompt set, each timed, and the metrics the
predictor table adds to :func:`analysis.compare.compare_predictors` (Spearman, top-20 recall).

Rows (``beyond.*`` keys, :class:`analysis.predictors.BeyondConfig`), every one for zero- and
mean-ablation of every scan head on every prompt:

- ``ig``: integrated gradients, all heads interpolated jointly (EAP-IG style), ``ig_steps`` passes;
- ``ig_layer``: IG with each of the first ``ig_layers`` layers' heads interpolated together
  (one group per layer), AtP for the rest;
- ``ig_head``: per-head IG (each head along its own path: the exact target's line integral)
  for those layers, AtP for the rest (``ig_head=true``; ``ig_steps`` passes per head);
- ``relp``: relevance patching (LRP rules, :mod:`analysis.predictors`);
- ``lookahead``: the first ``lookahead_layers`` layers' heads run exactly through the next
  ``lookahead_k`` layers, then linearised (:mod:`analysis.lookahead`), AtP for the rest.

Costs count every pass a row needs (its own forward + backward, shared work counted fully).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.stats import rankdata
from torch import Tensor, nn

from analysis.ablation import ablation_scan
from analysis.compare import compare_predictors, recall_at, strip_boot
from analysis.figures import _save, plt
from analysis.lookahead import lookahead, residual_trace, unembed_rows
from analysis.predictors import BeyondConfig, ig_attribution, make_groups, relp
from analysis.prompts import TokenizedSet
from analysis.stats import pearson_many
from spindiff.lm.adapter import ArchitectureAdapter, HeadList
from spindiff.lm.tokens import pad_left

LABELS = {
    "ig": "IG, all heads interpolated jointly (EAP-IG style)",
    "ig_layer": "IG per early layer (its heads jointly) + AtP for the rest",
    "ig_head": "IG per early head (its own path: the exact line integral) + AtP for the rest",
    "relp": "RelP (LRP rules: frozen norm scale and attention, identity / half rule in MLPs)",
    "lookahead": "lookahead: early heads exact through the next k layers, then linear; AtP for the rest",
}


def names(bc: BeyondConfig) -> list[str]:
    """The rows ``bc`` switches on."""
    out = ["ig"]
    if bc.ig_layers > 0:
        out.append("ig_layer")
        if bc.ig_head:
            out.append("ig_head")
    if bc.relp:
        out.append("relp")
    if bc.lookahead_k > 0 and bc.lookahead_layers > 0:
        out.append("lookahead")
    return out


def label(name: str, bc: BeyondConfig) -> str:
    """The row's label with its settings."""
    ig = f"IG ({bc.ig_steps} steps, {bc.ig_rule} rule)"
    early = f"layers 0-{bc.ig_layers - 1}"
    return {"ig": f"{ig}, all heads interpolated jointly (EAP-IG style)",
            "ig_layer": f"{ig} per layer for {early} (a layer's heads jointly), AtP for the rest",
            "ig_head": f"{ig} per head for {early} (its own path: the exact line integral), AtP for the rest",
            "relp": LABELS["relp"],
            "lookahead": f"lookahead: heads of layers < {bc.lookahead_layers} exact through the next "
                         f"{bc.lookahead_k} layers, then linear; AtP for the rest"}[name]


def _fill(a: np.ndarray, base: np.ndarray) -> np.ndarray:
    out = a.copy()
    m = np.isnan(out)
    out[m] = base[m]
    return out


def compute(model: nn.Module, ad: ArchitectureAdapter, ts: TokenizedSet, heads: HeadList, mode: str,
            mean_z: dict[int, Tensor] | None, pad_id: int, batch_size: int,
            bc: BeyondConfig) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (prediction (P, K) over ``heads``, seconds for all P prompts) for :func:`names`,
    plus ``atp`` (from the same trace) for reference."""
    H = ad.n_heads
    cols = np.array([l * H + h for l, h in heads])
    rows = ["atp"] + names(bc)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in rows}
    secs = dict.fromkeys(rows, 0.0)
    early_la = [(l, h) for l in range(min(bc.lookahead_layers, ad.n_layers)) for h in range(H)]
    ig_layers = range(min(bc.ig_layers, ad.n_layers))
    for i in range(0, len(ts), batch_size):
        sub = ts.subset(range(i, min(i + batch_size, len(ts))))
        ids, mask = pad_left(sub.ids, pad_id)
        g, b = sub.good_first, sub.bad_first
        t0 = time.perf_counter()
        tr = residual_trace(model, ad, ids, mask, g, b)
        dz = [(-tr.z[l] if mode == "zero" else mean_z[l].to(tr.z[l]) - tr.z[l]) for l in range(ad.n_layers)]
        atp = np.stack([(tr.g_z[l] * dz[l]).sum((1, 3)).double().numpy() for l in range(ad.n_layers)], 1)
        t_trace = time.perf_counter() - t0
        parts["atp"].append(atp)
        secs["atp"] += t_trace
        for name in rows[1:]:
            t0 = time.perf_counter()
            if name == "ig":
                pred = ig_attribution(model, ad, ids, mask, g, b, make_groups(ad, "joint"), bc.ig_steps, mode, mean_z,
                                      bc.ig_rule, max_rows=bc.max_rows).attribution
                extra = 0.0
            elif name in ("ig_layer", "ig_head"):
                grouping = "layer" if name == "ig_layer" else "head"
                pred = _fill(ig_attribution(model, ad, ids, mask, g, b, make_groups(ad, grouping, ig_layers),
                                            bc.ig_steps, mode, mean_z, bc.ig_rule, max_rows=bc.max_rows).attribution,
                             atp)
                extra = t_trace  # AtP for the rest
            elif name == "relp":
                pred = relp(model, ad, ids, mask, g, b, mode, mean_z)
                extra = 0.0
            else:
                la = lookahead(ad, tr, early_la, bc.lookahead_k, unembed_rows(model, ad, g, b), mode, mean_z,
                               bc.max_rows)
                pred = atp.copy()
                for j, (l, h) in enumerate(early_la):
                    pred[:, l, h] = la[:, j]
                extra = t_trace
            secs[name] += time.perf_counter() - t0 + extra
            parts[name].append(pred)
    return {k: (np.concatenate(v).reshape(len(ts), -1)[:, cols], secs[k]) for k, v in parts.items()}


def _spearman_boot(pred: np.ndarray, eff: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pooled Spearman rho of prompt-resampled stacks: idx (n_boot, P) -> (n_boot,)."""
    pb = pred[idx].reshape(idx.shape[0], -1)
    eb = eff[idx].reshape(idx.shape[0], -1)
    rp = np.apply_along_axis(rankdata, 1, pb)
    re = np.apply_along_axis(rankdata, 1, eb)
    return pearson_many(rp[:, :, None], re)[:, 0]


def extra_metrics(pred: np.ndarray, eff: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  ci: float = 0.95) -> dict[str, Any]:
    """Spearman rho pooled over (prompt, head) with a prompt-bootstrap CI, Spearman of the head
    means, and top-20 recall (head means / per prompt) of ``pred`` (P, K) against ``eff``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, eff.shape[0], size=(min(n_boot, 400), eff.shape[0]))
    rho = float(pearson_many(rankdata(pred.ravel())[:, None], rankdata(eff.ravel()))[0])
    boot = _spearman_boot(pred, eff, idx)
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    rho_means = float(pearson_many(rankdata(pred.mean(0))[:, None], rankdata(eff.mean(0)))[0])
    r20, r20p = recall_at(pred, eff, 20)
    return {"spearman": rho, "spearman_ci": [float(np.percentile(boot, lo)), float(np.percentile(boot, hi))],
            "spearman_means": rho_means, "recall20": r20, "recall20_per_prompt": r20p}


CSV_COLUMNS = ["mode", "predictor", "label", "r", "r_ci_low", "r_ci_high", "r_means", "r_means_ci_low",
               "r_means_ci_high", "r_per_prompt_median", "spearman", "spearman_ci_low", "spearman_ci_high",
               "spearman_means", "recall10", "recall10_per_prompt", "recall20", "recall20_per_prompt", "slope",
               "explained", "seconds", "speedup"]


def csv_rows(modes: dict[str, Any]) -> list[list[Any]]:
    """Rows of ``predictors.csv`` (:data:`CSV_COLUMNS`) from ``{mode: {"predictors": records}}``."""
    return [[m, k, r["label"], r["r"], *r["r_ci"], r["r_means"], *r["r_means_ci"], r["r_per_prompt_median"],
             r["spearman"], *r["spearman_ci"], r["spearman_means"], r["recall10"], r["recall10_per_prompt"],
             r["recall20"], r["recall20_per_prompt"], r["slope"], r["explained"], r["seconds"], r["speedup"]]
            for m, mo in modes.items() for k, r in mo["predictors"].items()]


def prompt_set_table(A: Any, spec: str, bc: BeyondConfig) -> dict[str, Any]:
    """The table on another prompt set ``spec`` (``scan_prompts`` evenly spaced usable rows, the
    scan heads): its own exact scans (timed) against AtP and the rows of :func:`names`."""
    from analysis.pipeline import _evenly

    c = A.cfg
    gt = A.gaps(spec)
    ids = [i for i in _evenly(len(A.tset(spec)), c.scan_prompts) if gt.valid[i]]
    ts, heads = A.tset(spec).subset(ids), A.scan_heads()
    out: dict[str, Any] = {"prompts": spec, "n_prompts": len(ids), "prompt_ids": ids, "modes": {}}
    use_cal = bool(bc.calibration) and str(bc.calibration).lower() != "none"
    for m in ("zero", "mean"):
        mz = A.mean_z() if m == "mean" else None
        t0 = time.perf_counter()
        exact = ablation_scan(A.model, A.ad, ts, heads, m, mz, A.pad_id, c.batch_size, progress=False).effect
        t_exact = time.perf_counter() - t0
        res = compute(A.model, A.ad, ts, heads, m, mz, A.pad_id, c.batch_size, bc)
        labels = {}
        if use_cal:  # calibrated AtP (analysis/calibrated.py; its calibration prompts are never these)
            from analysis.calibrated import rows as calibrated_rows

            for k, (p, sec, lab) in calibrated_rows(A, bc, spec, ids, m).items():
                res[k], labels[k] = (p, sec), lab
        rec = compare_predictors({k: v[0] for k, v in res.items()}, exact, c.n_bootstrap, c.seed)
        for k, r in rec.items():
            r.update(extra_metrics(res[k][0], exact, c.n_bootstrap, c.seed), seconds=res[k][1],
                     speedup=t_exact / max(res[k][1], 1e-12),
                     label="AtP (1 forward + 1 backward)" if k == "atp" else labels.get(k) or label(k, bc))
        out["modes"][m] = {"predictors": strip_boot(rec), "exact_seconds": t_exact}
    return out


def fig_table(modes: dict[str, Any], path: Any, title: str = "") -> str:
    """Pooled r (95% CI) against the speed-up over the exact scan, one point per predictor, one
    panel per ablation mode (dashed: r = 0.95 and 20x)."""
    fig, axes = plt.subplots(1, len(modes), figsize=(5.4 * len(modes), 4.0), squeeze=False)
    for ax, (m, mo) in zip(axes[0], modes.items()):
        for k, r in mo["predictors"].items():
            x = max(r["speedup"], 1e-3)
            ax.errorbar([x], [r["r"]], yerr=[[r["r"] - r["r_ci"][0]], [r["r_ci"][1] - r["r"]]], fmt="o", ms=4,
                        capsize=2)
            ax.annotate(k, (x, r["r"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(0.95, color="k", ls="--", lw=0.6)
        ax.axvline(20, color="k", ls="--", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over the exact scan (same run)", fontsize=8)
        ax.set_ylabel("r pooled with the exact effect", fontsize=8)
        ax.set_title(f"{m}-ablation", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}: predictors of single-head ablation, accuracy vs cost", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
