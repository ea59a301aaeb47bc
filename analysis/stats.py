"""Statistics of per-head gaps over prompts, vectorised over heads.

X is (P, K): dL_theory of K heads on P prompts; y is (P,): dL_actual. Per head: Pearson r, its
two-sided p (t-test with P - 2 degrees of freedom, as ``scipy.stats.pearsonr`` / ``linregress``),
r^2, the least-squares slope/intercept of y on x. Across heads:

- Benjamini-Hochberg q (``scipy.stats.false_discovery_control``): false discovery rate.
- A permutation test of max_k |r_k| (Westfall-Young max-T): permute y, recompute every head's r
  with one matmul per chunk of permutations. ``p_family`` is the family-wise p of the best head
  (how often chance alone gives a head at least this good); ``p_fwer`` per head controls the
  family-wise error over all K heads.
- Bootstrap (over prompts) percentile 95% CI of each r.
- Split-half stability: rank heads on random halves of the prompts and compare the top-k sets.
- Replication on a held-out prompt set: heads ranked on one set, their r measured on another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps


def _standardise(A: np.ndarray, axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
    """Centre along ``axis`` and scale to unit norm; returns (Z, norm) with norm 0 -> Z = 0."""
    A = A - A.mean(axis=axis, keepdims=True)
    n = np.sqrt((A * A).sum(axis=axis, keepdims=True))
    return np.divide(A, n, out=np.zeros_like(A), where=n > 0), n


def pearson_many(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every column of X (..., P, K) with y (..., P): returns (..., K).
    A constant column gives r = 0 (no linear association can be measured)."""
    Xz, _ = _standardise(np.asarray(X, dtype=np.float64), axis=-2)
    yz, _ = _standardise(np.asarray(y, dtype=np.float64)[..., None], axis=-2)
    return np.clip((Xz * yz).sum(-2), -1.0, 1.0)


