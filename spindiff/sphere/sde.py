"""SDEs on the token sphere S^{d-1}: the Brownian forward process and the reverse LLG process.

Time convention (stated once, used everywhere)
-----------------------------------------------
* Forward (noising) time t runs from 0 (data) to T (uniform). Schedules, the score network,
  the loss and ``score_fn(S, t)`` always take this physical time t, shape (B,).
* torchsde integrates only forward in its time variable (``ts`` strictly increasing). The
  reverse process is therefore written in reverse time tau = T - t, tau in [0, T - t_eps]:
  :class:`ReverseLLGSDE` methods ``f(tau, y)``, ``g_prod(tau, y, v)``, ``drift``, ``diffusion``
  take tau and convert with t = T - tau. Integrate it on ``ts = linspace(0, T - t_eps, n + 1)``.

Forward process
---------------
Brownian motion on S^{d-1} with rate beta(t) (generator (beta/2) Laplacian):

    Stratonovich:  dS = sqrt(beta) P_S o dW                       (tangent, no radial drift)
    Ito:           dS = -(d-1)/2 beta S dt + sqrt(beta) P_S dW

with P_S = I - S S^T and W a d-dimensional Wiener process. The Ito drift is the Stratonovich
correction (1/2) sum_k D(P e_k)[P e_k] = -(d-1) S / 2 (times beta); it keeps |S| = 1 because
|P_S dW|^2 = (d-1) dt. The paper's Eq. (10) writes -beta/2 S, which is the correction only for
d = 2 (S^1); at d = 576 it is 575 times too small and Euclidean Euler steps of it leave the
sphere. E[S_t . S_0] = exp(-(d-1) s(t)/2), s = int beta (see :mod:`spindiff.sphere.schedules`).

Noising family used for training (closed form)
----------------------------------------------
The transition density of Brownian motion on S^{d-1} is a Gegenbauer series whose terms overflow
float32 (and need hundreds of terms) for d in the hundreds. Training instead uses the von
Mises-Fisher family q(S_t | S_0) = vMF(S_0, kappa(t)) with kappa(t) matched so that
A_d(kappa(t)) = E_vMF[S_t . S_0] = exp(-(d-1) s(t)/2), the Brownian law of the mean cosine.
Its samples are exact (Wood's algorithm) and its conditional score is exact at every d:
grad log q = kappa(t) P_{S_t} S_0. The match is not exact beyond the first moment: both laws of
the cosine x = S_t.S_0 concentrate at m(t) with variance O(1/d) -- (1-m^2)^2/((1+m^2) d) for vMF,
(1 - m^2 + 2 m^2 log m)/d for Brownian motion at large d -- so the two families differ by a
d-independent O(1e-3) in KL and are identical as t -> 0 (both N(0, s I) in the tangent plane)
and as t -> T (both uniform, with the same first harmonic). docs/diffusion.md gives the numbers
and the validation (vMF mixtures recovered by the reverse SDE with this score).

Reverse process with LLG dynamics
---------------------------------
In reverse time, with the score s_theta(S, t) ~ grad_S log p_t(S) (tangent at S) and the context
field N (B, d), constant over one token's integration:

    dS = [ beta s_theta + eta P_S N + (eta/lam) Prec(S, N) ] dtau + sqrt(beta) dB_S     (intrinsic)

where dB_S is Brownian motion on the sphere (Ito embedded form: add -(d-1)/2 beta S dtau and use
sqrt(beta) P_S dW). The field part is the LLG equation

    dS/dt = -gamma/(1+lam^2) S x N + gamma lam/(1+lam^2) P_S N,   eta = gamma lam/(1+lam^2),

i.e. damping eta P_S N and precession (eta/lam) Prec(S, N) with Prec(S, N) = -S x N for d = 3
and -P_S J P_S N for d > 3 (fixed complex structure J, see :func:`spindiff.sphere.geometry.precession`).
Precession over damping is 1/lam, so lam changes the dynamics and not only the scale;
lam = inf is the overdamped limit of the paper's Appendix B. eta P_S N is exactly the Riemannian
score of vMF(N/|N|, eta |N|): the damping term is the gradient flow toward the context direction.
``probability_flow=True`` replaces beta s_theta by beta s_theta / 2 and switches the noise off.
"""
from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch
from scipy import special
from torch import Tensor

from spindiff.sphere.geometry import SphereGeometry, precession
from spindiff.sphere.schedules import NoiseSchedule, schedule_from_config
from spindiff.sphere.vmf import kappa_from_mean_resultant, sample_vmf

