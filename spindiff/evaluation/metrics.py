"""Metrics of next-token samplers: plain functions of tensors and token lists (no model inside,
except :func:`token_excess`, which rescores continuations under a given LM).

* next-token fidelity, per prompt, between the sampler's empirical distribution p_hat over
  ``n_draws`` independent draws for the same context and the LM's softmax p_LM (temperature 1):
  :func:`total_variation` TV = 1/2 sum |p_hat - p_LM|; :func:`kl_divergence` KL(p_hat || p_LM)
  (finite: p_LM > 0 everywhere); :func:`top1_agreement` = fraction of draws equal to the LM's
  argmax; :func:`mean_draw_logprob` = mean log p_LM of the drawn tokens, and ``logprob_excess`` =
  that minus its exact expectation E_p[log p] = -H(p_LM) (0 in expectation for exact draws;
  > 0: the sampler is colder than the LM, < 0: hotter; unlike TV it has no finite-sample floor).
  With finite n even exact sampling from p_LM has TV > 0: the ``ar`` sampler at temperature 1
  measures that floor, and TV is lower for a sampler colder than the LM.
* continuations: :func:`perplexity` under the LM of the generated tokens (each scored by the LM
  given the real prefix, from the same forward that produced it); diversity :func:`distinct_n`
  (corpus-level unique n-grams / n-grams), :func:`self_bleu` (BLEU-4 of each continuation against
  all others, smoothed; :func:`bleu` is a small self-contained implementation), and
  :func:`repetition_rate` (within-sequence repeated n-grams, Welleck et al.'s seq-rep-n).
* continuation-level exactness: :func:`token_excess` rescores every generated token under the LM
  given its real prefix (one teacher-forced forward over prompt + continuation) and returns
  log p(x_t | prefix) + H(p(. | prefix)) per token; its mean over every generated token
  (``gen/excess``) is 0 in expectation for exact sampling at temperature 1 at ANY position (a block
  sampler's later tokens included, which next-token fidelity never sees); > 0: colder than the
  LM, < 0: hotter. ``gen/excess_ci`` is the 95% half-width over continuations (their mean excess).
* cost: tokens/s of generation (LM + SDE + decoding, no model loading), SDE steps per token.
* attractor diagnostics: mean cosine between successive context fields N_t, N_{t+1}; mean cosine
  of the final spin to the chosen token and its margin over the runner-up.

:mod:`spindiff.evaluation.evaluate` (the runner) re-exports every name here.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "total_variation", "kl_divergence", "empirical_distribution", "top1_agreement", "mean_draw_logprob",
    "perplexity", "ngrams", "distinct_n", "bleu", "self_bleu", "repetition_rate", "mean_ci",
    "fidelity_metrics", "continuation_metrics", "token_excess", "excess_metrics",
]


# --------------------------------------------------------------------------- distributions
def empirical_distribution(draws: Tensor, vocab_size: int) -> Tensor:
    """Histogram of draws (B, n) int64 -> (B, V) probabilities."""
    B, n = draws.shape
    counts = torch.zeros(B, vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, draws.cpu().long(), torch.ones(B, n, dtype=torch.float64))
    return counts / n


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """TV(p, q) = 1/2 sum_v |p_v - q_v|. p, q: (B, V) -> (B,)."""
    return 0.5 * (p.double() - q.double()).abs().sum(-1)


def kl_divergence(p: Tensor, q: Tensor, eps: float = 1e-30) -> Tensor:
    """KL(p || q) = sum_v p_v log(p_v / q_v), with 0 log 0 = 0. p, q: (B, V) -> (B,)."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(eps)) - torch.log(q.clamp_min(eps))), torch.zeros_like(p))
    return terms.sum(-1)


def top1_agreement(draws: Tensor, lm_probs: Tensor) -> Tensor:
    """Fraction of draws (B, n) equal to the LM's argmax token (lm_probs (B, V)). -> (B,)."""
    top = lm_probs.argmax(-1).to(draws.device)  # (B,)
    return (draws == top[:, None]).double().mean(-1)


def mean_draw_logprob(draws: Tensor, lm_logprobs: Tensor) -> Tensor:
    """Mean log p_LM of the drawn tokens. draws (B, n), lm_logprobs (B, V) -> (B,)."""
    return lm_logprobs.double().gather(1, draws.long().to(lm_logprobs.device)).mean(-1)


def perplexity(logprobs: Iterable[float]) -> float:
    """exp(-mean log p) over all tokens (NaN for none)."""
    vals = [float(x) for x in logprobs if x is not None and math.isfinite(float(x))]
    return math.exp(-sum(vals) / len(vals)) if vals else float("nan")


# --------------------------------------------------------------------------- text diversity
def ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams over all sequences (NaN if none)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(seqs: Sequence[Sequence[int]], n: int = 2) -> float:
    """seq-rep-n: mean over sequences of 1 - unique n-grams / n-grams within the sequence
    (0 = no n-gram repeats inside a continuation). Sequences shorter than n are skipped."""
    vals = []
    for s in seqs:
        g = ngrams(s, n)
        if g:
            vals.append(1.0 - len(set(g)) / len(g))
    return float(np.mean(vals)) if vals else float("nan")


