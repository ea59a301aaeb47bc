"""SDE definitions: Ito/Stratonovich forms, torchsde compatibility, vMF noising, LLG physics."""
from __future__ import annotations

import math

import pytest
import torch
import torchsde

from spindiff.config import SDEConfig
from spindiff.sphere.integrators import integrate, make_brownian
from spindiff.sphere.schedules import make_schedule
from spindiff.sphere.sde import BrownianSphereSDE, ReverseLLGSDE, kappa_of_decay, llg_field_drift
from spindiff.sphere.vmf import kappa_from_mean_resultant, vmf_log_density

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def _sde(d: int, sde_type: str = "ito", name: str = "linear") -> BrownianSphereSDE:
    return BrownianSphereSDE(make_schedule(name, d), sde_type=sde_type)


@pytest.mark.parametrize("d", [2, 3, 5, 12])
def test_ito_correction_is_minus_d_minus_1_over_2_beta_S(d):
    """(1/2) sum_jk (d_j G_ik) G_jk for G = sqrt(beta)(I - S S^T), by autograd, equals the Ito drift.

    For d = 2 it is -beta/2 S: the paper's Eq. (10) is the d = 2 case only.
    """
    ito, strat = _sde(d, "ito"), _sde(d, "stratonovich")
    gen = torch.Generator().manual_seed(0)
    s = ito.prior_sampling(3, dtype=F64, generator=gen)
    t = torch.tensor(0.4, dtype=F64)
    for b in range(3):
        y = s[b : b + 1]
        jac = torch.autograd.functional.jacobian(lambda x: ito.diffusion_matrix(t, x)[0], y)[:, :, 0, :]  # (i, k, j)
        g = ito.diffusion_matrix(t, y)[0]  # (j, k)
        corr = 0.5 * torch.einsum("ikj,jk->i", jac, g)
        beta = float(ito.beta(t))
        assert torch.allclose(corr, -(d - 1) / 2 * beta * y[0], atol=1e-12)
        assert torch.allclose(ito.drift(t, y) - strat.drift(t, y), corr[None], atol=1e-12)
        if d == 2:
            assert torch.allclose(corr, -beta / 2 * y[0], atol=1e-12)


def test_torchsde_accepts_forward_and_reverse():
    d, b = 5, 8
    gen = torch.Generator().manual_seed(1)
    for sde_type, method in (("ito", "euler"), ("stratonovich", "midpoint")):
        sde = _sde(d, sde_type)
        y0 = sde.prior_sampling(b, dtype=F64, generator=gen)
        ts = torch.linspace(0, 0.5, 6, dtype=F64)
        bm = make_brownian(b, d, 0.0, 0.5, F64, seed=0)
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=0.01)
        assert ys.shape == (6, b, d) and torch.isfinite(ys).all()
        rev = sde.reverse(lambda s, t: torch.zeros_like(s), field=torch.randn(d, dtype=F64), eta=0.5, lam=2.0)
        assert type(rev) is ReverseLLGSDE and rev.sde_type == sde_type and rev.noise_type == "general"
        ts_r = torch.linspace(0, rev.tau_end, 4, dtype=F64)
        bm_r = make_brownian(b, d, 0.0, rev.tau_end, F64, seed=0)
        ys = torchsde.sdeint(rev, y0, ts_r, bm=bm_r, method=method, dt=0.002)
        assert ys.shape == (4, b, d) and torch.isfinite(ys).all()


def test_from_config_and_validation():
    sde = BrownianSphereSDE.from_config(SDEConfig(), 576)
    assert sde.dim == 576 and sde.t_eps == SDEConfig().t_eps
    with pytest.raises(ValueError):
        sde.reverse(eta=-1.0)
    with pytest.raises(ValueError):
        sde.reverse(eta=1.0, lam=0.0)
    with pytest.raises(ValueError):
        BrownianSphereSDE(make_schedule("linear", 3), sde_type="bogus")