__all__ = [
    "ScoreFn",
    "SphereSDE",
    "BrownianSphereSDE",
    "ReverseLLGSDE",
    "kappa_of_decay",
    "llg_field_drift",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (S (B, d), t (B,)) -> score (B, d), tangent at S

_U_LO, _U_HI, _TABLE_N = 1e-6, 12.0, 8193


def _table_coord(u: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Grid coordinate z = log u + u: log-like for small decay u, linear for large u, so that
    log kappa(z) has bounded curvature on the whole range (slope -1 at both ends)."""
    return (torch.log(u) if isinstance(u, Tensor) else np.log(u)) + u


@functools.lru_cache(maxsize=32)
def _log_kappa_table(dim: int) -> np.ndarray:
    """log kappa on a uniform grid of z = log u + u, u = -log m in [1e-6, 12] (float64, (N,))."""
    z = np.linspace(_table_coord(_U_LO), _table_coord(_U_HI), _TABLE_N)
    u = np.real(special.lambertw(np.exp(z)))  # u e^u = e^z
    return np.log(kappa_from_mean_resultant(np.exp(-u), dim))


def kappa_of_decay(decay: Tensor, dim: int) -> Tensor:
    """Concentration kappa with A_d(kappa) = exp(-decay) (vMF mean cosine = Brownian mean cosine).

    decay: (...,) = -log E[S_t.S_0] >= 0. Linear interpolation of log kappa on an 8193-point grid
    in z = log u + u over u in [1e-6, 12] (relative error < 1e-6, tested against the exact
    inversion); outside it the series kappa = (d-1)/(2(u - u^2/(d-1))) (u < 1e-6) and
    kappa = d e^{-u} (u > 12, where A_d(kappa) = kappa/d (1 + O(kappa^2/d^2))) are exact to
    rounding. Returns (...,) in decay's dtype.
    """
    table = torch.from_numpy(_log_kappa_table(dim)).to(device=decay.device)
    u = decay.to(torch.float64)
    z_lo, z_hi = float(_table_coord(_U_LO)), float(_table_coord(_U_HI))
    h = (z_hi - z_lo) / (_TABLE_N - 1)
    pos = (_table_coord(u.clamp(_U_LO, _U_HI)) - z_lo) / h  # (...,) fractional index
    i0 = pos.floor().clamp(0, _TABLE_N - 2).long()
    frac = pos - i0
    log_k = table[i0] * (1 - frac) + table[i0 + 1] * frac
    kappa = torch.exp(log_k)
    small = (dim - 1.0) / (2.0 * (u - u * u / (dim - 1.0)))
    large = dim * torch.exp(-u)
    kappa = torch.where(u < _U_LO, small, torch.where(u > _U_HI, large, kappa))
    return kappa.to(decay.dtype)


def _batch_time(t: float | Tensor, like: Tensor) -> Tensor:
    """t as a (B,) tensor in like's dtype/device (B = like.shape[0])."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def llg_field_drift(
    spin: Tensor, field: Tensor, eta: float, lam: float, geometry: SphereGeometry
) -> Tensor:
    """eta P_S N + (eta/lam) Prec(S, N). spin, field: (B, d) -> (B, d), tangent at S.

    eta >= 0 is the damping strength (eta = gamma lam/(1+lam^2)), lam > 0 the Gilbert damping
    (math.inf: overdamped, no precession).
    """
    if eta < 0 or not lam > 0:
        raise ValueError("need eta >= 0 and lam > 0")
    out = eta * geometry.proju(spin, field)  # (B, d) damping: vMF score of (N/|N|, eta|N|)
    if math.isfinite(lam) and eta != 0:
        out = out + (eta / lam) * precession(spin, field, geometry)  # (B, d)
    return out


class SphereSDE(ABC):
    """SDE on S^{d-1} with tangent noise: dS = a(t, S) dt + sigma(t) P_S dW, torchsde form.

    Subclasses give the intrinsic (tangent) drift a = ``tangent_drift`` and the scalar noise
    amplitude sigma = ``diffusion``. ``drift`` is the drift of the form named by ``sde_type``:
    Stratonovich = a, Ito = a - (d-1)/2 sigma^2 S. torchsde's ``sdeint`` accepts the object
    directly (``noise_type='general'``, ``f``, ``g_prod``; pass ``bm`` of size (B, d)); the
    geodesic integrators of :mod:`spindiff.sphere.integrators` use ``tangent_drift`` and ``diffusion``.
    No ``g`` method: torchsde would build the (B, d, d) matrix for its shape check
    (use :meth:`diffusion_matrix` explicitly where the matrix is wanted).
    """

    noise_type: str = "general"

    def __init__(self, dim: int, sde_type: str = "ito", geometry: SphereGeometry | None = None) -> None:
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError("sde_type must be 'ito' or 'stratonovich'")
        self.dim = int(dim)
        self.geometry = SphereGeometry() if geometry is None else geometry  # reverse SDEs share the forward's
        self.sde_type = sde_type

    @abstractmethod
    def tangent_drift(self, t: float | Tensor, spin: Tensor) -> Tensor:
        """Intrinsic drift a(t, S), tangent at S. (B, d)."""

    @abstractmethod
    def diffusion(self, t: float | Tensor, spin: Tensor) -> Tensor:
        """Scalar noise amplitude sigma(t) per sample. (B,)."""

    def drift(self, t: float | Tensor, spin: Tensor) -> Tensor:
        """Drift of the ``sde_type`` form (Ito adds -(d-1)/2 sigma^2 S). (B, d)."""
        a = self.tangent_drift(t, spin)
        if self.sde_type == "stratonovich":
            return a
        sig2 = self.diffusion(t, spin).square()  # (B,)
        return a - 0.5 * (self.dim - 1) * sig2[:, None] * spin  # (B, d)

    # torchsde interface
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        """torchsde drift (B, d)."""
        return self.drift(t, y)

    def g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """torchsde diffusion-vector product sigma P_y v. y, v: (B, d) -> (B, d)."""
        return self.diffusion(t, y)[:, None] * self.geometry.proju(y, v)

    def diffusion_matrix(self, t: float | Tensor, y: Tensor) -> Tensor:
        """sigma (I - y y^T) as a (B, d, d) matrix (small d only)."""
        eye = torch.eye(self.dim, dtype=y.dtype, device=y.device)
        proj = eye - torch.einsum("bi,bj->bij", y, y)  # (B, d, d)
        return self.diffusion(t, y)[:, None, None] * proj

    def prior_sampling(
        self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """n samples of the uniform law on S^{d-1}. (n, d)."""
        return self.geometry.random_uniform(n, self.dim, dtype=dtype, device=device, generator=generator)

    def prior_logp(self, spin: Tensor) -> Tensor:
        """log density of the uniform law w.r.t. surface measure: -log|S^{d-1}|. (B,)."""
        d = self.dim
        log_area = math.log(2.0) + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d)
        return torch.full(spin.shape[:-1], -log_area, dtype=spin.dtype, device=spin.device)


class BrownianSphereSDE(SphereSDE):
    """Forward noising: Brownian motion on S^{d-1} with rate beta(t) (see module docstring).

    Args:
        schedule: beta(t); its ``dim`` is the ambient dimension d.
        sde_type: 'ito' (drift -(d-1)/2 beta S) or 'stratonovich' (no drift).
        t_eps: smallest time used by the loss and the end point of reverse integration.
    """

    def __init__(self, schedule: NoiseSchedule, sde_type: str = "ito", t_eps: float = 1e-3) -> None:
        super().__init__(schedule.dim, sde_type)
        self.schedule = schedule
        self.T = schedule.T
        self.t_eps = float(t_eps)

    @classmethod
    def from_config(cls, cfg: Any, dim: int) -> "BrownianSphereSDE":
        """From an ``SDEConfig`` (schedule, beta_min, beta_max, dim_scaled, T, t_eps)."""
        return cls(schedule_from_config(cfg, dim), t_eps=cfg.t_eps)

    def __repr__(self) -> str:
        return f"BrownianSphereSDE({self.schedule!r}, sde_type={self.sde_type!r}, t_eps={self.t_eps})"

    def beta(self, t: float | Tensor) -> Tensor:
        return self.schedule.beta(t)

    def tangent_drift(self, t: float | Tensor, spin: Tensor) -> Tensor:
        return torch.zeros_like(spin)

    def diffusion(self, t: float | Tensor, spin: Tensor) -> Tensor:
        return torch.sqrt(self.schedule.beta(_batch_time(t, spin)))  # (B,)

    # ---------------------------------------------------------------- noising family (vMF)
    def mean_cosine(self, t: float | Tensor) -> Tensor:
        """E[S_t . S_0] = exp(-(d-1) s(t)/2)."""
        return self.schedule.mean_cosine(t)

    def kappa(self, t: Tensor) -> Tensor:
        """vMF concentration kappa(t) with A_d(kappa) = E[S_t.S_0]. t: (B,) -> (B,)."""
        return kappa_of_decay(self.schedule.signal_decay(t), self.dim)

    def marginal_sample(self, spin0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """S_t ~ vMF(S_0, kappa(t)). spin0: (B, d), t: (B,) -> (B, d)."""
        return sample_vmf(spin0, self.kappa(t), generator=generator)

    def conditional_score(self, spin_t: Tensor, spin0: Tensor, t: Tensor) -> Tensor:
        """grad_{S_t} log q(S_t | S_0) = kappa(t) P_{S_t} S_0. (B, d)."""
        return self.kappa(t)[:, None] * self.geometry.proju(spin_t, spin0)

    def score_scale(self, t: Tensor) -> Tensor:
        """sqrt(E|cond. score|^2 / (d-1)) = sqrt(kappa A_d(kappa)) = sqrt(kappa m). t: (B,) -> (B,).

        For vMF, E|kappa P_x mu|^2 = kappa^2 (1 - E[x^2]) = (d-1) kappa A_d(kappa). The score network
        predicts score / score_scale (unit scale per tangent direction).
        """
        return torch.sqrt(self.kappa(t) * self.mean_cosine(t))

    def sample_time(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None, stratified: bool = True) -> Tensor:
        """n training times in [t_eps, T] (stratified: one per stratum, random offset). (n,)."""
        if stratified:
            u0 = torch.rand((), dtype=torch.float64, generator=generator)
            u = (u0 + torch.arange(n, dtype=torch.float64) / n) % 1.0
            u = u[torch.randperm(n, generator=generator)]
        else:
            u = torch.rand(n, dtype=torch.float64, generator=generator)
        return (self.t_eps + (self.T - self.t_eps) * u).to(dtype=dtype, device=device)

    # ---------------------------------------------------------------- reverse
    def reverse(self, score_fn: ScoreFn | None = None, field: Tensor | None = None, eta: float = 0.0,
                lam: float = math.inf, probability_flow: bool = False) -> "ReverseLLGSDE":
        """The reverse-time SDE (see :class:`ReverseLLGSDE`)."""
        return ReverseLLGSDE(self, score_fn, field=field, eta=eta, lam=lam, probability_flow=probability_flow)


class ReverseLLGSDE(SphereSDE):
    """Reverse-time SDE with score, LLG damping and precession, in reverse time tau = T - t.

    tangent drift(tau, S) = c beta(t) score_fn(S, t) + eta P_S N + (eta/lam) Prec(S, N),
    c = 1 (SDE) or 1/2 (probability flow), t = T - tau; noise sqrt(beta(t)) P_S dW (0 for the
    probability flow). Integrate over tau in [0, T - t_eps] (``tau_end``).

    Args:
        forward: the forward :class:`BrownianSphereSDE` (schedule, T, t_eps, geometry).
        score_fn: (S (B, d), t (B,)) -> score (B, d); ``None`` means score 0.
        field: context field N, (B, d) or (d,); ``None`` means no field term.
        eta: damping strength >= 0.
        lam: Gilbert damping lambda > 0 (``math.inf``: overdamped, no precession).
        probability_flow: deterministic probability-flow ODE instead of the reverse SDE.
    """

    def __init__(self, forward: BrownianSphereSDE, score_fn: ScoreFn | None = None,
                 field: Tensor | None = None, eta: float = 0.0, lam: float = math.inf,
                 probability_flow: bool = False) -> None:
        super().__init__(forward.dim, forward.sde_type, forward.geometry)
        if eta < 0 or not lam > 0:
            raise ValueError("need eta >= 0 and lam > 0")
        self.forward = forward
        self.score_fn = score_fn
        self.field = field
        self.eta = float(eta)
        self.lam = float(lam)
        self.probability_flow = bool(probability_flow)
        self.T = forward.T
        self.tau_end = forward.T - forward.t_eps

    def __repr__(self) -> str:
        return (f"ReverseLLGSDE(eta={self.eta}, lam={self.lam}, probability_flow={self.probability_flow}, "
                f"field={'yes' if self.field is not None else 'no'}, forward={self.forward!r})")

    def physical_time(self, tau: float | Tensor, like: Tensor) -> Tensor:
        """t = T - tau as (B,)."""
        return self.T - _batch_time(tau, like)

    def field_drift(self, spin: Tensor) -> Tensor:
        """eta P_S N + (eta/lam) Prec(S, N) (zero without a field). (B, d)."""
        if self.field is None or self.eta == 0:
            return torch.zeros_like(spin)
        return llg_field_drift(spin, self.field.expand_as(spin), self.eta, self.lam, self.geometry)

    def tangent_drift(self, tau: float | Tensor, spin: Tensor) -> Tensor:
        out = self.field_drift(spin)  # (B, d)
        if self.score_fn is not None:
            t = self.physical_time(tau, spin)  # (B,)
            c = 0.5 if self.probability_flow else 1.0
            beta = self.forward.beta(t)  # (B,)
            out = out + (c * beta)[:, None] * self.score_fn(spin, t)
        return out

    def diffusion(self, tau: float | Tensor, spin: Tensor) -> Tensor:
        if self.probability_flow:
            return torch.zeros(spin.shape[0], dtype=spin.dtype, device=spin.device)
        return torch.sqrt(self.forward.beta(self.physical_time(tau, spin)))  # (B,)

    def prior_sampling(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        return self.forward.prior_sampling(n, dtype=dtype, device=device, generator=generator)
