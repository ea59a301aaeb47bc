"""Sphere-preserving integrators for :class:`spindiff.sphere.sde.SphereSDE`, driven by torchsde Brownian paths.

torchsde's solvers are Euclidean (y + f dt + g dW has no projection hook), so an Ito Euler step of
dS = -(d-1)/2 beta S dt + sqrt(beta) P_S dW changes |S| by O(((d-1) beta dt)^2) per step, which is
O(1) at d in the hundreds (bench/bench_integrators.py). Here every step is an exponential-map
step (:meth:`SphereGeometry.expmap`, renormalised), so |S| = 1 holds by construction to rounding
at any step size:

* ``geodesic_em`` (Ito / intrinsic Euler-Maruyama):
  S <- exp_S(a(t, S) h + sigma(t) P_S dW). The curvature of exp_S supplies the Ito drift
  -(d-1)/2 sigma^2 S h (|P_S dW|^2 ~ (d-1) h), so the step uses the *tangent* drift a.
* ``geodesic_midpoint`` (Stratonovich): v = a h + sigma P_S dW at S; M = exp_S(v/2);
  S <- exp_S(P_S [a(t+h/2, M) h + sigma(t+h/2) P_M dW]).
* ``geodesic_heun`` (Stratonovich): v1 at S; S* = exp_S(v1); v2 at S*;
  S <- exp_S((v1 + P_S v2)/2).

The midpoint/Heun tangent vectors at M or S* are brought back to T_S by projection; projection
differs from parallel transport by O(|v|^2) relative, so deterministic drift keeps order 2.
With noise sigma P_S dW (non-commutative: sum_l b_lj d_l b_ik != sum_l b_lk d_l b_ij) all three
have strong order 1/2 without Levy areas; tests/test_integrators.py measures the slopes.

The Brownian increments come from a ``torchsde.BrownianInterval`` (or ``BrownianTree``) queried
as ``bm(t0, t1)``, so the same path is replayed at any step size (strong convergence tests).
Step functions are chosen by name from :data:`INTEGRATORS` (``get_integrator``; config key
``sampler.method``), never by if/elif chains.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torchsde
from torch import Tensor

from spindiff.sphere.geometry import SphereGeometry

__all__ = [
    "StepFn",
    "INTEGRATORS",
    "register_integrator",
    "get_integrator",
    "geodesic_em_step",
    "geodesic_midpoint_step",
    "geodesic_heun_step",
    "make_brownian",
    "GaussianIncrements",
    "integrate",
    "sample",
]


class TangentSDE(Protocol):
    """What the integrators need: ``tangent_drift(t, S)`` (B, d), ``diffusion(t, S)`` (B,), ``geometry``."""

    geometry: SphereGeometry
    dim: int

    def tangent_drift(self, t: float | Tensor, spin: Tensor) -> Tensor: ...

    def diffusion(self, t: float | Tensor, spin: Tensor) -> Tensor: ...


StepFn = Callable[[TangentSDE, float, float, Tensor, Tensor], Tensor]


def _increment(sde: TangentSDE, t: float, h: float, spin: Tensor, dw: Tensor) -> Tensor:
    """a(t, S) h + sigma(t) P_S dW, tangent at S. (B, d)."""
    a = sde.tangent_drift(t, spin)  # (B, d)
    sig = sde.diffusion(t, spin)  # (B,)
    return torch.add(sig[:, None] * sde.geometry.proju(spin, dw), a, alpha=h)  # (B, d)


def geodesic_em_step(sde: TangentSDE, t0: float, t1: float, spin: Tensor, dw: Tensor) -> Tensor:
    """exp_S(a(t0, S) h + sigma(t0) P_S dW), h = t1 - t0. spin, dw: (B, d) -> (B, d)."""
    return sde.geometry.expmap(spin, _increment(sde, t0, t1 - t0, spin, dw))


def geodesic_midpoint_step(sde: TangentSDE, t0: float, t1: float, spin: Tensor, dw: Tensor) -> Tensor:
    """Stratonovich geodesic midpoint step (see module docstring). (B, d) -> (B, d)."""
    h = t1 - t0
    geo = sde.geometry
    mid = geo.expmap(spin, 0.5 * _increment(sde, t0, h, spin, dw))  # (B, d)
    v_mid = _increment(sde, t0 + 0.5 * h, h, mid, dw)  # (B, d) tangent at mid
    return geo.expmap(spin, geo.proju(spin, v_mid))


def geodesic_heun_step(sde: TangentSDE, t0: float, t1: float, spin: Tensor, dw: Tensor) -> Tensor:
    """Stratonovich geodesic Heun step (see module docstring). (B, d) -> (B, d)."""
    h = t1 - t0
    geo = sde.geometry
    v1 = _increment(sde, t0, h, spin, dw)  # (B, d)
    pred = geo.expmap(spin, v1)
    v2 = _increment(sde, t1, h, pred, dw)  # (B, d) tangent at pred
    return geo.expmap(spin, 0.5 * (v1 + geo.proju(spin, v2)))


INTEGRATORS: dict[str, StepFn] = {
    "geodesic_em": geodesic_em_step,
    "geodesic_midpoint": geodesic_midpoint_step,
    "geodesic_heun": geodesic_heun_step,
}


def register_integrator(name: str, step: StepFn) -> None:
    """Add a step function to the registry."""
    INTEGRATORS[name] = step


def get_integrator(name: str) -> StepFn:
    """The step function registered as ``name``."""
    try:
        return INTEGRATORS[name]
    except KeyError:
        raise ValueError(f"unknown integrator '{name}'; choose one of {sorted(INTEGRATORS)}") from None


BrownianLike = Callable[[float, float], Tensor]  # (ta, tb) -> W(tb) - W(ta), (B, d)


def make_brownian(
    batch: int, dim: int, t0: float, t1: float, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None, seed: int | None = None, tol: float | None = None,
    dt: float | None = None,
) -> torchsde.BrownianInterval:
    """A torchsde Brownian path W on [t0, t1] of size (batch, dim); same ``seed`` = same path.

    ``tol`` sets the interval's rounding tolerance (default 1e-9 of the span, so that queries on
    nested grids resolve to the same points); ``dt`` is torchsde's hint for the typical query
    step (about 2x faster sequential queries).
    """
    tol = 1e-9 * (t1 - t0) if tol is None else tol
    kw = {} if dt is None else {"dt": dt}
    return torchsde.BrownianInterval(
        t0=t0, t1=t1, size=(batch, dim), dtype=dtype, device=device, entropy=seed,
        levy_area_approximation="none", tol=tol, **kw,
    )


class GaussianIncrements(torchsde.BaseBrownian):
    """Independent N(0, (tb - ta) I) increments of size (batch, dim): a torchsde Brownian object
    for one pass over increasing, non-overlapping queries only (no replay at another step size,
    no Levy area; ``torchsde.sdeint`` accepts it as ``bm`` for such a pass).

    torchsde's ``BrownianInterval`` samples Brownian bridges in a binary tree so that any query
    is consistent with every other; that costs ~5-20x a ``randn`` of the same size (~10x at the
    spin sampler's (8, 576) per step). Use this where nothing is replayed (the per-token sampler
    loop, large Monte Carlo runs); use :func:`make_brownian` otherwise.

    ``generator``: draw from this ``torch.Generator`` (shared with the caller); else a new one
    seeded by ``seed``.
    """

    def __init__(self, batch: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        self._shape = (batch, dim)
        self._dtype, self._device = dtype, device
        if generator is None:
            generator = torch.Generator(device=device or "cpu")
            generator.manual_seed(seed) if seed is not None else generator.seed()
        self.generator = generator
        self._last = -math.inf

    def __call__(self, ta, tb=None, return_U=False, return_A=False) -> Tensor:
        if tb is None or return_U or return_A:
            raise ValueError("GaussianIncrements gives increments W(tb) - W(ta) only (no W(t), no Levy area)")
        ta, tb = float(ta), float(tb)
        if not (tb > ta and ta >= self._last - 1e-12 * max(1.0, abs(ta))):
            raise ValueError(f"GaussianIncrements takes increasing, non-overlapping queries; got ({ta}, {tb}) "
                             f"after one ending at {self._last} (use make_brownian to replay a path)")
        self._last = tb
        z = torch.randn(self._shape, dtype=self._dtype, device=self._device, generator=self.generator)
        return z * math.sqrt(tb - ta)

    def __repr__(self) -> str:
        return f"GaussianIncrements(shape={self._shape}, dtype={self._dtype})"

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self._device or "cpu")

    @property
    def levy_area_approximation(self) -> str:
        return "none"


def integrate(
    sde: TangentSDE,
    spin0: Tensor,
    ts: Tensor | list[float],
    method: str = "geodesic_em",
    bm: BrownianLike | None = None,
    seed: int | None = None,
    return_path: bool = False,
) -> Tensor:
    """Integrate on the grid ``ts`` (strictly increasing, the SDE's own time variable).

    Args:
        sde: a :class:`spindiff.sphere.sde.SphereSDE` (forward time t or reverse time tau).
        spin0: (B, d) initial unit spins.
        ts: (n + 1,) time grid.
        method: step function name (:data:`INTEGRATORS`).
        bm: Brownian path of size (B, d) covering [ts[0], ts[-1]] (a torchsde Brownian object or
            :class:`GaussianIncrements`); a ``BrownianInterval`` from ``seed`` if None.
        seed: entropy for a new Brownian path.
        return_path: return all grid values (n + 1, B, d) instead of the last (B, d).
    """
    step = get_integrator(method)
    grid = [float(t) for t in ts]
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError("ts must be strictly increasing")
    if bm is None:
        bm = make_brownian(spin0.shape[0], spin0.shape[-1], grid[0], grid[-1], spin0.dtype, spin0.device, seed,
                           dt=(grid[-1] - grid[0]) / (len(grid) - 1))
    spin = spin0
    path = [spin0] if return_path else None
    for t0, t1 in zip(grid[:-1], grid[1:]):
        spin = step(sde, t0, t1, spin, bm(t0, t1))  # (B, d)
        if path is not None:
            path.append(spin)
    return torch.stack(path) if path is not None else spin


def sample(
    reverse_sde: TangentSDE,
    n: int,
    steps: int = 100,
    method: str = "geodesic_em",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int | None = None,
    spin_T: Tensor | None = None,
    replayable: bool = True,
) -> Tensor:
    """Draw S_T from the prior (or take ``spin_T``) and integrate a reverse SDE over
    tau in [0, tau_end] with ``steps`` uniform steps. Returns S at tau_end (t = t_eps), (n, d).

    ``reverse_sde`` needs ``prior_sampling`` and ``tau_end`` (a :class:`spindiff.sphere.sde.ReverseLLGSDE`).
    ``replayable=True`` drives it with a torchsde ``BrownianInterval`` (the same ``seed`` gives the
    same Brownian path at any ``steps``); False uses cheaper :class:`GaussianIncrements`.
    """
    gen = torch.Generator(device=device or "cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    if spin_T is None:
        spin_T = reverse_sde.prior_sampling(n, dtype=dtype, device=device, generator=gen)  # type: ignore[attr-defined]
    n = spin_T.shape[0]
    tau_end = float(reverse_sde.tau_end)  # type: ignore[attr-defined]
    ts = torch.linspace(0.0, tau_end, steps + 1, dtype=torch.float64)
    bm_seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    if replayable:
        bm: BrownianLike = make_brownian(n, spin_T.shape[-1], 0.0, tau_end, dtype, device, bm_seed, dt=tau_end / steps)
    else:
        bm = GaussianIncrements(n, spin_T.shape[-1], dtype, device, bm_seed)
    return integrate(reverse_sde, spin_T, ts, method=method, bm=bm)
