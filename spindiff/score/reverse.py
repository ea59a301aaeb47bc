"""The reverse SDE of a discrete prior on the unit token points, and its integration.

``PosteriorReverseSDE`` is the reverse-time SDE (tau = T - t) whose score is the exact score of
the vMF-noised mixture sum_v p(v) vMF(e_v, kappa_t) (:class:`CandidatePosterior.score`): a
:class:`spindiff.sphere.sde.SphereSDE`, so a torchsde SDE object (``f``, ``g_prod``,
``noise_type='general'``, ``sde_type='ito'``: ``torchsde.sdeint`` integrates it) and the form the
geodesic integrators of :mod:`spindiff.sphere.integrators` take (``tangent_drift``, ``diffusion``,
``geometry``):

    drift = beta(t) kappa(t) P_S sum_v pi_t(v | S) e_v  +  gamma w_t(S)  +  extra(S, t)
    noise = sqrt(beta(t)) P_S dW

with w_t the marginal-preserving precession (div(p_t w_t) = 0: it leaves every p_t unchanged) and
``extra`` any further drift (the paper's LLG field term, a steering field), which does change the
distribution sampled. n spins per context: the integrator sees (B n, d), the posterior (B, n, d).

:func:`sample_tokens` runs it from uniform noise on a reverse-time grid and decodes by a draw from
the posterior at the end: the spin sampler's per-token loop, and the validation's. The Brownian
increments come from a torchsde Brownian object: :class:`spindiff.sphere.integrators.GaussianIncrements`
(a ``torchsde.BaseBrownian`` of independent increments, the default) or a ``torchsde.BrownianInterval``
(``brownian="interval"``, replayable at any step size; ~10x the cost of the increments at batch 8,
an estimated 3-8% of the sampler's time: docs/diffusion.md Sec. 6).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from spindiff.score.posterior import CandidatePosterior
from spindiff.sphere.integrators import GaussianIncrements, get_integrator, make_brownian
from spindiff.sphere.sde import SphereSDE

__all__ = ["coefficients", "PosteriorReverseSDE", "FINAL_STEP", "BROWNIAN", "integrate_posterior", "sample_tokens"]

BROWNIAN = ("increments", "interval")  # torchsde Brownian objects for the per-token loop
FINAL_STEP = {"geodesic_heun": "geodesic_em"}  # EDM's rule: Heun's corrector is skipped on the last step
ExtraDrift = Callable[[Tensor, float], Tensor]  # (spin (B n, d), t) -> (B n, d)


def coefficients(sde, t: float, cache: dict[float, tuple[float, float]]) -> tuple[float, float]:
    """(kappa(t), beta(t)) of the forward family, cached per time value in ``cache`` (the grid is
    the same for every token)."""
    hit = cache.get(t)
    if hit is None:
        tt = torch.tensor([t], dtype=torch.float64)
        hit = cache[t] = (float(sde.kappa(tt)[0]), float(sde.beta(tt)[0]))
    return hit


class PosteriorReverseSDE(SphereSDE):
    """See the module docstring. ``sde`` is the forward :class:`spindiff.sphere.sde.BrownianSphereSDE`
    (its geometry is shared); Ito form, ``f`` = tangent drift - (d-1)/2 beta S."""

    def __init__(self, sde, post: CandidatePosterior, n: int = 1, precession: float = 0.0,
                 extra: Optional[ExtraDrift] = None, cache: Optional[dict[float, tuple[float, float]]] = None) -> None:
        super().__init__(sde.dim, "ito", sde.geometry)
        self.sde, self.post, self.n = sde, post, int(n)
        self.precession, self.extra = float(precession), extra
        self.cache = {} if cache is None else cache

    def coefficients(self, t: float) -> tuple[float, float]:
        return coefficients(self.sde, t, self.cache)

    def tangent_drift(self, tau: float | Tensor, spin: Tensor) -> Tensor:
        t = self.sde.T - float(tau)
        kappa, beta = self.coefficients(t)
        S = spin.view(-1, self.n, spin.shape[-1])  # (B, n, d)
        out = beta * self.post.score(S, kappa, self.geometry)
        if self.precession:
            out = out + self.precession * self.post.preserving_precession(S, kappa, self.geometry)
        out = out.reshape(spin.shape)
        return out if self.extra is None else out + self.extra(spin, t)

    def diffusion(self, tau: float | Tensor, spin: Tensor) -> Tensor:
        _, beta = self.coefficients(self.sde.T - float(tau))
        return torch.full((spin.shape[0],), math.sqrt(beta), dtype=spin.dtype, device=spin.device)


def integrate_posterior(rev: PosteriorReverseSDE, grid: list[float], method: str, generator: torch.Generator,
                        stop: Optional[int] = None, brownian: str = "increments") -> Tensor:
    """Spins from uniform noise integrated over ``grid[:stop + 1]`` (reverse times). (B, n, d).

    brownian: ``increments`` (:class:`GaussianIncrements` drawn from ``generator``) or ``interval``
    (a ``torchsde.BrownianInterval`` seeded from ``generator``)."""
    B, d = rev.post.logits.shape[0], rev.dim
    n, dtype, device = rev.n, rev.post.logits.dtype, rev.post.logits.device
    step_fn, last_fn = get_integrator(method), get_integrator(FINAL_STEP.get(method, method))
    stop = len(grid) - 1 if stop is None else int(stop)
    spin = rev.sde.prior_sampling(B * n, dtype=dtype, device=device, generator=generator)  # (B n, d)
    if brownian == "increments":
        bm = GaussianIncrements(B * n, d, dtype, device, generator=generator)
    elif brownian == "interval":
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        end = grid[stop] * (1 + 1e-6)  # torchsde rounds its end time to ~tol: keep the last query inside it
        bm = make_brownian(B * n, d, 0.0, end, dtype, device, seed, dt=grid[stop] / max(stop, 1))
    else:
        raise ValueError(f"brownian={brownian!r}: choose one of {', '.join(BROWNIAN)}")
    for k in range(stop):
        a, b = grid[k], grid[k + 1]
        spin = (last_fn if k == len(grid) - 2 else step_fn)(rev, a, b, spin, bm(a, b))  # (B n, d) geodesic step
    return spin.view(B, n, d)


def sample_tokens(rev: PosteriorReverseSDE, grid: list[float], method: str, generator: torch.Generator,
                  stop: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Integrate and draw v ~ pi_t(v | S) at the last grid point reached: ids (B, n), posterior
    probability of the drawn token (B, n), final spins (B, n, d)."""
    stop = len(grid) - 1 if stop is None else int(stop)
    spin = integrate_posterior(rev, grid, method, generator, stop)
    kappa, _ = rev.coefficients(rev.sde.T - grid[stop])
    ids, p = rev.post.draw(spin, kappa, generator)
    return ids, p, spin
