"""Figures (matplotlib, Agg backend, PNG): Fig. 1 scatter, r heatmap, Fig. 2 landscape,
Fig. 3 order parameters vs T, Fig. 4 ablation bars, and the causal-check scatter."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.landscape import Landscape  # noqa: E402
from analysis.temperature import TemperatureSweep  # noqa: E402
from spindiff.runtime import atomic_savefig  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> str:
    """Atomic PNG write (:func:`spindiff.runtime.atomic_savefig`), then close the figure."""
    try:
        return str(atomic_savefig(fig, path))
    finally:
        plt.close(fig)


def fig_scatter(x: np.ndarray, y: np.ndarray, head: str, r: float, p: float, slope: float, intercept: float,
                path: str | os.PathLike, title_extra: str = "", labels: Sequence[str] | None = None) -> str:
    """Fig. 1: dL_theory of one head (x, (P,)) vs dL_actual (y, (P,)) with the least-squares line."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(x, y, s=22, c="tab:blue", alpha=0.75, edgecolor="k", linewidth=0.3)
    xs = np.linspace(x.min(), x.max(), 50) if len(x) else np.zeros(1)
    ax.plot(xs, slope * xs + intercept, "r-", lw=1.5, label=f"fit: y = {slope:.3g} x + {intercept:.3g}")
    if labels is not None and len(x) <= 30:
        for xi, yi, lab in zip(x, y, labels):
            ax.annotate(lab, (xi, yi), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(rf"$\Delta L_{{theory}}$ of {head}")
    ax.set_ylabel(r"$\Delta L_{actual}$ (full model)")
    ax.set_title(f"{head}: r = {r:+.3f}, r$^2$ = {r * r:.3f}, p = {p:.2g}, n = {len(x)}{title_extra}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def fig_heatmap(r: np.ndarray, path: str | os.PathLike, title: str = "", marks: Sequence[tuple[int, int]] = ()) -> str:
    """Layer x head heatmap of r (L, H); ``marks`` are outlined (e.g. the top heads)."""
    L, H = r.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * H + 2.2), max(3.5, 0.24 * L + 1.4)))
    lim = max(float(np.nanmax(np.abs(r))), 1e-6)
    im = ax.imshow(r, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="upper")
    for l, h in marks:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="k", lw=1.4))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    fig.colorbar(im, ax=ax, label=r"Pearson r($\Delta L_{theory}$, $\Delta L_{actual}$)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def fig_landscape(ls: Landscape, path: str | os.PathLike, n: int = 200) -> str:
    """Fig. 2: the head's value-space decision plane, colour = N0 . s, N0 as an arrow.

    The window is sized to the candidates' points S_good, S_bad (and the origin); N0, usually
    much longer, is drawn as a direction arrow scaled into the window (its norm is labelled)."""
    g, bd, n0 = ls.coords(ls.S_good), ls.coords(ls.S_bad), ls.coords(ls.N0)
    span = float(np.abs(np.stack([g, bd])).max()) * 1.6 or 1.0
    a, b = np.meshgrid(np.linspace(-span, span, n), np.linspace(-span, span, n))
    F = ls.field(a, b)
    lim = float(np.abs(F).max()) or 1.0
    fig, ax = plt.subplots(figsize=(5.8, 4.9))
    im = ax.pcolormesh(a, b, F, cmap="RdBu_r", vmin=-lim, vmax=lim, shading="auto")
    ax.contour(a, b, F, levels=[0.0], colors="k", linewidths=0.8, linestyles="--")
    tip = n0 / max(np.linalg.norm(n0), 1e-300) * 0.8 * span
    ax.annotate("", xy=tip, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color="k", lw=2))
    ax.text(*(tip * 1.05), rf"$N_0$ (|N$_0$| = {np.linalg.norm(ls.N0):.3g})", fontsize=8)
    ax.scatter(*g, marker="o", s=90, c="limegreen", edgecolor="k", zorder=3,
               label=f"S_good '{ls.good}'  (N0.S = {ls.N0 @ ls.S_good:+.3g})")
    ax.scatter(*bd, marker="s", s=90, c="orange", edgecolor="k", zorder=3,
               label=f"S_bad '{ls.bad}'  (N0.S = {ls.N0 @ ls.S_bad:+.3g})")
    ax.plot([bd[0], g[0]], [bd[1], g[1]], "k:", lw=0.8)
    ax.set_xlabel(r"decision axis $\Delta S / |\Delta S|$ (good $-$ bad)")
    ax.set_ylabel(r"$N_0$ orthogonal to $\Delta S$, normalised")
    ax.set_xlim(-span, span)
    ax.set_ylim(-span, span)
    ax.set_aspect("equal")
    fig.colorbar(im, ax=ax, label=r"$N_0 \cdot s$ (head's logit contribution)")
    prompt = ls.prompt if len(ls.prompt) < 60 else "..." + ls.prompt[-57:]
    ax.set_title(f"L{ls.layer}H{ls.head} [{ls.protocol}] prompt #{ls.prompt_id}: '{prompt}'\n"
                 rf"$\Delta L_{{theory}} = N_0\cdot(S_{{good}}-S_{{bad}})$ = {ls.dl_theory:+.4g}", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def fig_temperature(sw: TemperatureSweep, path: str | os.PathLike, model: str = "") -> str:
    """Fig. 3: mean entropy (bits) and mean P(top-1) vs the global temperature T."""
    fig, ax1 = plt.subplots(figsize=(5.6, 3.8))
    ax1.plot(sw.temps, sw.entropy_bits, "o-", c="tab:red", ms=3, label="entropy S (bits)")
    ax1.set_xlabel("temperature T")
    ax1.set_ylabel("mean entropy S(P(T)) [bits]", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(sw.temps, sw.p_top1, "s-", c="tab:blue", ms=3, label="P(top-1)")
    ax2.set_ylabel(r"mean $P_{top-1}(T)$", color="tab:blue")
    ax2.set_ylim(0, 1.02)
    ax1.set_title(f"Order parameters vs temperature — {model} (n = {sw.entropy_per_prompt.shape[1]} prompts)",
                  fontsize=9)
    return _save(fig, path)


def fig_ablation(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> str:
    """Fig. 4: dL_actual at baseline and with each head (and all together) ablated, per mode."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    names = list(dict.fromkeys(r["ablated"] for r in rows))
    base = rows[0]["dl_base"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * (len(names) + 1) * max(1, len(modes)) * 0.6, 3.8))
    w = 0.8 / max(1, len(modes))
    ax.bar([0], [base], width=0.6, color="grey", label="baseline")
    ax.text(0, base, f"{base:+.2f}", ha="center", va="bottom" if base >= 0 else "top", fontsize=7)
    colors = {"zero": "tab:red", "mean": "tab:blue"}
    for j, mode in enumerate(modes):
        vals = [next(r["dl_ablated"] for r in rows if r["mode"] == mode and r["ablated"] == n) for n in names]
        xs = np.arange(1, len(names) + 1) + (j - (len(modes) - 1) / 2) * w
        ax.bar(xs, vals, width=w, color=colors.get(mode, None), label=f"{mode}-ablated")
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:+.2f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names) + 1), ["baseline"] + names, rotation=20, fontsize=8)
    ax.set_ylabel(r"$\Delta L_{actual}$ (good $-$ bad)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_causal(theory: np.ndarray, effect: np.ndarray, path: str | os.PathLike, r: float, title: str = "") -> str:
    """Causal check: dL_theory (x) vs the ablation effect on dL_actual (y), one point per (prompt, head)."""
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    ax.scatter(theory.ravel(), effect.ravel(), s=6, alpha=0.4, c="tab:purple")
    lo, hi = float(np.min(theory)), float(np.max(theory))
    ax.plot([lo, hi], [-lo, -hi], "k--", lw=0.8, label="effect = -dL_theory (direct path only)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(r"$\Delta L_{theory}$ (head, prompt)")
    ax.set_ylabel(r"change in $\Delta L_{actual}$ when the head is ablated")
    ax.set_title(f"{title} pooled r = {r:+.3f}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_predictors(preds: dict[str, dict[str, np.ndarray]], exact: dict[str, np.ndarray], summary: dict[str, Any],
                   labels: dict[str, str], path: str | os.PathLike, title: str = "") -> str:
    """Predicted (x) vs exact ablation effect (y), one point per (prompt, head); rows: ablation modes,
    columns: the predictors of the hierarchy (direct, + head paths, + MLP paths = AtP, AtP*, hybrid)."""
    keys = [k for k in ("direct", "+heads", "+heads+mlps", "atp_star", "hybrid") if k in next(iter(preds.values()))]
    modes = list(preds)
    fig, axes = plt.subplots(len(modes), len(keys), figsize=(3.2 * len(keys), 3.0 * len(modes)), squeeze=False)
    for i, m in enumerate(modes):
        y = exact[m].ravel()
        for j, k in enumerate(keys):
            ax, x = axes[i, j], preds[m][k].ravel()
            ax.scatter(x, y, s=5, alpha=0.35, c="tab:purple", edgecolor="none")
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            ax.axhline(0, color="grey", lw=0.4)
            ax.axvline(0, color="grey", lw=0.4)
            rec = summary[m]["predictors"][k]
            name = rec.get("label", labels[k]).split(" (")[0].split(", AtP for")[0]
            ax.set_title(f"{name}\n{m}-ablation: r = {rec['r']:+.3f}", fontsize=7)
            ax.set_xlabel("predicted change in dL", fontsize=7)
            if j == 0:
                ax.set_ylabel("exact change in dL", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: predicted vs exact ablation effect (dashed: equality)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_paths(terms: dict[str, Any], exact: dict[str, tuple] | None, path: str | os.PathLike, title: str = "") -> str:
    """Mean |term| over prompts and the heads of each layer: direct, via later heads, via later
    MLPs, their sum (first order) and, when given, the exact ablation effect; one panel per mode."""
    modes = list(terms)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.6), squeeze=False)
    for ax, m in zip(axes[0], modes):
        pt = terms[m]
        L = pt.total.shape[1]
        for name, style in (("direct", "-"), ("via_heads", "-"), ("via_mlps", "-"), ("total", "k-")):
            ax.plot(range(L), np.abs(getattr(pt, name)).mean((0, 2)), style, lw=1.2, label=name)
        if exact is not None:
            eff, heads, H = exact[m]
            lay = np.array([l for l, _ in heads])
            ax.plot(range(L), [np.abs(eff[:, lay == l]).mean() if (lay == l).any() else np.nan for l in range(L)],
                    "o--", c="tab:red", ms=3, lw=1, label="exact effect")
        ax.set_xlabel("layer of the ablated head")
        ax.set_ylabel("mean |change in dL|")
        ax.set_title(f"{title} {m}-ablation: first-order paths", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def fig_pairs(pi: Any, records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> str:
    """Heatmap of the mean pair interaction I(a, b) = e(ab) - e(a) - e(b) over prompts; * marks
    pairs that are cooperative / antagonistic after BH control (``records`` from ``pairs()``)."""
    I = pi.interaction.mean(0)
    names = pi.names
    K = len(names)
    sig = {(r["head_a"], r["head_b"]) for r in records if r["role"] != "additive"}
    lim = max(float(np.abs(I).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * K, 0.8 + 0.5 * K))
    im = ax.imshow(I, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(K):
        for j in range(K):
            if i != j:
                star = "*" if (names[i], names[j]) in sig or (names[j], names[i]) in sig else ""
                ax.text(j, i, f"{I[i, j]:+.2f}{star}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(K), names, rotation=45, fontsize=7)
    ax.set_yticks(range(K), names, fontsize=7)
    fig.colorbar(im, ax=ax, label="mean I = e(ab) - e(a) - e(b)")
    ax.set_title(f"{title}: pair interactions of the top {K} causal heads\n"
                 "(> 0 cooperative, < 0 antagonistic; * BH q < alpha)", fontsize=8)
    return _save(fig, path)
