"""Sphere geometry: projections, exp/log maps at small and near-antipodal angles, decoding, precession."""
from __future__ import annotations

import math

import geoopt
import pytest
import torch

from spindiff.sphere.geometry import SphereGeometry, apply_complex_structure, nearest_token, precession

F64 = torch.float64


@pytest.fixture
def geo() -> SphereGeometry:
    return SphereGeometry(geoopt.Sphere())


def _pair_at_angle(theta: float, d: int, dtype: torch.dtype, seed: int = 0):
    """(S, y, e) with y = S cos(theta) + e sin(theta), e a unit tangent at S (built in float64)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(4, d, dtype=F64, generator=gen)
    s = s / s.norm(dim=-1, keepdim=True)
    e = torch.randn(4, d, dtype=F64, generator=gen)
    e = e - (e * s).sum(-1, keepdim=True) * s
    e = e / e.norm(dim=-1, keepdim=True)
    y = s * math.cos(theta) + e * math.sin(theta)
    return s.to(dtype), y.to(dtype), e.to(dtype)


def test_manifold_is_injected():
    m = geoopt.Sphere()
    assert SphereGeometry(m).manifold is m
    with pytest.raises(TypeError):
        SphereGeometry(geoopt.Euclidean())  # type: ignore[arg-type]


def test_proju_is_tangent_projection(geo):
    gen = torch.Generator().manual_seed(1)
    s = geo.random_uniform(32, 576, dtype=F64, generator=gen)
    u = torch.randn(32, 576, dtype=F64, generator=gen)
    pu = geo.proju(s, u)
    assert (pu * s).sum(-1).abs().max() < 1e-13
    assert torch.allclose(geo.proju(s, pu), pu, atol=1e-13)  # idempotent
    assert torch.allclose(pu + (u * s).sum(-1, keepdim=True) * s, u, atol=1e-13)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_expmap_is_geoopts_renormalised(geo, dtype):
    gen = torch.Generator().manual_seed(9)
    s = geo.random_uniform(64, 576, dtype=F64, generator=gen)
    u = geo.proju(s, torch.randn(64, 576, dtype=F64, generator=gen))
    scale = torch.logspace(-9, 0.4, 64, dtype=F64)[:, None]
    u = u / u.norm(dim=-1, keepdim=True) * scale  # |u| from 1e-9 to 2.5 rad
    ours = geo.expmap(s.to(dtype), u.to(dtype)).double()
    ref = geo.manifold.expmap(s, u)  # geoopt, float64
    tol = 1e-14 if dtype == F64 else 1e-6
    assert (ours - ref).norm(dim=-1).max() < tol
    assert (ours.norm(dim=-1) - 1).abs().max() < tol


@pytest.mark.parametrize("d", [3, 576])
def test_exp_log_inverse_and_distance(geo, d):
    gen = torch.Generator().manual_seed(2)
    s = geo.random_uniform(64, d, dtype=F64, generator=gen)
    u = geo.proju(s, torch.randn(64, d, dtype=F64, generator=gen))
    u = u / u.norm(dim=-1, keepdim=True) * torch.rand(64, 1, dtype=F64, generator=gen) * 3.0  # |u| < pi
    y = geo.expmap(s, u)
    assert (y.norm(dim=-1) - 1).abs().max() < 1e-14
    assert torch.allclose(geo.dist(s, y), u.norm(dim=-1), atol=1e-12)
    assert torch.allclose(geo.logmap(s, y), u, atol=1e-11)


THETAS = [1e-9, 1e-7, 1e-5, 1e-3, 0.5, math.pi - 1e-3, math.pi - 1e-6]


def _log_tol(eps: float, theta: float) -> float:
    """The log map's direction is conditioned like 1/sin(theta): abs error ~ eps * theta/sin(theta)."""
    return 20 * eps * max(1.0, theta / math.sin(theta))


@pytest.mark.parametrize("theta", THETAS)
def test_atan2_dist_and_log_exact_in_float64(geo, theta):
    s, y, e = _pair_at_angle(theta, 576, F64)
    eps = torch.finfo(F64).eps
    assert (geo.dist(s, y) - theta).abs().max() < 20 * eps
    assert (geo.logmap(s, y) - theta * e).norm(dim=-1).max() < _log_tol(eps, theta)


@pytest.mark.parametrize("theta", THETAS)
def test_atan2_dist_and_log_float32_accurate_to_rounding(geo, theta):
    """float32 inputs only fix the angle to ~eps absolute; we reach that (geoopt: 1.4e-2)."""
    s, y, _ = _pair_at_angle(theta, 576, torch.float32)
    eps = torch.finfo(torch.float32).eps
    ref_dist = geo.dist(s.double(), y.double())  # exact geometry of the rounded points
    assert (geo.dist(s, y).double() - ref_dist).abs().max() < 20 * eps
    ref_log = geo.logmap(s.double(), y.double())
    assert (geo.logmap(s, y).double() - ref_log).norm(dim=-1).max() < _log_tol(eps, theta)


