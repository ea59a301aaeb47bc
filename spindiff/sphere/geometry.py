"""Geometry of the token sphere S^{d-1}: a thin layer over an injected ``geoopt.Sphere``.

A token is a unit spin ``S`` in R^d (d = 576 for SmolLM2-135M, 768 for GPT-2). Everything that
projects, moves along or measures on the sphere goes through :class:`SphereGeometry`, which wraps
a ``geoopt.Sphere`` instance handed to it (the manifold is injected, never created in here unless
the caller passes ``None``).

What comes from geoopt and what does not:

* ``proju`` (tangent projection P_S = I - S S^T), ``projx`` (normalisation), ``expmap``,
  ``retr``, ``transp`` and ``random_uniform`` are the injected manifold's own. ``expmap`` is
  geoopt's followed by geoopt's ``projx`` (the renormalisation is the identity in exact
  arithmetic and stops the O(eps) rounding of cos/sin accumulating over many steps).
  ``random_uniform`` with a ``torch.Generator`` calls geoopt's ``random_uniform`` (which has no
  generator argument) inside ``torch.random.fork_rng`` seeded from the generator: reproducible,
  and the caller's global RNG is untouched.
* ``logmap`` and ``dist`` are ours: geoopt computes ``dist = acos(clamp(S.y, -1+eps, 1-eps))``
  with eps = 1e-4 in float32 (1e-7 in float64), so in float32 every angle below
  acos(1 - 1e-4) ~ 0.014 rad reads as 0.014 rad (and antipodal angles as pi - 0.014), and acos
  itself loses half the digits near 0 and pi. We use theta = atan2(|P_S y|, S.y), which is
  accurate to rounding at every angle in [0, pi] in both precisions (measured against geoopt's in
  tests/test_geometry.py).
* :func:`nearest_token` decodes with one matmul (argmax of cosine), never a loop or ``dist``.
* :func:`precession` is the LLG precession direction: the exact cross product for d = 3 and the
  complex-structure generalisation for d > 3 (see its docstring and docs/diffusion.md).
"""
from __future__ import annotations

import geoopt
import torch
from torch import Tensor

__all__ = [
    "SphereGeometry",
    "nearest_token",
    "apply_complex_structure",
    "precession",
]


