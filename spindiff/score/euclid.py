"""Euclidean Gaussian DDPM (VP-SDE) in embedding space: the ``euclid_ddpm`` baseline.

This is the "Brownian" model the paper contrasts with: x in R^d (token embeddings, unconstrained),

    forward (Ito):  dx = -beta(t)/2 x dt + sqrt(beta(t)) dW,
    x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I),  alpha = exp(-s(t)/2), sigma^2 = 1 - alpha^2,

with s(t) = int_0^t beta (linear beta 0.1 -> 20 by default, the VP-SDE of Song et al.). The network
(:class:`spindiff.score.net.ResidualScoreNet` with ``tangent=False``, same size and context as the
spherical model) predicts the noise eps; score = -eps / sigma. Time convention as in
:mod:`spindiff.sphere.sde`: t is forward time; :class:`ReverseVPSDE` runs in tau = T - t; it has torchsde's form (``f``, ``g``) and the
integrators' (``tangent_drift``, ``diffusion``, flat ``geometry``): validation and the sampler both
integrate it with :func:`spindiff.sphere.integrators.integrate` (Euler-Maruyama). Decoding rounds to the nearest
embedding (Euclidean distance, one matmul).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import geoopt
import torch
from torch import Tensor

from spindiff.sphere.schedules import LinearSchedule

__all__ = ["VPSDE", "ReverseVPSDE", "ddpm_loss", "make_eps_fn", "sample_ddpm", "token_points"]

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, d), t (B,)) -> eps prediction (B, d)


def _batch_time(t: float | Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


class VPSDE:
    """Variance-preserving SDE in R^d, torchsde form (``noise_type='diagonal'``, Ito).

    Args:
        beta_min, beta_max: linear beta(t) (no dimension scaling: the Euclidean process is
            coordinate-wise).
        T: final time; t_eps: smallest training / sampling time.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_eps: float = 1e-3) -> None:
        self.schedule = LinearSchedule(2, beta_min, beta_max, T, dim_scaled=False)
        self.T = float(T)
        self.t_eps = float(t_eps)

    @classmethod
    def from_config(cls, cfg: Any) -> "VPSDE":
        """From an ``SDEConfig`` (beta_min, beta_max, T, t_eps)."""
        return cls(cfg.beta_min, cfg.beta_max, cfg.T, cfg.t_eps)

    def beta(self, t: float | Tensor) -> Tensor:
        return self.schedule.base_beta(torch.as_tensor(t))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)), each shaped like t."""
        s = self.schedule.base_integral(t)
        alpha = torch.exp(-0.5 * s)
        sigma = torch.sqrt(-torch.expm1(-s))  # sqrt(1 - alpha^2) without cancellation
        return alpha, sigma

    def drift(self, t: float | Tensor, x: Tensor) -> Tensor:
        return -0.5 * self.beta(_batch_time(t, x))[:, None] * x  # (B, d)

    def diffusion(self, t: float | Tensor, x: Tensor) -> Tensor:
        return torch.sqrt(self.beta(_batch_time(t, x)))  # (B,)

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.drift(t, y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.diffusion(t, y)[:, None].expand_as(y)  # (B, d) diagonal

    def prior_sampling(self, n: int, dim: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, dim, dtype=dtype, device=device, generator=generator)

    def sample_time(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        return (self.t_eps + (self.T - self.t_eps) * u).to(dtype=dtype, device=device)

    def marginal_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, eps) with x_t = alpha x_0 + sigma eps. x0: (B, d), t: (B,)."""
        eps = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        alpha, sigma = self.alpha_sigma(t)
        return alpha[:, None] * x0 + sigma[:, None] * eps, eps

    def reverse(self, eps_fn: EpsFn, probability_flow: bool = False) -> "ReverseVPSDE":
        return ReverseVPSDE(self, eps_fn, probability_flow)