def r_pvalue(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p of Pearson r with n samples (t-test, n - 2 dof; = scipy.stats.pearsonr)."""
    r = np.asarray(r, dtype=np.float64)
    if n < 3:
        return np.ones_like(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt((n - 2) / np.clip(1.0 - r * r, 0.0, None))
    return np.where(np.abs(r) >= 1.0, 0.0, 2.0 * sps.t.sf(np.abs(t), n - 2))


def head_regression(X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column linregress(x_k, y): r, p, r2, slope, intercept, stderr — each (K,)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = X.shape[0]
    r = pearson_many(X, y)
    xc = X - X.mean(0)
    sxx = (xc * xc).sum(0)
    slope = np.divide(xc.T @ (y - y.mean()), sxx, out=np.zeros(X.shape[1]), where=sxx > 0)
    intercept = y.mean() - slope * X.mean(0)
    syy = ((y - y.mean()) ** 2).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        stderr = np.sqrt(np.clip((1 - r * r) * syy / max(n - 2, 1), 0, None) / sxx)
    return {"r": r, "p": r_pvalue(r, n), "r2": r * r, "slope": slope, "intercept": intercept,
            "stderr": np.where(sxx > 0, stderr, np.nan)}


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q) over all entries."""
    p = np.asarray(p, dtype=np.float64)
    return sps.false_discovery_control(p, method="bh") if p.size else p


@dataclass
class PermutationResult:
    """max-|r| permutation test. null_max: (N,) max_k |r_k| under each permutation."""

    observed_max: float
    null_max: np.ndarray
    p_family: float  # family-wise p of the best head
    p_fwer: np.ndarray  # (K,) max-T adjusted p per head
    n_permutations: int
    seed: int

    def threshold(self, alpha: float = 0.05) -> float:
        """|r| a head needs to survive family-wise control at ``alpha``."""
        return float(np.quantile(self.null_max, 1 - alpha)) if self.null_max.size else float("nan")


def permutation_maxabs(X: np.ndarray, y: np.ndarray, n_permutations: int = 1000, seed: int = 0,
                       chunk: int = 256) -> PermutationResult:
    """Permute y (P,), recompute all K heads' r with one matmul per chunk: (c, P) @ (P, K)."""
    X = np.asarray(X, dtype=np.float64)
    Xz, _ = _standardise(X, axis=0)  # (P, K)
    yz, _ = _standardise(np.asarray(y, dtype=np.float64)[:, None], axis=0)
    yz = yz[:, 0]
    r_obs = np.abs(Xz.T @ yz)
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for s in range(0, n_permutations, chunk):
        c = min(chunk, n_permutations - s)
        perms = rng.permuted(np.tile(np.arange(len(yz)), (c, 1)), axis=1)  # (c, P)
        null[s:s + c] = np.abs(yz[perms] @ Xz).max(1)  # (c, K) -> (c,)
    obs = float(r_obs.max()) if r_obs.size else 0.0
    tol = 1e-12
    p_family = (1 + np.sum(null >= obs - tol)) / (n_permutations + 1)
    p_fwer = (1 + (null[None, :] >= r_obs[:, None] - tol).sum(1)) / (n_permutations + 1)
    return PermutationResult(obs, null, float(p_family), p_fwer, n_permutations, seed)


def bootstrap_r(X: np.ndarray, y: np.ndarray, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of every head's r, resampling prompts: returns (low (K,), high (K,))."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    P, K = X.shape
    rng = np.random.default_rng(seed)
    rs = np.empty((n_bootstrap, K))
    for s in range(0, n_bootstrap, chunk):
        c = min(chunk, n_bootstrap - s)
        idx = rng.integers(0, P, size=(c, P))
        rs[s:s + c] = pearson_many(X[idx], y[idx])  # (c, P, K), (c, P) -> (c, K)
    a = (1 - level) / 2
    return np.quantile(rs, a, axis=0), np.quantile(rs, 1 - a, axis=0)


def split_half(X: np.ndarray, y: np.ndarray, top_k: int = 10, n_splits: int = 200, seed: int = 0) -> dict[str, Any]:
    """Stability of the top-k ranking by |r| over random halves of the prompts.

    Returns mean/quantiles of the top-k overlap fraction, its chance level k/K, the mean
    Spearman correlation of |r| between halves, and how often the best head is the same."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    P, K = X.shape
    k = min(top_k, K)
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n_splits, P)), axis=1)
    A, B = order[:, : P // 2], order[:, P // 2:]
    rA, rB = np.abs(pearson_many(X[A], y[A])), np.abs(pearson_many(X[B], y[B]))  # (S, K)
    topA, topB = np.argsort(-rA, 1)[:, :k], np.argsort(-rB, 1)[:, :k]
    mA = np.zeros((n_splits, K), bool)
    mB = np.zeros((n_splits, K), bool)
    np.put_along_axis(mA, topA, True, 1)
    np.put_along_axis(mB, topB, True, 1)
    overlap = (mA & mB).sum(1) / k
    rankA, rankB = sps.rankdata(rA, axis=1), sps.rankdata(rB, axis=1)
    spear = pearson_many(rankA[..., None], rankB)[:, 0] if K > 1 else np.zeros(n_splits)
    return {"top_k": k, "n_splits": n_splits, "overlap_mean": float(overlap.mean()),
            "overlap_q05": float(np.quantile(overlap, 0.05)), "overlap_q95": float(np.quantile(overlap, 0.95)),
            "overlap_chance": k / K, "spearman_abs_r_mean": float(np.mean(spear)),
            "top1_same_frac": float(np.mean(topA[:, 0] == topB[:, 0]))}


@dataclass
class HeadStats:
    """Statistics of all K heads on one prompt set (arrays are (K,), head k = (layer[k], head[k]))."""

    layer: np.ndarray
    head: np.ndarray
    r: np.ndarray
    p: np.ndarray
    r2: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    q_bh: np.ndarray
    r_ci_low: np.ndarray
    r_ci_high: np.ndarray
    p_fwer: np.ndarray
    n: int
    perm: PermutationResult
    split: dict[str, Any]

    @property
    def order(self) -> np.ndarray:
        """Head indices ranked by |r| (descending)."""
        return np.argsort(-np.abs(self.r), kind="stable")

    def name(self, k: int) -> str:
        return f"L{int(self.layer[k])}H{int(self.head[k])}"

    def index_of(self, layer: int, head: int) -> int | None:
        hit = np.nonzero((self.layer == layer) & (self.head == head))[0]
        return int(hit[0]) if hit.size else None

    def record(self, k: int) -> dict[str, Any]:
        return {"layer": int(self.layer[k]), "head": int(self.head[k]), "name": self.name(k),
                "r": float(self.r[k]), "p": float(self.p[k]), "q_bh": float(self.q_bh[k]),
                "p_fwer": float(self.p_fwer[k]), "r_ci_low": float(self.r_ci_low[k]),
                "r_ci_high": float(self.r_ci_high[k]), "r2": float(self.r2[k]), "slope": float(self.slope[k]),
                "role": "cooperative" if self.r[k] > 0 else "antagonistic"}

    def ranked(self, top: int | None = None) -> list[dict[str, Any]]:
        o = self.order if top is None else self.order[:top]
        return [self.record(int(k)) for k in o]


def head_stats(X: np.ndarray, y: np.ndarray, layer: np.ndarray, head: np.ndarray, n_permutations: int = 1000,
               n_bootstrap: int = 1000, n_splits: int = 200, top_k: int = 10, seed: int = 0) -> HeadStats:
    """All per-head statistics for X (P, K) against y (P,)."""
    reg = head_regression(X, y)
    perm = permutation_maxabs(X, y, n_permutations, seed)
    lo, hi = bootstrap_r(X, y, n_bootstrap, seed + 1)
    split = split_half(X, y, top_k, n_splits, seed + 2) if X.shape[0] >= 6 else {}
    return HeadStats(np.asarray(layer), np.asarray(head), reg["r"], reg["p"], reg["r2"], reg["slope"],
                     reg["intercept"], bh_q(reg["p"]), lo, hi, perm.p_fwer, X.shape[0], perm, split)


def replication(main: HeadStats, X_held: np.ndarray, y_held: np.ndarray, top_k: int = 10,
                alpha: float = 0.05) -> dict[str, Any]:
    """Heads ranked on the main set; their r on a held-out set.

    A top head *replicates* when its held-out r has the same sign and its held-out p survives
    Benjamini-Hochberg over the ``top_k`` heads tested. Also: Pearson correlation of r across all
    heads between the two sets (does the whole ranking carry over?)."""
    reg = head_regression(X_held, y_held)
    top = main.order[:top_k]
    q = bh_q(reg["p"][top])
    rows = []
    for j, k in enumerate(top):
        same = bool(np.sign(reg["r"][k]) == np.sign(main.r[k]) and main.r[k] != 0)
        rows.append({"layer": int(main.layer[k]), "head": int(main.head[k]), "name": main.name(int(k)),
                     "r_main": float(main.r[k]), "r_heldout": float(reg["r"][k]),
                     "p_heldout": float(reg["p"][k]), "q_heldout": float(q[j]), "same_sign": same,
                     "replicated": bool(same and q[j] < alpha)})
    r_all = float(pearson_many(main.r[:, None], reg["r"])[0]) if main.r.size > 2 else float("nan")
    return {"n_heldout": int(X_held.shape[0]), "top_k": int(top_k), "heads": rows,
            "n_replicated": int(sum(r["replicated"] for r in rows)),
            "r_across_heads": r_all, "p_across_heads": float(r_pvalue(np.array(r_all), main.r.size)),
            "r_heldout_all": reg["r"], "p_heldout_all": reg["p"]}
