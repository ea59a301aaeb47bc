"""Denoising score matching on S^{d-1}, as plain functions of (sde, score_fn, batch).

Target. For S_0 from the data and S_t ~ q(. | S_0) = vMF(S_0, kappa(t)) (the noising family of
:class:`spindiff.sphere.sde.BrownianSphereSDE`, kappa matched to the Brownian mean cosine), the
conditional score is exactly

    grad_{S_t} log q(S_t | S_0) = kappa(t) P_{S_t} S_0,

at every d, in float32. Why not the others:

* Brownian heat kernel (Gegenbauer expansion): its terms grow like the multiplicity
  ~ d^l / l! and I_{l + d/2 - 1}-type coefficients; at d in the hundreds they overflow float32
  and need hundreds of terms at small t.
* Varadhan log_{S_t}(S_0) / s(t): exact only as s -> 0; at d = 576 the Brownian cosine moves by
  O(1) while s = O(1/d), so most training times are outside its range.
* Sliced / implicit score matching: valid for any forward process but needs a divergence estimate
  (Hutchinson, variance grows with d) and samples of the Brownian marginals.

Weighting lambda(t) (``WEIGHTINGS``), applied to |pred - target|^2 / (d-1):
``normalized`` (default) = 1 / (kappa(t) m(t)) = 1 / score_scale(t)^2, the inverse of
E|target|^2 / (d-1) = kappa A_d(kappa), so every t contributes O(1) and a zero score has expected
loss exactly 1; ``likelihood`` = beta(t) (the g^2 weighting of the reverse SDE); ``none`` = 1.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

__all__ = ["WEIGHTINGS", "dsm_loss", "batch_spin", "grouped_kl"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _normalized(sde: Any, t: Tensor) -> Tensor:
    return 1.0 / sde.score_scale(t).square()  # (B,) = 1 / (kappa m)


def _likelihood(sde: Any, t: Tensor) -> Tensor:
    return sde.beta(t)  # (B,)


def _none(sde: Any, t: Tensor) -> Tensor:
    return torch.ones_like(t)


WEIGHTINGS: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "normalized": _normalized,
    "likelihood": _likelihood,
    "none": _none,
}


def batch_spin(batch: Tensor | Mapping[str, Tensor]) -> Tensor:
    """The clean spins S_0 (B, d) of a batch (a tensor or a mapping with key ``spin``)."""
    return batch if isinstance(batch, Tensor) else batch["spin"]


def dsm_loss(
    sde: Any,
    score_fn: ScoreFn,
    batch: Tensor | Mapping[str, Tensor],
    weighting: str = "normalized",
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Denoising score matching loss with the exact vMF conditional score.

    loss = lambda(t) |score_fn(S_t, t) - kappa(t) P_{S_t} S_0|^2 / (d - 1), t ~ U[t_eps, T]
    (stratified), S_t ~ vMF(S_0, kappa(t)).

    Args:
        sde: a :class:`spindiff.sphere.sde.BrownianSphereSDE`.
        score_fn: (S_t (B, d), t (B,)) -> (B, d); bind the field/context of the batch first
            (:func:`spindiff.score.net.make_score_fn`).
        batch: S_0 (B, d) or a mapping with ``spin``.
        weighting: key of :data:`WEIGHTINGS`.
        t: optional (B,) times (default: sampled).
        generator: RNG for t and S_t.
        reduction: ``mean`` -> scalar, ``none`` -> (B,).
    """
    spin0 = batch_spin(batch)
    bsz, dim = spin0.shape
    if t is None:
        t = sde.sample_time(bsz, dtype=spin0.dtype, device=spin0.device, generator=generator)
    with torch.no_grad():
        spin_t = sde.marginal_sample(spin0, t, generator=generator)  # (B, d)
        target = sde.conditional_score(spin_t, spin0, t)  # (B, d)
        weight = WEIGHTINGS[weighting](sde, t).to(spin0.dtype)  # (B,)
    pred = score_fn(spin_t, t)  # (B, d)
    per_sample = weight * (pred - target).square().sum(-1) / (dim - 1)  # (B,)
    if reduction == "none":
        return per_sample
    return per_sample.mean()


def grouped_kl(logits: Tensor, target_ids: Tensor, target_logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """KL(p || q) over the target's top-k tokens plus one rest bin, and the grouped TV.

    logits: (B, V) of q; target_ids (B, k) int, target_logp (B, k) log p of those tokens.
    Returns kl (B,), tv (B,), log q of the top-k (B, k).
    """
    logq = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    lq = logq.gather(1, target_ids.long())  # (B, k)
    lp = target_logp.float()
    p, q = lp.exp(), lq.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)  # (B,)
    lq_rest = torch.log1p(-torch.exp(torch.logsumexp(lq, -1)).clamp(max=1.0 - 1e-7))  # log(1 - sum q_top)
    lp_rest = torch.log(p_rest.clamp_min(1e-30))
    kl = (p * (lp - lq)).sum(-1) + p_rest * (lp_rest - lq_rest)
    tv = 0.5 * ((p - q).abs().sum(-1) + (p_rest - lq_rest.exp()).abs())
    return kl, tv, lq
