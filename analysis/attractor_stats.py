"""The measurements of the repetition study on recorded generations (:mod:`analysis.attractor`):
the attractor time course around loop onset, self-reinforcement, which heads feed the attractor
(against induction scores) and the prediction of loop onset. Each returns a JSON-able dict of
estimates with 95% bootstrap CIs (resampling continuations / loops, not steps)."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from analysis.loops import (auc, boot_ci, cluster_auc_ci, logistic_fit, logistic_score, standardise)
from spindiff.lm.hooks import record


def step_signals(rec: dict[str, Tensor], W_U: Tensor) -> dict[str, np.ndarray]:
    """Per-step signals (N, S) from a recorded generation:

    push: the field's direct push on the emitted token (sum of the heads' pushes);
    self_push: the field's push on the previous token x_{t-1} (its own spin pulling N back);
    seen_push: max push over the tokens already generated (x_u, u < t);
    cos_prev: cos(N_t, N_{t-1}) (the sampler's field_cos_prev diagnostic);
    entropy, maxprob, prob: the LM's own next-token entropy (nats), max-probability, p(x_t)."""
    N, x = rec["field"].float(), rec["tokens"]
    E = W_U.float()[x]  # (N, S, D)
    P = torch.einsum("nsd,nud->nsu", N, E)  # push of N_s on token x_u
    S = x.shape[1]
    idx = torch.arange(S)
    push = P[:, idx, idx]
    self_push = torch.full_like(push, float("nan"))
    self_push[:, 1:] = P[:, idx[1:], idx[:-1]]
    seen = P.masked_fill(~(idx[None, :] < idx[:, None])[None], float("-inf")).max(-1).values
    seen[:, 0] = float("nan")
    cos = torch.full_like(push, float("nan"))
    cos[:, 1:] = torch.nn.functional.cosine_similarity(N[:, 1:], N[:, :-1], dim=-1)
    return {"push": push.numpy(), "self_push": self_push.numpy(), "seen_push": seen.numpy(),
            "cos_prev": cos.numpy(), "entropy": rec["entropy"].numpy(), "maxprob": rec["maxprob"].numpy(),
            "prob": rec["logp"].exp().numpy()}


def time_course(sig: dict[str, np.ndarray], onsets: np.ndarray, window: int, n_boot: int = 500,
                seed: int = 0) -> dict[str, Any]:
    """Signals aligned on loop onset (rows with onset >= 0): mean and CI at each relative step
    -window .. window-1, and per loop the mean over the 8 steps before vs from the onset."""
    rows = np.nonzero(onsets >= 0)[0]
    S = next(iter(sig.values())).shape[1]
    rel = np.arange(-window, window)
    out: dict[str, Any] = {"rel": rel.tolist(), "n_loops": int(len(rows))}
    pre_ok = rows[onsets[rows] >= 4]
    out["n_loops_with_4_pre_onset_steps"] = int(len(pre_ok))
    for name in ("push", "self_push", "cos_prev", "prob", "entropy"):
        v = sig[name]
        A = np.full((len(rows), len(rel)), np.nan)
        for i, r in enumerate(rows):
            t = onsets[r] + rel
            ok = (t >= 0) & (t < S)
            A[i, ok] = v[r, t[ok]]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps no loop reaches: nan
            mean = np.nanmean(A, 0)
        lo, hi = [], []
        for j in range(len(rel)):
            _, l_, h_ = boot_ci(A[:, j], 300, seed + j)
            lo.append(l_), hi.append(h_)
        before = np.array([np.nanmean(v[r, max(1, onsets[r] - 8):onsets[r]]) for r in pre_ok])
        after = np.array([np.nanmean(v[r, onsets[r]:onsets[r] + 8]) for r in pre_ok])
        d = boot_ci(after - before, n_boot, seed)
        out[name] = {"mean": mean.tolist(), "low": lo, "high": hi,
                     "before": boot_ci(before, n_boot, seed), "after": boot_ci(after, n_boot, seed),
                     "after_minus_before": d}
    return out


def self_reinforcement(prob: np.ndarray, onsets: np.ndarray, periods: np.ndarray, max_copies: int = 6,
                       n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """p(x_t) of loop tokens by copy index c (c earlier copies of the loop's n-gram precede x_t):
    per loop the mean over its c-th copy, then mean and CI over loops."""
    rows = np.nonzero(onsets >= 0)[0]
    S = prob.shape[1]
    M = np.full((len(rows), max_copies), np.nan)
    for i, r in enumerate(rows):
        o, p = onsets[r], periods[r]
        t = np.arange(o, S)
        c = (t - (o - p)) // p
        for cc in range(1, max_copies + 1):
            sel = t[c == cc]
            if len(sel) == p:  # complete copies only
                M[i, cc - 1] = prob[r, sel].mean()
    curve = [boot_ci(M[:, j], n_boot, seed + j) + (int(np.sum(~np.isnan(M[:, j]))),) for j in range(max_copies)]
    both = ~np.isnan(M[:, 0]) & ~np.isnan(M[:, 2])
    rho = [sps.spearmanr(np.arange(max_copies)[~np.isnan(m)], m[~np.isnan(m)])[0] for m in M
           if np.sum(~np.isnan(m)) >= 3]
    return {"copies": list(range(1, max_copies + 1)), "prob": [list(c) for c in curve],
            "copy3_minus_copy1": boot_ci(M[both, 2] - M[both, 0], n_boot, seed),
            "per_loop_spearman": boot_ci(np.array(rho), n_boot, seed), "n_loops": int(len(rows))}


@torch.no_grad()
def constructed_reinforcement(model: Any, adapter: Any, sentences: Sequence[Sequence[int]], copies: int,
                              n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Xu et al. (2022)'s test: a sentence repeated; mean p of the tokens of copy n+1 given n
    earlier copies (n = 0 .. copies). One forward per sentence; logits from the final hidden state."""
    W_U = adapter.unembedding()
    M = np.full((len(sentences), copies + 1), np.nan)
    with record(adapter, ["ln_final.out"]) as acts:
        for i, s in enumerate(sentences):
            ids = torch.tensor([list(s) * (copies + 1)])
            model(input_ids=ids, logits_to_keep=1)
            lp = (acts["ln_final.out"][0] @ W_U.T).double().log_softmax(-1)  # (T, V)
            p = lp[:-1].gather(-1, ids[0, 1:, None])[:, 0].exp().numpy()  # p(x_t | x_<t), t = 1..T-1
            n = len(s)
            for c in range(copies + 1):
                t = np.arange(max(1, c * n), (c + 1) * n)
                M[i, c] = p[t - 1].mean()
    return {"n_prior": list(range(copies + 1)), "prob": [list(boot_ci(M[:, c], n_boot, seed + c)) for c in range(copies + 1)],
            "last_minus_first_repeat": boot_ci(M[:, -1] - M[:, 1], n_boot, seed), "n_sentences": len(sentences)}


def attractor_heads(push: np.ndarray, onsets: np.ndarray, induction: np.ndarray, n_heads: int, top: int = 10,
                    n_boot: int = 300, seed: int = 0) -> dict[str, Any]:
    """Per-head attractor score = mean push on the emitted token at loop steps (t >= onset) minus
    at non-loop steps; against the induction scores (L, H)."""
    rows = np.nonzero(onsets >= 0)[0]
    S = push.shape[1]
    in_loop = np.zeros(push.shape[:2], bool)
    for r in rows:
        in_loop[r, onsets[r]:] = True
    per_loop = np.stack([push[r, onsets[r]:].mean(0) for r in rows])  # (n_loops, LH)
    base = push[~in_loop].mean(0)  # (LH,)
    score = per_loop.mean(0) - base
    ind = induction.reshape(-1)
    rng = np.random.default_rng(seed)
    rs = [sps.spearmanr(per_loop[rng.integers(0, len(rows), len(rows))].mean(0) - base, ind)[0] for _ in range(n_boot)]
    rho = float(sps.spearmanr(score, ind)[0])
    r_p = float(np.corrcoef(score, ind)[0, 1])
    top_att = np.argsort(-score)[:top]
    top_ind = np.argsort(-ind)[:top]
    overlap = len(set(top_att) & set(top_ind))
    K = len(ind)
    p_over = float(sps.hypergeom.sf(overlap - 1, K, top, top))
    pos = np.clip(score, 0, None)
    share = float(pos[top_ind].sum() / max(pos.sum(), 1e-12))
    name = lambda k: f"L{k // n_heads}H{k % n_heads}"  # noqa: E731
    return {"score": score, "induction": ind, "spearman": rho,
            "spearman_ci": [float(np.nanquantile(rs, 0.025)), float(np.nanquantile(rs, 0.975))], "pearson": r_p,
            "top_attractor": [{"head": name(k), "score": float(score[k]), "induction": float(ind[k])} for k in top_att],
            "top_induction": [{"head": name(k), "induction": float(ind[k]), "score": float(score[k])} for k in top_ind],
            "top_overlap": overlap, "top_overlap_p": p_over, "top_overlap_chance": top * top / K,
            "positive_push_share_of_top_induction": share, "n_loops": int(len(rows)), "n_steps": int(S)}


FIELD = ("self_push", "seen_push", "cos_prev")
BASE = ("entropy", "maxprob")
DIRECTION = {"self_push": 1, "seen_push": 1, "cos_prev": 1, "entropy": -1, "maxprob": 1}  # a priori: + = loop


def onset_prediction(sig: dict[str, np.ndarray], onsets: np.ndarray, horizons: Sequence[int], n_boot: int = 300,
                     seed: int = 0) -> dict[str, Any]:
    """AUC of predicting onset within the next k tokens (onset - t in [0, k)) from step-t signals
    (available before x_t is drawn), on steps t >= 1 not yet inside a loop. Single signals use
    their a-priori direction (DIRECTION); the logistic models (field, baseline, both) train on
    even continuations and are tested on odd ones."""
    Nr, S = sig["push"].shape
    t = np.tile(np.arange(S), (Nr, 1))
    row = np.tile(np.arange(Nr)[:, None], (1, S))
    o = np.where(onsets >= 0, onsets, 10**9)[:, None]
    keep = (t >= 1) & (t <= o)
    res: dict[str, Any] = {}
    for k in horizons:
        y = ((o - t) >= 0) & ((o - t) < k)
        yk, rk = y[keep], row[keep]
        feats = {n: sig[n][keep] * DIRECTION[n] for n in FIELD + BASE}
        single = {n: cluster_auc_ci(v, yk, rk, n_boot, seed) for n, v in feats.items()}
        tr, te = rk % 2 == 0, rk % 2 == 1
        models = {}
        for name, cols in (("field", FIELD), ("baseline", BASE), ("field+baseline", FIELD + BASE)):
            X = np.column_stack([feats[c] for c in cols])
            Xtr, Xte = standardise(X[tr], X[te])
            w = logistic_fit(Xtr, yk[tr].astype(float))
            models[name] = cluster_auc_ci(logistic_score(Xte, w), yk[te], rk[te], n_boot, seed)
        res[str(k)] = {"n_steps": int(keep.sum()), "n_positive": int(yk.sum()), "single": single,
                       "logistic_test": models}
    return res