@pytest.mark.parametrize("d", [3, 8, 576])
def test_reverse_drift_and_noise_are_tangent(d):
    sde = _sde(d)
    gen = torch.Generator().manual_seed(2)
    s = sde.prior_sampling(16, dtype=F64, generator=gen)
    field = torch.randn(16, d, dtype=F64, generator=gen)
    w = torch.randn(d, d, dtype=F64, generator=gen)
    score = lambda x, t: sde.geometry.proju(x, torch.tanh(x @ w) * t[:, None])  # noqa: E731
    rev = sde.reverse(score, field=field, eta=0.7, lam=1.5)
    a = rev.tangent_drift(0.3, s)
    assert (a * s).sum(-1).abs().max() < 1e-12  # score . S = 0, field terms tangent
    v = torch.randn(16, d, dtype=F64, generator=gen)
    assert (rev.g_prod(torch.tensor(0.3, dtype=F64), s, v) * s).sum(-1).abs().max() < 1e-12
    # Ito form: exactly the radial correction on top of the tangent drift
    sig2 = rev.diffusion(0.3, s).square()
    assert torch.allclose(rev.drift(0.3, s), a - (d - 1) / 2 * sig2[:, None] * s, atol=1e-12)


@pytest.mark.parametrize("d", [3, 16, 576])
def test_field_damping_is_vmf_score(d):
    """eta P_S N = grad_S log vMF(S; N/|N|, eta|N|) (Riemannian gradient, by autograd)."""
    sde = _sde(d)
    gen = torch.Generator().manual_seed(3)
    s = sde.prior_sampling(8, dtype=F64, generator=gen).requires_grad_(True)
    n = 2.5 * torch.randn(d, dtype=F64, generator=gen)
    eta = 0.8
    logp = vmf_log_density(s, n / n.norm(), eta * float(n.norm())).sum()
    (grad,) = torch.autograd.grad(logp, s)
    s = s.detach()
    riem = sde.geometry.proju(s, grad)
    assert torch.allclose(llg_field_drift(s, n.expand(8, d), eta, math.inf, sde.geometry), riem, atol=1e-10)


@pytest.mark.parametrize("d", [3, 16, 576, 768])
def test_kappa_table_matches_exact_inversion(d):
    decay = torch.logspace(-8, 2, 200, dtype=F64)
    kappa = kappa_of_decay(decay, d)
    exact = torch.from_numpy(kappa_from_mean_resultant(torch.exp(-decay).clamp_max(1 - 1e-16).numpy(), d))
    rel = ((kappa - exact) / exact).abs()
    assert rel.max() < 1e-6, rel.max()


@pytest.mark.parametrize("d", [3, 576])
def test_vmf_noising_mean_cosine_follows_brownian_law(d):
    sde = _sde(d)
    gen = torch.Generator().manual_seed(4)
    n = 4000
    s0 = sde.prior_sampling(1, dtype=F64, generator=gen).expand(n, d)
    for tv in (0.05, 0.2, 0.4, 0.7):
        t = torch.full((n,), tv, dtype=F64)
        st = sde.marginal_sample(s0, t, generator=gen)
        assert (st.norm(dim=-1) - 1).abs().max() < 1e-12
        cos = (st * s0).sum(-1)
        m = float(sde.mean_cosine(tv))
        se = float(cos.std()) / n**0.5
        assert abs(float(cos.mean()) - m) < 5 * se + 1e-12, (tv, float(cos.mean()), m)


def test_conditional_score_is_gradient_of_vmf_log_density():
    d = 16
    sde = _sde(d)
    gen = torch.Generator().manual_seed(5)
    s0 = sde.prior_sampling(8, dtype=F64, generator=gen)
    t = torch.linspace(0.05, 0.9, 8, dtype=F64)
    st = sde.marginal_sample(s0, t, generator=gen).requires_grad_(True)
    kap = sde.kappa(t)
    logq = sum(vmf_log_density(st[i : i + 1], s0[i], float(kap[i])).sum() for i in range(8))
    (grad,) = torch.autograd.grad(logq, st)
    st = st.detach()
    assert torch.allclose(sde.conditional_score(st, s0, t), sde.geometry.proju(st, grad), atol=1e-9)
    # E|target|^2 = (d-1) kappa m = (d-1) score_scale^2
    assert torch.allclose(sde.score_scale(t).square(), kap * sde.mean_cosine(t), rtol=1e-12)