def bleu(hyp: Sequence[int], refs: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al.) with clipped n-gram precision, uniform weights up to
    ``max_n``, brevity penalty against the closest reference length, and add-one smoothing of
    the n >= 2 precisions (Lin & Och 2004, "smoothing 2"), so short texts do not collapse to 0."""
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = Counter(ngrams(hyp, n))
        total = sum(h.values())
        max_ref: Counter = Counter()
        for r in refs:
            for g, c in Counter(ngrams(r, n)).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        match = sum(min(c, max_ref[g]) for g, c in h.items())
        if n == 1:
            if match == 0:
                return 0.0
            p = match / total
        else:
            p = (match + 1) / (total + 1)
        log_p += math.log(p) / max_n
    ref_len = min((len(r) for r in refs), key=lambda L: (abs(L - len(hyp)), L))
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / max(len(hyp), 1))
    return bp * math.exp(log_p)


def self_bleu(seqs: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Mean BLEU of each sequence against all the others (higher = less diverse; NaN for < 2)."""
    seqs = [list(s) for s in seqs if len(s)]
    if len(seqs) < 2:
        return float("nan")
    return float(np.mean([bleu(s, seqs[:i] + seqs[i + 1:], max_n) for i, s in enumerate(seqs)]))


# --------------------------------------------------------------------------- statistics
def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval, ``scipy.stats.t.interval``);
    half-width NaN for one value, 0 when all values agree. NaN values are dropped."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    sem = float(stats.sem(x))
    if sem == 0.0:
        return float(x.mean()), 0.0
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=sem)
    return float(x.mean()), float(hi - lo) / 2


# --------------------------------------------------------------------------- metric bundles
def fidelity_metrics(draws: Tensor, lm_logits: Tensor) -> dict[str, float]:
    """Next-token fidelity of draws (B, n) against the LM's logits (B, V), averaged over prompts."""
    logp = torch.log_softmax(lm_logits.double().cpu(), -1)  # (B, V)
    probs = logp.exp()
    emp = empirical_distribution(draws, probs.shape[-1])
    return {
        "fidelity/tv": float(total_variation(emp, probs).mean()),
        "fidelity/kl": float(kl_divergence(emp, probs).mean()),
        "fidelity/top1_agreement": float(top1_agreement(draws.cpu(), probs).mean()),
        "fidelity/logprob": float(mean_draw_logprob(draws.cpu(), logp).mean()),
        "fidelity/logprob_excess": float((mean_draw_logprob(draws.cpu(), logp) - (probs * logp).sum(-1)).mean()),
        "fidelity/distinct_draws": float(np.mean([len(set(r.tolist())) for r in draws])),
    }


def continuation_metrics(records: Sequence[dict[str, Any]], seconds: float, sde_steps: int) -> dict[str, float]:
    """Perplexity, diversity, cost and diagnostics of generated continuations
    (records as produced by :func:`spindiff.generation.sample.batch_records`)."""
    seqs = [r["token_ids"] for r in records]
    n_tok = sum(len(s) for s in seqs)
    diag = lambda k: [d[k] for r in records for d in r["diagnostics"] if d.get(k) is not None]  # noqa: E731
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {
        "gen/perplexity": perplexity(diag("lm_logprob")),
        "gen/logprob": mean(diag("lm_logprob")),
        "gen/distinct_1": distinct_n(seqs, 1),
        "gen/distinct_2": distinct_n(seqs, 2),
        "gen/distinct_3": distinct_n(seqs, 3),
        "gen/self_bleu": self_bleu(seqs),
        "gen/rep_2": repetition_rate(seqs, 2),
        "gen/eos_rate": float(np.mean([r["stop"] == "eos" for r in records])) if records else float("nan"),
        "gen/mean_len": n_tok / max(len(seqs), 1),
        "cost/tokens_per_s": n_tok / seconds if seconds > 0 else float("nan"),
        "cost/sde_steps_per_token": float(sde_steps),
        "diag/field_cos_prev": mean(diag("field_cos_prev")),
        "diag/cos_chosen": mean(diag("cos")),
        "diag/margin": mean(diag("margin")),
    }


@torch.no_grad()
def token_excess(model: Any, prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                 pad_id: int, batch_size: int = 8) -> list[list[float]]:
    """log p(x_t | prefix) + H(p(. | prefix)) of every token of every continuation under ``model``
    at temperature 1 (float64 from the LM's logits), from one teacher-forced forward per batch of
    prompt + continuation (left padded). Returns one list per continuation (empty ones stay empty)."""
    from spindiff.lm.tokens import pad_left

    device = next(model.parameters()).device
    out: list[list[float]] = []
    for i in range(0, len(continuations), batch_size):
        ps, cs = prompt_ids[i:i + batch_size], continuations[i:i + batch_size]
        ids, mask = pad_left([list(p) + list(c) for p, c in zip(ps, cs)], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                       use_cache=False).logits
        T = ids.shape[1]
        for b, c in enumerate(cs):
            n = len(c)
            if n == 0:
                out.append([])
                continue
            logp = torch.log_softmax(logits[b, T - n - 1:T - 1].double(), -1)  # (n, V): predicts each x_t
            ent = -(logp.exp() * logp).sum(-1)
            lp = logp.gather(1, ids[b, T - n:, None]).squeeze(1)
            out.append((lp + ent).cpu().tolist())
    return out


def excess_metrics(per_token: Sequence[Sequence[float]]) -> dict[str, float]:
    """``gen/excess`` = mean over every token, ``gen/excess_ci`` = 95% half-width over continuations."""
    flat = [x for seq in per_token for x in seq]
    _, ci = mean_ci([float(np.mean(s)) for s in per_token if len(s)])
    return {"gen/excess": float(np.mean(flat)) if flat else float("nan"), "gen/excess_ci": ci}
