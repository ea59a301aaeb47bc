"""Noise schedules beta(t) on [0, T] for Brownian motion on S^{d-1}.

Brownian motion with generator (beta/2) Laplacian on S^{d-1} has E[S_t . S_0] = exp(-(d-1) s(t) / 2),
s(t) = int_0^t beta (the coordinate functions are Laplacian eigenfunctions with eigenvalue -(d-1)).
A schedule made for S^2 therefore destroys the signal (d-1)/2 ~ 300 times faster at d = 576.
Every schedule here is a *base* schedule beta_0(t) (the usual VP values) times a scale:
``dim_scaled=True`` (default) uses scale = 2/(d-1), so that

    E[S_t . S_0] = exp(-signal_decay(t)),   signal_decay(t) = (d-1)/2 * s(t) = int_0^t beta_0,

the same decay at every d, and (d-1) beta dt = 2 beta_0 dt per step.

E[S_t . S_0] for the default ``linear`` schedule (beta_0 from 0.1 to 20, T = 1), computed by
``mean_cosine`` in float64 (tests/test_schedules.py parses this table and checks it against the
code; "unscaled" = the same beta used on S^{d-1} without the 2/(d-1) factor):

    ======  ============  ============  ==============  ==============
    t       d=576 scaled  d=768 scaled  d=576 unscaled  d=768 unscaled
    ======  ============  ============  ==============  ==============
    0.10    0.8963        0.8963        2.127e-14       5.788e-19
    0.25    0.5237        0.5237        1.704e-81       1.827e-108
    0.50    0.07906       0.07906       1.474e-317      0
    0.75    0.003441      0.003441      0               0
    1.00    4.319e-05     4.319e-05     0               0
    ======  ============  ============  ==============  ==============

(The scaled columns agree because the scale removes d; with beta made for S^2 the signal is gone
before t = 0.1.) Uniformity at t = T also holds: for a point mass the chi^2 distance to uniform is
dominated by the first harmonic, d * E[S_T . S_0]^2 ~ 1e-6 at d = 576.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "ConstantSchedule",
    "SCHEDULES",
    "register_schedule",
    "make_schedule",
    "schedule_from_config",
]

TimeLike = float | Tensor


def _as_tensor(t: TimeLike) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


class NoiseSchedule(ABC):
    """beta(t) = scale * beta_0(t) on [0, T], with s(t) = int_0^t beta and its inverse.

    Subclasses define the base rate ``base_beta`` and its integral ``base_integral`` (and the
    inverse ``base_integral_inverse``); t is a float or a tensor of any shape (elementwise).

    Args:
        dim: ambient dimension d of S^{d-1}.
        T: final time.
        dim_scaled: multiply the base rate by 2/(d-1) (see the module docstring).
    """

    def __init__(self, dim: int, T: float = 1.0, dim_scaled: bool = True) -> None:
        if dim < 2:
            raise ValueError("dim must be >= 2 (S^{d-1} with d >= 2)")
        self.dim = int(dim)
        self.T = float(T)
        self.dim_scaled = bool(dim_scaled)
        self.scale = 2.0 / (dim - 1) if dim_scaled else 1.0

    # -- base schedule (dimensionless signal decay rate) --
    @abstractmethod
    def base_beta(self, t: Tensor) -> Tensor:
        """beta_0(t)."""

    @abstractmethod
    def base_integral(self, t: Tensor) -> Tensor:
        """int_0^t beta_0."""

    @abstractmethod
    def base_integral_inverse(self, s0: Tensor) -> Tensor:
        """t such that base_integral(t) = s0."""

    # -- the schedule actually used --
    def beta(self, t: TimeLike) -> Tensor:
        """beta(t) = scale * beta_0(t)."""
        return self.scale * self.base_beta(_as_tensor(t))

    def integral(self, t: TimeLike) -> Tensor:
        """s(t) = int_0^t beta."""
        return self.scale * self.base_integral(_as_tensor(t))

    def integral_inverse(self, s: TimeLike) -> Tensor:
        """t with s(t) = s."""
        return self.base_integral_inverse(_as_tensor(s) / self.scale)

    def signal_decay(self, t: TimeLike) -> Tensor:
        """-log E[S_t . S_0] = (d-1)/2 * s(t) for Brownian motion on S^{d-1}."""
        return 0.5 * (self.dim - 1) * self.integral(t)

    def mean_cosine(self, t: TimeLike) -> Tensor:
        """E[S_t . S_0] = exp(-(d-1) s(t) / 2)."""
        return torch.exp(-self.signal_decay(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, T={self.T}, dim_scaled={self.dim_scaled})"


class LinearSchedule(NoiseSchedule):
    """beta_0(t) = beta_min + (beta_max - beta_min) t / T (the VP-SDE default 0.1 -> 20)."""

    def __init__(self, dim: int, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0,
                 dim_scaled: bool = True) -> None:
        super().__init__(dim, T, dim_scaled)
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError("need 0 <= beta_min <= beta_max, beta_max > 0")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def base_beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t / self.T

    def base_integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t / self.T

    def base_integral_inverse(self, s0: Tensor) -> Tensor:
        a = 0.5 * (self.beta_max - self.beta_min) / self.T
        b = self.beta_min
        if a == 0:
            return s0 / b
        # stable root of a t^2 + b t - s0 = 0: t = 2 s0 / (b + sqrt(b^2 + 4 a s0))
        return 2.0 * s0 / (b + torch.sqrt(b * b + 4.0 * a * s0))


class ConstantSchedule(LinearSchedule):
    """beta_0(t) = beta (a linear schedule with beta_min = beta_max)."""

    def __init__(self, dim: int, beta: float = 10.0, T: float = 1.0, dim_scaled: bool = True,
                 **_: Any) -> None:
        super().__init__(dim, beta, beta, T, dim_scaled)


class CosineSchedule(NoiseSchedule):
    """Cosine decay of the signal (Nichol & Dhariwal): E[S_t.S_0] = cos^2(a(t)) / cos^2(a(0)),

    a(t) = (pi/2) (c t/T + s) / (1 + s), with c < 1 chosen so that the decay at t = T equals
    ``decay_T`` (default 10, E[S_T.S_0] = 4.5e-5 like the linear default) instead of diverging.
    base_integral(t) = 2 log cos a(0) - 2 log cos a(t); beta_0 = pi c tan(a(t)) / (T (1 + s)).
    """

    def __init__(self, dim: int, T: float = 1.0, dim_scaled: bool = True, s: float = 0.008,
                 decay_T: float = 10.0, **_: Any) -> None:
        super().__init__(dim, T, dim_scaled)
        self.s, self.decay_T = float(s), float(decay_T)
        a0 = 0.5 * math.pi * self.s / (1 + self.s)
        a_T = math.acos(math.exp(-0.5 * self.decay_T) * math.cos(a0))
        self._a0 = a0
        self._c = (a_T * 2 * (1 + self.s) / math.pi - self.s)  # c with a(T) = a_T

    def _a(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (self._c * t / self.T + self.s) / (1 + self.s)

    def base_beta(self, t: Tensor) -> Tensor:
        return math.pi * self._c * torch.tan(self._a(t)) / (self.T * (1 + self.s))

    def base_integral(self, t: Tensor) -> Tensor:
        return (2.0 * math.log(math.cos(self._a0)) - 2.0 * torch.log(torch.cos(self._a(t)))).clamp_min(0.0)

    def base_integral_inverse(self, s0: Tensor) -> Tensor:
        a = torch.acos(torch.exp(-0.5 * s0) * math.cos(self._a0))
        return (a * 2 * (1 + self.s) / math.pi - self.s) * self.T / self._c


SCHEDULES: dict[str, Callable[..., NoiseSchedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "constant": ConstantSchedule,
}


def register_schedule(name: str, factory: Callable[..., NoiseSchedule]) -> None:
    """Add a schedule to the registry used by :func:`make_schedule`."""
    SCHEDULES[name] = factory


def make_schedule(name: str, dim: int, **kw: Any) -> NoiseSchedule:
    """Build schedule ``name`` for S^{dim-1}; keyword arguments go to its constructor."""
    try:
        factory = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule '{name}'; choose one of {sorted(SCHEDULES)}") from None
    return factory(dim, **kw)


def schedule_from_config(cfg: Any, dim: int) -> NoiseSchedule:
    """Schedule from an ``SDEConfig`` (fields schedule, beta_min, beta_max, dim_scaled, T)."""
    kw: dict[str, Any] = {"T": cfg.T, "dim_scaled": cfg.dim_scaled}
    if cfg.schedule == "linear":
        kw.update(beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    elif cfg.schedule == "constant":
        kw.update(beta=cfg.beta_max)
    return make_schedule(cfg.schedule, dim, **kw)
