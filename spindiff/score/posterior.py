"""The per-token posterior over the vocabulary and the exact score it defines.

For one token the data distribution on S^{d-1} is a mixture of point masses at the unit token
rows e_v with weights p(v) = softmax(logits)_v. Under the von Mises-Fisher noising family
q(S_t | v) = vMF(e_v, kappa_t) (:class:`spindiff.sphere.sde.BrownianSphereSDE`) every component has
the same normaliser C_d(kappa_t), so

    p_t(S)        = C_d(kappa_t) sum_v p(v) exp(kappa_t S . e_v)
    pi_t(v | S)   = softmax_v(logits_v + kappa_t S . e_v)                       (the posterior)
    grad log p_t  = kappa_t P_S sum_v pi_t(v | S) e_v                            (the exact score)

so the only unknown is p(v | ctx): a model that outputs logits and forms the score from them is
exact when its logits are, and drawing v from the final posterior is exact decoding.

:class:`CandidatePosterior` holds logits over K candidate tokens per context (the top-K of the
full logits, or all V) with their unit rows, and gives the posterior weights, the score, the
log-density, a posterior draw and the marginal-preserving precession (see
:meth:`CandidatePosterior.preserving_precession`). The mass outside the candidates is reported
(``dropped_mass``) and, through :meth:`CandidatePosterior.mix_tail`, drawn exactly: the prior is the
mixture p = (1 - m) p_top + m p_tail (m the dropped mass, p_top and p_tail p renormalised on the
candidates and on the rest), so drawing "tail" with probability m, then v ~ p_tail directly, and
otherwise v from the SDE over the renormalised candidates samples p exactly whenever the SDE samples
p_top exactly. The tail is the low-log-p end of p; leaving it out makes the sampler colder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spindiff.sphere.geometry import SphereGeometry, apply_complex_structure

__all__ = ["CandidatePosterior", "unit_rows"]


def unit_rows(weight: Tensor) -> Tensor:
    """Rows scaled to unit norm (the token points e_v of an unembedding matrix). (V, d)."""
    return F.normalize(weight, dim=-1)


def _column(kappa: Tensor | float, like: Tensor) -> Tensor:
    """kappa () or (B,) as a (B, 1) or () tensor in like's dtype/device, for broadcasting over K or d."""
    kappa = torch.as_tensor(kappa, dtype=like.dtype, device=like.device)
    return kappa[:, None] if kappa.dim() == 1 else kappa