class ReverseVPSDE:
    """Reverse VP-SDE in tau = T - t: dx = [beta/2 x + c beta score] dtau + sqrt(beta) dW.

    score = -eps_fn(x, t)/sigma(t); c = 1 (SDE) or 1/2 with no noise (probability flow).
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, forward: VPSDE, eps_fn: EpsFn, probability_flow: bool = False) -> None:
        self.forward = forward
        self.eps_fn = eps_fn
        self.probability_flow = bool(probability_flow)
        self.tau_end = forward.T - forward.t_eps

    def f(self, tau: Tensor, y: Tensor) -> Tensor:
        t = self.forward.T - _batch_time(tau, y)  # (B,)
        beta = self.forward.beta(t)[:, None]  # (B, 1)
        _, sigma = self.forward.alpha_sigma(t)
        score = -self.eps_fn(y, t) / sigma[:, None]  # (B, d)
        c = 0.5 if self.probability_flow else 1.0
        return 0.5 * beta * y + c * beta * score

    def g(self, tau: Tensor, y: Tensor) -> Tensor:
        return self.diffusion(tau, y)[:, None].expand_as(y)

    # the interface of spindiff.sphere.integrators (one integration path for every sampler)
    geometry: geoopt.Euclidean  # set below: flat space

    def tangent_drift(self, tau: float | Tensor, y: Tensor) -> Tensor:
        return self.f(tau, y)

    def diffusion(self, tau: float | Tensor, y: Tensor) -> Tensor:
        """Scalar noise amplitude sqrt(beta(t)) per sample (0 for the probability flow). (B,)."""
        if self.probability_flow:
            return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        t = self.forward.T - _batch_time(tau, y)
        return torch.sqrt(self.forward.beta(t))


# flat space for the integrators: geoopt's Euclidean manifold, proju(x, u) = u and exp_x(u) = x + u,
# so the ``geodesic_em`` step is the plain Euler-Maruyama step x + f h + g dW
ReverseVPSDE.geometry = geoopt.Euclidean(ndim=1)


def make_eps_fn(net: torch.nn.Module, context: Tensor | None = None) -> EpsFn:
    """Noise predictor (x, t) -> net(x, t, context) for a ``ResidualScoreNet(tangent=False)``."""

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, context)

    return eps_fn


def ddpm_loss(sde: VPSDE, eps_fn: EpsFn, batch: Tensor | Mapping[str, Tensor],
              generator: torch.Generator | None = None, t: Tensor | None = None,
              reduction: str = "mean") -> Tensor:
    """Noise-prediction loss |eps_fn(x_t, t) - eps|^2 / d, t ~ U[t_eps, T].

    batch: clean embeddings x_0 (B, d), or a mapping with key ``x0``. Returns a scalar (or (B,)).
    """
    x0 = batch if isinstance(batch, Tensor) else batch["x0"]
    if t is None:
        t = sde.sample_time(x0.shape[0], dtype=x0.dtype, device=x0.device, generator=generator)
    with torch.no_grad():
        xt, eps = sde.marginal_sample(x0, t, generator=generator)
    per_sample = (eps_fn(xt, t) - eps).square().mean(-1)  # (B,)
    return per_sample if reduction == "none" else per_sample.mean()


def sample_ddpm(sde: VPSDE, eps_fn: EpsFn, n: int, dim: int, steps: int = 100, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None, seed: int | None = None,
                probability_flow: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Reverse VP-SDE from N(0, I): ``steps`` Euler-Maruyama steps over tau in [0, T - t_eps]
    (:func:`spindiff.sphere.integrators.integrate`, the same path the sampler uses). (n, d).

    Noise from ``generator`` (or a new one seeded by ``seed``)."""
    from spindiff.sphere.integrators import GaussianIncrements, integrate

    gen = generator
    if gen is None:
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(seed) if seed is not None else gen.seed()
    x_T = sde.prior_sampling(n, dim, dtype=dtype, device=device, generator=gen)
    rev = sde.reverse(eps_fn, probability_flow)
    ts = torch.linspace(0.0, rev.tau_end, steps + 1, dtype=torch.float64)
    bm = GaussianIncrements(n, dim, dtype, device, generator=gen)
    return integrate(rev, x_T, ts, method="geodesic_em", bm=bm)


def token_points(spin: Tensor) -> Tensor:
    """The clean points x_0 = sqrt(d) S_0 of unit token rows S_0 (unit variance per coordinate, the
    scale the VP-SDE assumes). Every token has the same norm, so nearest-embedding rounding is the
    same argmax as nearest cosine. (..., d) -> (..., d)."""
    return spin * math.sqrt(spin.shape[-1])
