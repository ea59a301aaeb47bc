"""How well does a predictor (P prompts x K heads) predict the exact ablation effect?

Per predictor: Pearson r pooled over (prompt, head) and across the heads' means over prompts, each
with a 95% percentile bootstrap CI that resamples *prompts* (the (prompt, head) points of one
prompt are not independent); the median over prompts of r across heads; top-k recall (of the k
heads with the largest mean |effect|, how many are among the predictor's k largest mean
|prediction|, and the same per prompt, averaged); the least-squares slope of the effect on the
prediction and the fraction of the effect's variance the prediction explains as it stands
(1 - SSE/SST, no fit: 1 only if prediction = effect). Differences between predictors get paired
bootstrap CIs (the same resampled prompts for both).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from analysis.stats import pearson_many


def _pooled_r(pred: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """r pooled over (prompt, head) for stacks (..., P, K) -> (...)."""
    return pearson_many(pred.reshape(*pred.shape[:-2], -1, 1), eff.reshape(*eff.shape[:-2], -1))[..., 0]


def _means_r(pred: np.ndarray, eff: np.ndarray) -> np.ndarray:
    return pearson_many(pred.mean(-2)[..., None], eff.mean(-2))[..., 0]


def recall_at(pred: np.ndarray, eff: np.ndarray, k: int) -> tuple[float, float]:
    """(head-mean recall, mean per-prompt recall) of the top-k heads by |effect|."""
    k = min(k, eff.shape[1])
    top = lambda a: set(np.argsort(-np.abs(a))[:k].tolist())  # noqa: E731
    means = len(top(eff.mean(0)) & top(pred.mean(0))) / k
    per = float(np.mean([len(top(e) & top(p)) / k for p, e in zip(pred, eff)]))
    return means, per


def compare_predictors(preds: dict[str, np.ndarray], effect: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       top: int = 10, ci: float = 0.95) -> dict[str, dict[str, Any]]:
    """One record per predictor (see module docstring). ``preds[name]`` and ``effect``: (P, K)."""
    P = effect.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, P, size=(n_boot, P))  # prompts resampled, shared by every predictor
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    eb = effect[idx]  # (n_boot, P, K)
    out: dict[str, dict[str, Any]] = {}
    sst = float(((effect - effect.mean()) ** 2).sum())
    for name, pred in preds.items():
        pb = pred[idx]
        boot_pool, boot_means = _pooled_r(pb, eb), _means_r(pb, eb)
        rec_means, rec_prompt = recall_at(pred, effect, top)
        x, y = pred.ravel(), effect.ravel()
        sxx = float(((x - x.mean()) ** 2).sum())
        out[name] = {
            "r": float(_pooled_r(pred, effect)), "r_ci": [float(np.percentile(boot_pool, lo)),
                                                          float(np.percentile(boot_pool, hi))],
            "r_means": float(_means_r(pred, effect)), "r_means_ci": [float(np.percentile(boot_means, lo)),
                                                                      float(np.percentile(boot_means, hi))],
            "r_per_prompt_median": float(np.median(pearson_many(pred[:, :, None], effect)[:, 0])),
            f"recall{top}": rec_means, f"recall{top}_per_prompt": rec_prompt,
            "slope": float(((x - x.mean()) @ (y - y.mean())) / sxx) if sxx > 0 else float("nan"),
            "explained": 1.0 - float(((y - x) ** 2).sum()) / sst if sst > 0 else float("nan"),
            "_boot": boot_pool,
        }
    return out


def paired_difference(a: dict[str, Any], b: dict[str, Any], ci: float = 0.95) -> dict[str, float]:
    """r(b) - r(a) pooled, with the paired bootstrap CI (records from one :func:`compare_predictors`)."""
    d = b["_boot"] - a["_boot"]
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    return {"diff": b["r"] - a["r"], "ci": [float(np.percentile(d, lo)), float(np.percentile(d, hi))]}


def strip_boot(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in records.items()}