# ------------------------------------------------------------------ LLG physics (d = 3)
def _polar_azimuth(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.atan2(s[..., :2].norm(dim=-1), s[..., 2]), torch.atan2(s[..., 1], s[..., 0])


@pytest.mark.parametrize("lam", [0.5, 2.0, math.inf])
def test_llg_d3_precession_frequency_and_relaxation(lam):
    """score = 0, noise off: the physical LLG dS/dt = -g/(1+l^2) S x B + g l/(1+l^2) P_S B.

    omega = gamma |B| / (1 + lam^2); tan(theta/2) = tan(theta0/2) exp(-gamma lam |B| t/(1+lam^2)).
    """
    eta, bmag = 0.5, 2.0
    gamma = eta * (1 + lam**2) / lam if math.isfinite(lam) else math.inf
    omega = gamma * bmag / (1 + lam**2) if math.isfinite(lam) else 0.0  # = eta |B| / lam
    rate = eta * bmag  # = gamma lam |B| / (1 + lam^2)
    theta0, phi0 = 1.2, 0.3
    s0 = torch.tensor([[math.sin(theta0) * math.cos(phi0), math.sin(theta0) * math.sin(phi0), math.cos(theta0)]],
                      dtype=F64)
    field = torch.tensor([0.0, 0.0, bmag], dtype=F64)
    rev = _sde(3).reverse(None, field=field, eta=eta, lam=lam, probability_flow=True)
    ts = torch.linspace(0, rev.tau_end, 2001, dtype=F64)
    path = integrate(rev, s0, ts, "geodesic_midpoint", seed=0, return_path=True)[:, 0]  # (n+1, 3)
    theta, phi = _polar_azimuth(path)
    law = 2 * torch.atan(math.tan(theta0 / 2) * torch.exp(-rate * ts))
    assert (theta - law).abs().max() < 1e-6  # midpoint, h = 5e-4: O(h^2)
    phi_unwrapped = phi0 + torch.cumsum(torch.remainder(phi.diff() + math.pi, 2 * math.pi) - math.pi, 0)
    assert (phi_unwrapped - (phi0 + omega * ts[1:])).abs().max() < 1e-6
    assert (path.norm(dim=-1) - 1).abs().max() < 1e-14


def test_lambda_changes_dynamics_not_only_scale():
    """Same eta: the polar relaxation is identical, the azimuthal motion differs (ratio 1/lam)."""
    d = 3
    field = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    s0 = torch.tensor([[0.8, 0.0, 0.6]], dtype=F64)
    ts = torch.linspace(0, 0.5, 1001, dtype=F64)
    ends = {}
    for lam in (0.5, 2.0):
        rev = _sde(d).reverse(None, field=field, eta=1.0, lam=lam, probability_flow=True)
        ends[lam] = integrate(rev, s0, ts, "geodesic_midpoint", seed=0)[0]
    th = {k: _polar_azimuth(v)[0] for k, v in ends.items()}
    ph = {k: _polar_azimuth(v)[1] for k, v in ends.items()}
    assert abs(float(th[0.5] - th[2.0])) < 1e-6  # equal up to O(h^2)
    assert abs(float(ph[0.5]) - 4 * float(ph[2.0])) < 1e-6  # omega = eta|B|/lam


def test_precession_generalisation_high_d_conserves_field_energy_without_damping_part():
    """For d > 3 the precession term alone keeps S.N constant to first order (it is orthogonal to
    P_S N = grad (S.N)); integrate the pure-precession flow and check S.N drifts only at O(h^2)."""
    d = 64
    sde = _sde(d)
    gen = torch.Generator().manual_seed(6)
    s0 = sde.prior_sampling(4, dtype=F64, generator=gen)
    n = torch.randn(d, dtype=F64, generator=gen)
    geo = sde.geometry

    class PrecessionOnly:
        geometry, dim = geo, d

        def tangent_drift(self, t, s):
            return llg_field_drift(s, n.expand_as(s), 1.0, 1.0, geo) - geo.proju(s, n.expand_as(s))

        def diffusion(self, t, s):
            return torch.zeros(s.shape[0], dtype=s.dtype)

    drift = []
    for steps in (200, 400):
        ts = torch.linspace(0, 1.0, steps + 1, dtype=F64)
        s1 = integrate(PrecessionOnly(), s0, ts, "geodesic_midpoint", seed=0)
        drift.append(float(((s1 - s0) @ n).abs().max()))
    assert drift[0] < 1e-3 and drift[1] < drift[0] / 3.5  # second order in h