def test_geoopt_float32_dist_is_clamped_which_is_why_we_use_atan2(geo):
    s, y, e = _pair_at_angle(1e-3, 576, torch.float32)
    assert geo.manifold.dist(s, y).min() > 0.013  # geoopt: acos(1 - 1e-4) ~ 0.0141
    assert (geo.dist(s, y) - 1e-3).abs().max() < 1e-6  # ours
    # the log map inherits the clamp: geoopt's |log_S y| reads 0.014 rad (14x too long) at 1e-3 rad
    assert (geo.manifold.logmap(s, y).norm(dim=-1) - 1e-3).abs().min() > 0.01
    assert (geo.logmap(s, y) - 1e-3 * e).norm(dim=-1).max() < 1e-6
    # float64: geoopt's clamp at 1 - 1e-7 fixes every angle below ~4.5e-4 rad at 4.5e-4
    s64, y64, e64 = _pair_at_angle(1e-5, 576, F64)
    assert (geo.manifold.dist(s64, y64) - 1e-5).abs().min() > 1e-4
    assert (geo.dist(s64, y64) - 1e-5).abs().max() < 1e-15


def test_random_uniform_is_geoopts_seeded_from_the_generator(geo):
    torch.manual_seed(123)
    ref = geo.manifold.random_uniform(5, 7, dtype=F64)  # geoopt's own, global RNG seeded with 123
    before = torch.random.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(0)))
    a = geo.random_uniform(5, 7, dtype=F64, generator=gen)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's global RNG untouched
    torch.manual_seed(seed)
    assert torch.equal(a, geo.manifold.random_uniform(5, 7, dtype=F64))  # geoopt's draw, bit for bit
    b = geo.random_uniform(5, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and type(a) is torch.Tensor and ref.shape == a.shape


def test_logmap_at_antipode_is_finite(geo):
    s = torch.zeros(1, 5, dtype=F64)
    s[0, 0] = 1.0
    assert torch.isfinite(geo.logmap(s, -s)).all()
    assert torch.allclose(geo.dist(s, -s), torch.tensor([math.pi], dtype=F64))


def test_random_uniform_moments(geo):
    d, n = 64, 20000
    s = geo.random_uniform(n, d, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert (s.norm(dim=-1) - 1).abs().max() < 1e-14
    assert s.mean(0).norm() < 4 * (1 / n) ** 0.5  # E[S] = 0, |mean| ~ sqrt(1/n)
    u = torch.zeros(d, dtype=F64)
    u[5] = 1.0
    second = float(((s @ u) ** 2).mean())
    assert abs(second - 1 / d) < 5 * (2 / (d * d * n)) ** 0.5  # E[(S.u)^2] = 1/d


def test_nearest_token_is_argmin_geodesic_distance(geo):
    gen = torch.Generator().manual_seed(4)
    emb = geo.random_uniform(300, 32, dtype=F64, generator=gen)
    s = geo.random_uniform(20, 32, dtype=F64, generator=gen)
    ids = nearest_token(s, emb)
    brute = torch.stack([geo.dist(s[i].expand_as(emb), emb).argmin() for i in range(20)])
    assert torch.equal(ids, brute)
    assert nearest_token(s[0], emb).shape == ()


@pytest.mark.parametrize("d", [4, 7, 576])
def test_complex_structure(d):
    x = torch.randn(10, d, dtype=F64, generator=torch.Generator().manual_seed(5))
    y = torch.randn(10, d, dtype=F64, generator=torch.Generator().manual_seed(6))
    jx, jy = apply_complex_structure(x), apply_complex_structure(y)
    assert torch.allclose((jx * y).sum(-1), -(x * jy).sum(-1), atol=1e-12)  # J^T = -J
    m = d - d % 2
    assert torch.allclose(apply_complex_structure(jx)[:, :m], -x[:, :m], atol=1e-14)  # J^2 = -I
    if d % 2:
        assert (jx[:, -1] == 0).all()


def test_precession_d3_is_minus_cross_product(geo):
    gen = torch.Generator().manual_seed(7)
    s = geo.random_uniform(16, 3, dtype=F64, generator=gen)
    n = torch.randn(16, 3, dtype=F64, generator=gen)
    assert torch.allclose(precession(s, n, geo), -torch.linalg.cross(s, n, dim=-1), atol=1e-14)


@pytest.mark.parametrize("d", [3, 4, 5, 576])
def test_precession_tangent_and_orthogonal_to_damping(geo, d):
    gen = torch.Generator().manual_seed(8)
    s = geo.random_uniform(64, d, dtype=F64, generator=gen)
    n = 3.0 * torch.randn(64, d, dtype=F64, generator=gen)
    p = precession(s, n, geo)
    damp = geo.proju(s, n)
    assert (p * s).sum(-1).abs().max() < 1e-12
    assert (p * damp).sum(-1).abs().max() < 1e-12
    assert (p.norm(dim=-1) <= damp.norm(dim=-1) + 1e-12).all()
    if d == 3:
        assert torch.allclose(p.norm(dim=-1), damp.norm(dim=-1), atol=1e-12)
