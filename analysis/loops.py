"""Repetition loops in token sequences and the statistics of the repetition study (docs/analysis.md,
"Repetition as an attractor"): loop detection, the standard repetition metrics, AUC, confidence
intervals and a small logistic regression. Pure numpy/scipy (no model), so the definitions are
testable on constructed sequences.

Loop (issue 21: "an n-gram that repeats to the end"): a continuation x_0 .. x_{n-1} loops with
period p when its tail is p-periodic, x_t = x_{t-p} for every t in [onset, n), with at least
``min_copies`` copies of the p-gram (n - onset >= (min_copies - 1) p) and at least
``min_repeated`` repeated tokens (n - onset >= min_repeated). ``onset`` is the first repeated token
(the first t of that run), so the loop's first copy starts at onset - p. Among qualifying periods
the one with the earliest onset is reported (the smallest such p).
"""
from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

from spindiff.config import ConfigError


@dataclass
class RepetitionConfig:
    """``repetition.*`` keys of ``python -m analysis repetition`` (``quick=true`` shrinks them)."""

    temperatures: list = _field(default_factory=lambda: [0.0, 0.2, 0.4, 0.7, 1.0])  # 0 = greedy
    top_ks: list = _field(default_factory=lambda: [5, 0])  # effective vocabulary; 0 = all
    prompts_per_cell: int = 24  # prompts per (T, top_k) cell (half open-ended, half `prompts`)
    dense_temperature: float = 0.2  # cells at T <= this (greedy included) get dense_prompts prompts:
    dense_prompts: int = 220  # loops live there, so that is where the >= 200 loops come from (~236 expected)
    max_new_tokens: int = 160
    max_period: int = 24  # longest loop period searched
    min_copies: int = 3  # copies of the p-gram that must end the continuation
    min_repeated: int = 8  # repeated tokens (after the first copy) that a loop needs
    window: int = 12  # steps each side of the onset in the time course
    horizons: list = _field(default_factory=lambda: [1, 4, 8])  # onset prediction: k tokens ahead
    induction_len: int = 40  # repeated-random-tokens test: R random tokens, repeated once
    induction_batch: int = 8
    xu_copies: int = 8  # constructed self-reinforcement test: a sentence repeated up to this often
    xu_sentences: int = 24
    intervention: bool = True
    int_temperature: float = 0.0  # greedy: where loops are common enough to count (T = 0.7: ~5% at 160 tokens)
    int_top_k: int = 0
    int_prompts: int = 64  # if (int_temperature, int_top_k) is a grid cell, its first continuations are the base arm
    int_loop_prone: bool = False  # intervention prompts = those whose greedy grid continuation looped (loop-prone)
    int_max_new_tokens: int = 0  # intervention continuation length; 0 = max_new_tokens
    int_heads: int = 5  # top attractor heads down-weighted
    int_gains: list = _field(default_factory=lambda: [0.5, 0.25, 0.0])
    penalties: list = _field(default_factory=lambda: [1.01, 1.02, 1.03, 1.05, 1.1, 1.2])  # HF repetition_penalty
    ngram_sizes: list = _field(default_factory=lambda: [3, 4])  # HF no_repeat_ngram_size
    ppl_budget: float = 0.05  # allowed relative perplexity cost on non-looping text
    ref_texts: int = 8  # non-looping reference continuations for the perplexity cost
    batch_size: int = 64
    workers: int = 2  # generation processes (one torch thread each); 1 = in this process


QUICK = {"temperatures": [0.0, 1.0], "top_ks": [5, 0], "prompts_per_cell": 6, "dense_prompts": 16, "max_new_tokens": 96,
         "max_period": 12, "min_repeated": 6, "window": 6, "horizons": [1, 4], "induction_len": 16, "induction_batch": 2,
         "xu_copies": 3, "xu_sentences": 4, "intervention": False,
         "workers": 1}  # spawning workers costs more than it saves on this small grid


def check_rep(rc: RepetitionConfig) -> None:
    """Ranges of the repetition keys (ConfigError names the key and the fix)."""
    if not rc.temperatures or any(float(t) < 0 for t in rc.temperatures):
        raise ConfigError(f"repetition.temperatures={rc.temperatures}: give temperatures >= 0 (0 = greedy)")
    if not rc.top_ks or any(int(k) < 0 for k in rc.top_ks):
        raise ConfigError(f"repetition.top_ks={rc.top_ks}: give top-k values >= 0 (0 = the whole vocabulary)")
    for key, low in (("prompts_per_cell", 1), ("dense_prompts", 1), ("max_new_tokens", 8), ("max_period", 1), ("min_copies", 2),
                     ("min_repeated", 1), ("window", 1), ("induction_len", 2), ("induction_batch", 1),
                     ("xu_copies", 1), ("xu_sentences", 1), ("int_prompts", 1), ("int_heads", 1), ("ref_texts", 1),
                     ("batch_size", 1), ("workers", 1)):
        if int(getattr(rc, key)) < low:
            raise ConfigError(f"repetition.{key}={getattr(rc, key)}: must be >= {low}")
    if float(rc.dense_temperature) < 0:
        raise ConfigError(f"repetition.dense_temperature={rc.dense_temperature}: must be >= 0 (0 = greedy only)")
    if int(rc.int_max_new_tokens) < 0 or 0 < int(rc.int_max_new_tokens) < 8:
        raise ConfigError(f"repetition.int_max_new_tokens={rc.int_max_new_tokens}: 0 (= max_new_tokens) or >= 8")
    if rc.int_loop_prone and 0.0 not in [float(t) for t in rc.temperatures]:
        raise ConfigError("repetition.int_loop_prone=true needs greedy (0) in repetition.temperatures")
    if float(rc.int_temperature) < 0 or int(rc.int_top_k) < 0:
        raise ConfigError("repetition.int_temperature must be >= 0 (0 = greedy) and repetition.int_top_k >= 0")
    if not rc.horizons or any(int(k) < 1 for k in rc.horizons):
        raise ConfigError(f"repetition.horizons={rc.horizons}: give horizons >= 1 (tokens ahead)")
    if any(float(p) < 1 for p in rc.penalties) or any(int(n) < 1 for n in rc.ngram_sizes):
        raise ConfigError("repetition.penalties must be >= 1 and repetition.ngram_sizes >= 1")
    if not 0 < rc.ppl_budget < 1:
        raise ConfigError(f"repetition.ppl_budget={rc.ppl_budget}: a relative cost in (0, 1), e.g. 0.05")


