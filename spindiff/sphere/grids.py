"""Reverse-time grids: where the integrator spends its steps.

The reverse SDE runs over tau = T - t in [0, T - t_eps]. With the vMF noising family the score of
a discrete prior is kappa(t) P_S (posterior mean) and the drift beta kappa grows like 1/s(t) near
t_eps (kappa(t_eps) ~ 1e6 for the default schedule). What each step sees, in terms of the
concentration kappa:

* kappa << sqrt(d): p_t is nearly uniform, the posterior is the prior;
* kappa ~ sqrt(d) .. d: the posterior leaves the prior ("speciation"): the token is decided here;
* kappa >> d: the spin collapses onto the chosen token; an Euler step moves the fraction
  d log s of the remaining angle, so it must stay below 2 (EM) and well below that for Heun.

A uniform tau grid spends almost all steps before speciation and takes the collapse in one or two
huge steps (Heun diverges there); a grid uniform in log kappa resolves the collapse but puts too
few steps in [1, d]. Grids are named coordinates c(t) of the forward time, and the n + 1 points
are uniform in c between c(T) and c(t_eps):

==============  ==================================================================================
``uniform``     c = t (the old default)
``log_kappa``   c = log kappa(t)
``log_s``       c = log s(t), s = int beta
``speciation``  c = log(kappa + kappa_0) with kappa_0 = sqrt(d): uniform in kappa below kappa_0 and
                in log kappa above it, so every range of the table above gets steps
==============  ==================================================================================
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["GRIDS", "register_grid", "reverse_grid", "exit_time"]

Coordinate = Callable[[Any, np.ndarray], np.ndarray]  # (forward sde, t (n,)) -> c(t) (n,), monotone


def _kappa(sde: Any, t: np.ndarray) -> np.ndarray:
    return sde.kappa(torch.as_tensor(t, dtype=torch.float64)).numpy()


GRIDS: dict[str, Coordinate] = {
    "uniform": lambda sde, t: t,
    "log_kappa": lambda sde, t: np.log(_kappa(sde, t)),
    "log_s": lambda sde, t: np.log(sde.schedule.integral(torch.as_tensor(t, dtype=torch.float64)).numpy()),
    "speciation": lambda sde, t: np.log(_kappa(sde, t) + math.sqrt(sde.dim)),
}


def register_grid(name: str, coordinate: Coordinate) -> None:
    """Add a grid: ``coordinate(sde, t)`` must be monotone in t on [t_eps, T]."""
    GRIDS[name] = coordinate


def exit_time(sde: Any, kappa: float, table: int = 4097) -> float:
    """The forward time t in [t_eps, T] with kappa(t) = ``kappa`` (t_eps when kappa(t_eps) < kappa,
    T when kappa(T) > kappa): log kappa interpolated on a geometric table of times."""
    T, eps = float(sde.T), float(sde.t_eps)
    t = np.unique(np.concatenate([np.geomspace(eps, T, table), np.linspace(eps, T, table)]))
    log_k = np.log(_kappa(sde, t))  # decreasing in t
    return float(np.interp(math.log(float(kappa)), log_k[::-1], t[::-1]))


def reverse_grid(sde: Any, steps: int, kind: str = "speciation", table: int = 4097,
                 end_kappa: float | None = None) -> list[float]:
    """steps + 1 increasing reverse times tau_0 = 0 < ... < tau_n = T - t_end. (n + 1,) floats.

    sde: the forward :class:`spindiff.sphere.sde.BrownianSphereSDE` (T, t_eps, schedule, kappa).
    t_end = t_eps, or with ``end_kappa`` the time where kappa(t) = end_kappa (:func:`exit_time`):
    an early exit that spends every step before it. The points are uniform in the coordinate
    ``GRIDS[kind]``, inverted by interpolation on a table of ``table`` forward times (geometric
    near t_eps, where every coordinate but ``uniform`` varies fastest).
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown grid '{kind}'; choose one of {sorted(GRIDS)}")
    if int(steps) < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    T = float(sde.T)
    eps = float(sde.t_eps) if end_kappa is None else max(float(sde.t_eps), exit_time(sde, end_kappa, table))
    if not eps < T:
        raise ValueError(f"end_kappa={end_kappa} is reached at t = T: nothing to integrate")
    t = np.unique(np.concatenate([np.geomspace(eps, T, table), np.linspace(eps, T, table)]))
    c = GRIDS[kind](sde, t)
    if not (np.all(np.diff(c) > 0) or np.all(np.diff(c) < 0)):
        raise ValueError(f"grid '{kind}' is not monotone in t for this schedule")
    order = np.argsort(c)
    targets = np.linspace(c[-1], c[0], int(steps) + 1)  # from t = T (tau = 0) to t = t_end
    ts = np.interp(targets, c[order], t[order])
    ts[0], ts[-1] = T, eps
    tau = [T - float(x) for x in ts]
    tau[0], tau[-1] = 0.0, T - eps
    for a, b in zip(tau, tau[1:]):
        if not b > a:
            raise ValueError(f"grid '{kind}' with {steps} steps has repeated points; use fewer steps")
    return tau