class SphereGeometry:
    """Sphere operations on batches of spins ``S`` of shape ``(..., d)``, ``|S| = 1``.

    Args:
        manifold: the ``geoopt.Sphere`` to use (``None``: a plain ``geoopt.Sphere()``).
    """

    def __init__(self, manifold: geoopt.Sphere | None = None) -> None:
        if manifold is None:
            manifold = geoopt.Sphere()
        if not isinstance(manifold, geoopt.Sphere):
            raise TypeError(f"expected a geoopt.Sphere, got {type(manifold).__name__}")
        self.manifold = manifold

    def __repr__(self) -> str:
        return f"SphereGeometry({self.manifold!r})"

    # ------------------------------------------------------------------ geoopt's own
    def proju(self, spin: Tensor, u: Tensor) -> Tensor:
        """Tangent projection P_S u = u - (S.u) S. spin, u: (..., d) -> (..., d)."""
        return self.manifold.proju(spin, u)

    def projx(self, x: Tensor) -> Tensor:
        """Radial projection x / |x| onto the sphere. (..., d) -> (..., d)."""
        return self.manifold.projx(x)

    def expmap(self, spin: Tensor, u: Tensor) -> Tensor:
        """Exponential map exp_S(u) = S cos|u| + u sin|u|/|u| for tangent u (geoopt's), renormalised
        by geoopt's ``projx``. (..., d) -> (..., d)."""
        return self.manifold.projx(self.manifold.expmap(spin, u))

    def retr(self, spin: Tensor, u: Tensor) -> Tensor:
        """Retraction projx(S + u). (..., d) -> (..., d)."""
        return self.manifold.retr(spin, u)

    def transp(self, spin: Tensor, target: Tensor, v: Tensor) -> Tensor:
        """Vector transport by projection onto T_target. (..., d) -> (..., d)."""
        return self.manifold.transp(spin, target, v)

    # ------------------------------------------------------------------ our own (accuracy)
    def angle_parts(self, spin: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u, |u|, cos) with u = P_S y (..., d), |u| = sin(theta) (..., 1), cos = S.y (..., 1)."""
        cos = (spin * y).sum(-1, keepdim=True)  # (..., 1)
        u = y - cos * spin  # (..., d) = P_S y
        return u, u.norm(dim=-1, keepdim=True), cos

    def dist(self, spin: Tensor, y: Tensor, keepdim: bool = False) -> Tensor:
        """Geodesic distance theta = atan2(|P_S y|, S.y) in [0, pi]. (..., d) -> (...,).

        Accurate to rounding at small angles and near antipodes (geoopt's float32 ``dist``
        clamps at 1 - 1e-4, i.e. never reports an angle below ~0.014 rad).
        """
        _, sin, cos = self.angle_parts(spin, y)
        theta = torch.atan2(sin, cos)  # (..., 1)
        return theta if keepdim else theta.squeeze(-1)

    def logmap(self, spin: Tensor, y: Tensor) -> Tensor:
        """Log map log_S(y) = theta * P_S y / |P_S y|, theta = atan2(|P_S y|, S.y). (..., d).

        Small angles: theta/|P_S y| -> 1 and the result is P_S y to rounding (no 0/0, no acos).
        Near-antipodal: theta -> pi with the direction of P_S y, which stays resolved while
        |P_S y| is above rounding; at exactly y = -S the direction is undefined and the
        result is 0-length (the only point where the log map does not exist).
        """
        u, sin, cos = self.angle_parts(spin, y)
        theta = torch.atan2(sin, cos)  # (..., 1)
        tiny = torch.finfo(u.dtype).tiny
        ratio = torch.where(sin > tiny, theta / sin.clamp_min(tiny), torch.ones_like(sin))
        return ratio * u  # (..., d)

    def inner(self, u: Tensor, v: Tensor) -> Tensor:
        """Euclidean (= Riemannian) inner product of tangent vectors. (..., d) -> (...,)."""
        return (u * v).sum(-1)

    def random_uniform(
        self,
        *size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Uniform samples on the sphere, shape ``size`` (last entry = d): geoopt's
        ``random_uniform`` (normalised Gaussians), seeded from ``generator`` when one is given."""
        if generator is None:
            return self.manifold.random_uniform(*size, dtype=dtype, device=device).as_subclass(Tensor)
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
            torch.manual_seed(seed)
            return self.manifold.random_uniform(*size, dtype=dtype, device=device).as_subclass(Tensor)

    def tangent_normal(
        self, spin: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard Gaussian in the tangent space at ``spin``: P_S xi, xi ~ N(0, I_d). (..., d)."""
        xi = torch.randn(spin.shape, dtype=spin.dtype, device=spin.device, generator=generator)
        return self.proju(spin, xi)


def nearest_token(spin: Tensor, embed_unit: Tensor) -> Tensor:
    """Nearest token by cosine: argmax_v S . e_v, one matmul.

    Args:
        spin: (B, d) or (d,) unit spins.
        embed_unit: (V, d) unit-normalised token embeddings.
    Returns:
        (B,) or () int64 token ids.
    """
    scores = spin @ embed_unit.transpose(-1, -2)  # (B, V)
    return scores.argmax(dim=-1)


def apply_complex_structure(x: Tensor) -> Tensor:
    """Fixed complex structure J on R^d: (x_{2k}, x_{2k+1}) -> (-x_{2k+1}, x_{2k}).

    J is block-diagonal with 2x2 rotation generators [[0, -1], [1, 0]]; J^T = -J and J^2 = -I on
    the first 2*floor(d/2) coordinates. For odd d the last axis is mapped to 0.
    x: (..., d) -> (..., d).
    """
    d = x.shape[-1]
    m = d - d % 2
    pairs = x[..., :m].unflatten(-1, (m // 2, 2))  # (..., d//2, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., m)
    if m == d:
        return rotated
    return torch.cat((rotated, torch.zeros_like(x[..., m:])), dim=-1)


def precession(spin: Tensor, field: Tensor, geometry: SphereGeometry) -> Tensor:
    """LLG precession direction Prec(S, N), tangent at S and orthogonal to P_S N.

    d = 3: Prec = -S x N exactly (the physical Larmor term).
    d > 3: Prec = -P_S J P_S N with the fixed complex structure J of
    :func:`apply_complex_structure`. It is tangent (P_S in front) and orthogonal to
    u = P_S N because u . P_S J u = u . J u = 0 (J antisymmetric); |Prec| <= |P_S N|.
    d = 2: J is the 90-degree rotation, so Prec = -J P_S N (the same formula).

    spin, field: (B, d) -> (B, d).
    """
    d = spin.shape[-1]
    if d == 3:
        return -torch.linalg.cross(spin, field.expand_as(spin), dim=-1)
    u = geometry.proju(spin, field)  # (B, d)
    return -geometry.proju(spin, apply_complex_structure(u))
