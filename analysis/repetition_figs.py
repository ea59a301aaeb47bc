"""Figures of the repetition and wrong-answer studies (matplotlib Agg, small PNGs, atomic writes)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spindiff.runtime import atomic_savefig  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> str:
    try:
        return str(atomic_savefig(fig, path, dpi=90))
    finally:
        plt.close(fig)


def fig_phase(phase: dict[str, Any], rc: Any, path: str | os.PathLike, model: str = "") -> str:
    """Heatmap of the loop rate over temperature (rows; 0 = greedy) x top-k (columns; 0 = all)."""
    Ts = sorted({c["temperature"] for c in phase["cells"]})
    ks = [int(k) for k in rc.top_ks]
    M = np.full((len(Ts), len(ks)), np.nan)
    for c in phase["cells"]:
        i = Ts.index(c["temperature"])
        for j, k in enumerate(ks):
            if c["top_k"] == k or c["temperature"] == 0:  # greedy: one cell, every column
                M[i, j] = c["rate"]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="magma_r", aspect="auto")
    for i in range(len(Ts)):
        for j in range(len(ks)):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if M[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(ks)), [str(k) if k else "all" for k in ks])
    ax.set_yticks(range(len(Ts)), ["greedy" if T == 0 else f"{T:g}" for T in Ts])
    ax.set_xlabel("top-k (effective vocabulary)")
    ax.set_ylabel("temperature")
    ns = sorted({c["n"] for c in phase["cells"]}) or [0]
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    ax.set_title(f"{model}: loop rate ({n} prompts / cell)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, path)


def fig_time_course(tc: dict[str, Any], path: str | os.PathLike, model: str = "") -> str:
    """Field push on the emitted token, self-push, cos(N_t, N_t-1) and p(x_t) around loop onset."""
    rel = np.array(tc["rel"])
    names = [("push", "push on emitted token (logits)"), ("self_push", "push on previous token"),
             ("cos_prev", "cos(N_t, N_t-1)"), ("prob", "p(x_t)")]
    fig, axs = plt.subplots(1, 4, figsize=(11, 2.6))
    for ax, (k, lab) in zip(axs, names):
        d = tc[k]
        m, lo, hi = (np.array(d[x], dtype=float) for x in ("mean", "low", "high"))
        ax.plot(rel, m, color="C3")
        ax.fill_between(rel, lo, hi, color="C3", alpha=0.25)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_title(lab, fontsize=8)
        ax.set_xlabel("step - onset", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{model}: attractor around loop onset ({tc['n_loops']} loops; 95% CI)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_heads_induction(score: np.ndarray, ind: np.ndarray, n_heads: int, path: str | os.PathLike, rho: float,
                        model: str = "") -> str:
    """Per-head attractor score vs induction score; the top 5 of each labelled."""
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter(ind, score, s=9, alpha=0.6)
    for k in set(np.argsort(-score)[:5]) | set(np.argsort(-ind)[:5]):
        ax.annotate(f"L{k // n_heads}H{k % n_heads}", (ind[k], score[k]), fontsize=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("induction score (repeated random tokens)")
    ax.set_ylabel("attractor score (push in loops - outside)")
    ax.set_title(f"{model}: heads, Spearman {rho:+.2f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_errors(groups: dict[str, dict[str, Any]], heads: Sequence[dict[str, Any]], path: str | os.PathLike,
               model: str = "") -> str:
    """Left: mean attention / MLP / rest parts of dL for right and wrong prompts (95% CI) per set;
    right: the top antagonist heads' mean push on wrong prompts (main vs held-out set)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    parts = ("attn", "mlp", "rest")
    labels = list(groups)
    w = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        g = groups[lab]
        m = [g[p][0] for p in parts]
        err = np.array([[g[p][0] - g[p][1], g[p][2] - g[p][0]] for p in parts]).T
        a1.bar(np.arange(3) + i * w, m, w, yerr=err, label=lab, capsize=2)
    a1.axhline(0, color="k", lw=0.6)
    a1.set_xticks(np.arange(3) + w * (len(labels) - 1) / 2, ["attention heads", "MLPs", "rest"])
    a1.set_ylabel("mean part of dL (logits)")
    a1.legend(fontsize=7)
    a1.set_title(f"{model}: where dL comes from", fontsize=9)
    names = [h["head"] for h in heads]
    x = np.arange(len(names))
    a2.bar(x - 0.2, [h["main"] for h in heads], 0.4, label="main set (ranked here)")
    a2.bar(x + 0.2, [h["heldout"] if h["heldout"] is not None else np.nan for h in heads], 0.4, label="held-out")
    a2.axhline(0, color="k", lw=0.6)
    a2.set_xticks(x, names, rotation=60, fontsize=7)
    a2.set_ylabel("mean push on wrong prompts")
    a2.legend(fontsize=7)
    a2.set_title("antagonist heads on wrong prompts", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