@dataclass
class CandidatePosterior:
    """A discrete prior over candidate token points, per context.

    logits: (B, K) log p(v) up to a constant (over the candidates).
    points: (B, K, d) unit token rows e_v of each context's candidates, or (K, d) shared by all
        contexts (the whole vocabulary).
    ids:    (B, K) token ids of the candidates.
    dropped_mass: (B,) prior mass outside the candidates (0 when K = V).
    tail_logits: (B, V) the full logits with the candidates set to -inf (None when K = V): p_tail.

    Spins come as (B, d) (one per context) or (B, n, d) (n per context, sharing its candidates:
    one batched matmul, no copies of the points).
    """

    logits: Tensor
    points: Tensor
    ids: Tensor
    dropped_mass: Tensor
    tail_logits: Optional[Tensor] = None

    @classmethod
    def from_logits(cls, logits: Tensor, table: Tensor, top_k: int | None = None) -> "CandidatePosterior":
        """Candidates = the top-k tokens of ``logits`` (B, V) (all V when ``top_k`` is None or >= V).

        table: (V, d) unit token rows. ``dropped_mass`` = the softmax mass of the other tokens,
        computed as exp(logsumexp(tail) - logsumexp(all)) (no 1 - sum cancellation).
        """
        logits = logits.to(table.dtype)
        B, V = logits.shape
        if top_k is None or top_k >= V:
            ids = torch.arange(V, device=logits.device).expand(B, V)
            return cls(logits, table, ids, logits.new_zeros(B))
        vals, ids = logits.topk(int(top_k), dim=-1)  # (B, K)
        tail = logits.scatter(1, ids, float("-inf"))  # (B, V): p_tail up to its normaliser
        dropped = torch.exp(torch.logsumexp(tail, -1) - torch.logsumexp(logits, -1))  # (B,)
        return cls(vals, table[ids], ids, dropped, tail)

    def mix_tail(self, ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Replace each draw, independently with probability ``dropped_mass``, by a direct draw from
        p_tail (the renormalised non-candidates): exact sampling of p from exact draws of p_top.

        ids: (B, [n]) draws over the candidates -> (ids (B, [n]), from_tail (B, [n]) bool).
        """
        flat = ids.reshape(ids.shape[0], -1)  # (B, n)
        if self.tail_logits is None:
            return ids, torch.zeros_like(ids, dtype=torch.bool)
        u = torch.rand(flat.shape, dtype=torch.float64, device=flat.device, generator=generator)
        take = u < self.dropped_mass.to(torch.float64)[:, None]  # (B, n)
        rows = take.any(1).nonzero().squeeze(1)  # contexts with at least one tail draw
        if rows.numel():
            probs = torch.softmax(self.tail_logits[rows].double(), -1)  # (R, V)
            draws = torch.multinomial(probs, flat.shape[1], replacement=True, generator=generator)  # (R, n)
            flat = flat.clone()
            flat[rows] = torch.where(take[rows], draws, flat[rows])
        return flat.view_as(ids), take.view(ids.shape)

    # ------------------------------------------------------------------ contractions with the points
    def cosines(self, spin: Tensor) -> Tensor:
        """S . e_v for every candidate. spin (B, [n,] d) -> (B, [n,] K)."""
        if self.points.dim() == 2:
            return spin @ self.points.T
        if spin.dim() == 2:
            return torch.bmm(self.points, spin.unsqueeze(-1)).squeeze(-1)  # (B, K)
        return torch.bmm(spin, self.points.transpose(1, 2))  # (B, n, K)

    def combine(self, w: Tensor) -> Tensor:
        """sum_v w_v e_v for weights (B, [n,] K) -> (B, [n,] d)."""
        if self.points.dim() == 2:
            return w @ self.points
        if w.dim() == 2:
            return torch.bmm(w.unsqueeze(1), self.points).squeeze(1)
        return torch.bmm(w, self.points)

    # ------------------------------------------------------------------ the posterior and the score
    def posterior_logits(self, spin: Tensor, kappa: Tensor | float) -> Tensor:
        """logits_v + kappa S . e_v. spin (B, [n,] d), kappa () or (B, [n]) -> (B, [n,] K)."""
        logits = self.logits if spin.dim() == 2 else self.logits.unsqueeze(1)
        return logits + _column(kappa, spin) * self.cosines(spin)

    def weights(self, spin: Tensor, kappa: Tensor | float) -> Tensor:
        """pi_t(v | S) over the candidates. (B, [n,] K)."""
        return torch.softmax(self.posterior_logits(spin, kappa), dim=-1)

    def mean_point(self, spin: Tensor, kappa: Tensor | float) -> Tensor:
        """sum_v pi_t(v | S) e_v. (B, [n,] d)."""
        return self.combine(self.weights(spin, kappa))

    def score(self, spin: Tensor, kappa: Tensor | float, geometry: SphereGeometry) -> Tensor:
        """kappa P_S sum_v pi_t(v | S) e_v, the Riemannian score of p_t. (B, [n,] d), tangent at S."""
        return _column(kappa, spin) * geometry.proju(spin, self.mean_point(spin, kappa))

    def log_density(self, spin: Tensor, kappa: Tensor | float) -> Tensor:
        """log sum_v p(v) exp(kappa S . e_v), p normalised over the candidates
        (= log p_t(S) - log C_d(kappa)). (B, [n])."""
        norm = torch.logsumexp(self.logits, -1)
        return torch.logsumexp(self.posterior_logits(spin, kappa), -1) - (norm if spin.dim() == 2 else norm[:, None])

    def draw(self, spin: Tensor, kappa: Tensor | float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """v ~ pi_t(. | S): token ids (B, [n]) and the posterior probability of the drawn token (B, [n])."""
        w = self.weights(spin, kappa)  # (B, [n,] K)
        k = torch.multinomial(w.reshape(-1, w.shape[-1]), 1, generator=generator).view(w.shape[:-1])  # (B, [n])
        ids = self.ids.gather(1, k.reshape(k.shape[0], -1)).view_as(k)
        return ids, w.gather(-1, k.unsqueeze(-1)).squeeze(-1)

    def preserving_precession(self, spin: Tensor, kappa: Tensor | float, geometry: SphereGeometry) -> Tensor:
        """A tangent drift w with div(p_t w) = 0 on the sphere: it leaves p_t invariant. (B, [n,] d).

        Each component q_v = exp(kappa S . e_v) is invariant under rotations that fix e_v; their
        generators A_v = P_v J P_v (P_v = I - e_v e_v^T, J the fixed complex structure of
        :func:`spindiff.sphere.geometry.apply_complex_structure`) are antisymmetric with A_v e_v = 0,
        so the Killing field K_v(S) = A_v S is divergence-free and K_v . grad q_v = 0, i.e.
        div(q_v K_v) = 0. Summing, w = sum_v pi_t(v | S) A_v S has div(p_t w) = sum_v div(q_v K_v) = 0.
        Expanded: A_v S = J S - (S . e_v) J e_v - (e_v . J S) e_v (using e_v . J e_v = 0), and J is
        linear, so sum_v w_v c_v J e_v = J sum_v w_v c_v e_v. The drift rotates about the
        posterior's effective field; it vanishes as S reaches a token point.
        """
        w = self.weights(spin, kappa)  # (B, [n,] K)
        c = self.cosines(spin)  # S . e_v
        js = apply_complex_structure(spin)  # J S
        ejs = self.cosines(js)  # e_v . J S
        out = js - apply_complex_structure(self.combine(w * c)) - self.combine(w * ejs)
        return geometry.proju(spin, out)  # tangent by construction; the projection removes rounding