@dataclass
class Loop:
    """A detected loop: ``loop`` False means none (onset = period = -1)."""

    loop: bool
    onset: int = -1
    period: int = -1
    copies: float = 0.0  # (n - onset + period) / period

    def as_dict(self) -> dict[str, Any]:
        return {"loop": self.loop, "onset": self.onset, "period": self.period, "copies": self.copies}


def detect_loop(tokens: Sequence[int], max_period: int = 16, min_copies: int = 3, min_repeated: int = 8) -> Loop:
    """The loop that ends ``tokens`` (see the module docstring), or ``Loop(False)``."""
    x = np.asarray(tokens)
    n = len(x)
    best: Loop | None = None
    for p in range(1, min(max_period, n - 1) + 1):
        same = x[p:] == x[:-p]  # same[i]: x[i+p] == x[i]
        r = int(np.argmin(same[::-1])) if not same.all() else len(same)  # trailing run of repeats
        if r >= max(min_repeated, (min_copies - 1) * p) and (best is None or n - r < best.onset):
            best = Loop(True, n - r, p, (r + p) / p)
    return best or Loop(False)


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float:
    """Welleck et al.'s seq-rep-n: 1 - unique n-grams / n-grams of one continuation (nan if none)."""
    g = ngrams(list(tokens), n)
    return 1.0 - len(set(g)) / len(g) if g else float("nan")


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """distinct-n: unique n-grams / n-grams (nan if none)."""
    g = ngrams(list(tokens), n)
    return len(set(g)) / len(g) if g else float("nan")


def rep_w(tokens: Sequence[int], w: int = 16) -> float:
    """rep/w: fraction of tokens that already occur among the previous ``w`` tokens."""
    t = list(tokens)
    if len(t) < 2:
        return float("nan")
    return float(np.mean([t[i] in t[max(0, i - w):i] for i in range(1, len(t))]))


# --------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def boot_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, stat=np.nanmean) -> tuple[float, float, float]:
    """(estimate, low, high): percentile 95% bootstrap of ``stat`` over the rows of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)] if v.ndim == 1 else v
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    bs = np.array([stat(v[i]) for i in idx])
    return float(stat(v)), float(np.nanquantile(bs, 0.025)), float(np.nanquantile(bs, 0.975))


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative) (ties count half); nan without both classes."""
    s, y = np.asarray(score, float), np.asarray(label, bool)
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = sps.rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def cluster_auc_ci(score: np.ndarray, label: np.ndarray, cluster: np.ndarray, n_boot: int = 300,
                   seed: int = 0) -> tuple[float, float, float]:
    """AUC with a 95% bootstrap CI that resamples clusters (continuations), not steps."""
    score, label, cluster = np.asarray(score, float), np.asarray(label, bool), np.asarray(cluster)
    ids = np.unique(cluster)
    rows = {c: np.nonzero(cluster == c)[0] for c in ids}
    rng = np.random.default_rng(seed)
    bs = []
    for _ in range(n_boot):
        take = np.concatenate([rows[c] for c in rng.choice(ids, len(ids))])
        bs.append(auc(score[take], label[take]))
    bs = np.array(bs)
    return auc(score, label), float(np.nanquantile(bs, 0.025)), float(np.nanquantile(bs, 0.975))


def logistic_fit(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton steps on standardised X (n, k) -> weights (k+1,)
    (intercept first) for :func:`logistic_score` with the same X statistics."""
    X = np.column_stack([np.ones(len(X)), X])
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -30, 30)))
        g = X.T @ (p - y) + l2 * np.r_[0, w[1:]]
        Hm = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(len(w))
        step = np.linalg.solve(Hm, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic_score(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(X)), X]) @ w


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale columns by the training mean / sd (nan -> 0 after scaling)."""
    mu, sd = np.nanmean(train, 0), np.nanstd(train, 0) + 1e-12
    return [np.nan_to_num((a - mu) / sd) for a in (train, *others)]
