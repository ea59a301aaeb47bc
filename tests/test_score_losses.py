"""Score network, DSM loss on the sphere, and the Euclidean DDPM baseline."""
from __future__ import annotations

import math

import pytest
import torch
import torchsde

from spindiff.config import ScoreNetConfig
from spindiff.score.euclid import VPSDE, ddpm_loss, make_eps_fn, sample_ddpm
from spindiff.score.losses import WEIGHTINGS, dsm_loss
from spindiff.sphere.schedules import make_schedule
from spindiff.score.net import ResidualScoreNet, make_score_fn
from spindiff.sphere.sde import BrownianSphereSDE

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def _sde(d: int) -> BrownianSphereSDE:
    return BrownianSphereSDE(make_schedule("linear", d))


@pytest.mark.parametrize("context_dim", [0, 7])
def test_score_net_output_is_tangent(context_dim):
    torch.manual_seed(0)
    d = 24
    sde = _sde(d)
    net = ResidualScoreNet(d, context_dim=context_dim, hidden=32, layers=2, time_dim=16).double()
    s = sde.prior_sampling(10, dtype=F64)
    t = torch.rand(10, dtype=F64)
    ctx = torch.randn(10, context_dim, dtype=F64) if context_dim else None
    out = net(s, t, ctx)
    assert out.shape == (10, d)
    assert (out * s).sum(-1).abs().max() < 1e-12  # score . S = 0
    field = torch.randn(10, d, dtype=F64)
    total = make_score_fn(net, sde, field=field, context=ctx)(s, t)
    assert (total * s).sum(-1).abs().max() < 1e-12
    if context_dim:
        with pytest.raises(ValueError):
            net(s, t, None)


def test_residual_decomposition_and_eta_train_zero_baseline():
    torch.manual_seed(1)
    d = 16
    sde = _sde(d)
    s = sde.prior_sampling(6, dtype=F64)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    field = torch.randn(6, d, dtype=F64)
    net = ResidualScoreNet(d, hidden=32, layers=1, time_dim=16, eta_train=0.7).double()
    raw = net(s, t)
    total = net.total_score(s, t, sde, field=field)
    expected = (0.7 * sde.mean_cosine(t))[:, None] * sde.geometry.proju(s, field) + sde.score_scale(t)[:, None] * raw
    assert torch.allclose(total, expected, atol=1e-12)
    base = ResidualScoreNet(d, hidden=32, layers=1, time_dim=16, eta_train=0.0).double()
    base.load_state_dict(net.state_dict())
    assert torch.allclose(base.total_score(s, t, sde, field=field), sde.score_scale(t)[:, None] * raw, atol=1e-12)


@pytest.mark.parametrize("d", [3, 16])
def test_analytic_term_follows_the_noised_field_score(d):
    """For p_0 = vMF(N, kappa0) with small kappa0, the best multiple c(t) P_S N of the DSM target
    kappa(t) P_{S_t} S_0 (least squares over (S_0, S_t) pairs, which is what the score network's
    loss fits) is kappa0 m(t): the m(t) law of ResidualScoreNet.analytic_term. A fixed
    eta_train P_S N (no decay) fails this at large t."""
    from spindiff.sphere.vmf import sample_vmf
    g = torch.Generator().manual_seed(0)
    sde = _sde(d)
    kappa0, n = 0.5, 400_000
    N = torch.zeros(d, dtype=F64)
    N[0] = 1.0
    s0 = sample_vmf(N, kappa0, n=n, generator=g).to(F64)
    net = ResidualScoreNet(d, hidden=8, layers=1, time_dim=4, eta_train=kappa0).double()
    for tv in (0.1, 0.3, 0.6):
        m = float(sde.mean_cosine(torch.tensor([tv], dtype=F64)))
        t = torch.full((n,), tv, dtype=F64)
        st = sde.marginal_sample(s0, t, generator=g)
        target = sde.conditional_score(st, s0, t)  # (n, d)
        basis = sde.geometry.proju(st, N.expand_as(st))  # P_S N
        c = float((target * basis).sum() / (basis * basis).sum())
        model = net.analytic_term(st, t, sde, N[None])
        c_model = float((model * basis).sum() / (basis * basis).sum())
        assert c_model == pytest.approx(kappa0 * m, rel=1e-9)
        # Monte Carlo standard error of c is ~ kappa(t) / sqrt(n); O(kappa0^2) bias is small
        assert c == pytest.approx(kappa0 * m, abs=0.02 + 0.05 * kappa0 * m), (tv, m, c)
        assert abs(c - kappa0) > 0.1 or m > 0.8  # the undecayed term would be visibly wrong


def test_euclidean_flag_skips_projection_and_from_config():
    cfg = ScoreNetConfig(hidden=32)  # the shipped default hidden=0 is the posterior model's (read-out only)
    with pytest.raises(ValueError, match="hidden=0"):
        ResidualScoreNet.from_config(ScoreNetConfig(), dim=12, context_dim=3, tangent=False)
    net = ResidualScoreNet.from_config(cfg, dim=12, context_dim=3, tangent=False)
    assert net.eta_train == cfg.eta_train and len(net.blocks) == cfg.layers
    assert net.hparams()["hidden"] == cfg.hidden
    x = torch.randn(4, 12)
    out = net(x / x.norm(dim=-1, keepdim=True), torch.rand(4), torch.randn(4, 3))
    assert (out * x).sum(-1).abs().max() > 1e-3  # not projected


@pytest.mark.parametrize("d", [3, 576])
def test_dsm_loss_is_zero_for_exact_score_of_point_mass(d):
    """Data = one point S*: p_t = vMF(S*, kappa(t)) exactly, its score kappa P_S S* gives loss 0."""
    sde = _sde(d)
    gen = torch.Generator().manual_seed(2)
    star = sde.prior_sampling(1, dtype=F64, generator=gen)
    batch = star.expand(256, d)
    exact = lambda s, t: sde.kappa(t)[:, None] * sde.geometry.proju(s, star.expand_as(s))  # noqa: E731
    for w in WEIGHTINGS:
        assert float(dsm_loss(sde, exact, batch, weighting=w, generator=gen)) < 1e-20


@pytest.mark.parametrize("d", [16, 576])
def test_normalized_weighting_gives_unit_loss_for_zero_score(d):
    """E|kappa P_{S_t} S_0|^2 = (d-1) kappa A_d(kappa): the normalized loss of score 0 is 1."""
    sde = _sde(d)
    gen = torch.Generator().manual_seed(3)
    batch = sde.prior_sampling(4096, dtype=F64, generator=gen)
    loss = dsm_loss(sde, lambda s, t: torch.zeros_like(s), batch, generator=gen, reduction="none")
    se = float(loss.std()) / loss.numel() ** 0.5
    assert abs(float(loss.mean()) - 1.0) < 5 * se


def test_dsm_training_reduces_loss_and_handles_mapping_batch():
    torch.manual_seed(4)
    d = 8
    sde = _sde(d)
    gen = torch.Generator().manual_seed(4)
    mu = torch.zeros(d)
    mu[0] = 1.0
    net = ResidualScoreNet(d, hidden=64, layers=2, time_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    from spindiff.sphere.vmf import sample_vmf

    losses = []
    for _ in range(100):
        batch = {"spin": sample_vmf(mu, 20.0, n=256, generator=gen)}
        loss = dsm_loss(sde, make_score_fn(net, sde), batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 0.8  # ~1 = the normalized loss of a zero score
    assert sum(losses[-20:]) / 20 < 0.6


# --------------------------------------------------------------- Euclidean DDPM baseline
def test_vpsde_marginals_and_exact_eps_loss():
    sde = VPSDE()
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    a, s = sde.alpha_sigma(t)
    assert torch.allclose(a * a + s * s, torch.ones_like(t), atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 6, dtype=F64, generator=gen).expand(128, 6)
    exact = lambda x, tt: (x - sde.alpha_sigma(tt)[0][:, None] * x0) / sde.alpha_sigma(tt)[1][:, None]  # noqa: E731
    assert float(ddpm_loss(sde, exact, x0, generator=gen)) < 1e-20


def test_ddpm_sampler_recovers_gaussian_data_with_analytic_eps():
    """Data N(mu, s^2 I): marginal N(alpha mu, alpha^2 s^2 + sigma^2), eps* = sigma (x - alpha mu)/var."""
    sde = VPSDE()
    d, n = 4, 2000
    mu = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=F64)
    sd = 0.5

    def eps_fn(x, t):
        a, s = sde.alpha_sigma(t)
        var = (a * a * sd * sd + s * s)[:, None]
        return s[:, None] * (x - a[:, None] * mu) / var

    x = sample_ddpm(sde, eps_fn, n, d, steps=200, dtype=F64, seed=6)
    assert (x.mean(0) - mu).abs().max() < 5 * sd / n**0.5 + 0.02
    assert (x.std(0) - sd).abs().max() < 0.05


def test_reverse_vpsde_is_torchsde_compatible():
    sde = VPSDE()
    torch.manual_seed(7)
    net = ResidualScoreNet(5, hidden=16, layers=1, time_dim=8, tangent=False).double()
    rev = sde.reverse(make_eps_fn(net))
    y0 = torch.randn(3, 5, dtype=F64)
    ys = torchsde.sdeint(rev, y0, torch.tensor([0.0, 0.5], dtype=F64), method="euler", dt=0.05)
    assert ys.shape == (2, 3, 5) and torch.isfinite(ys).all()
    emb = torch.randn(50, 5, dtype=F64)
    with torch.no_grad():
        assert math.isfinite(float(ddpm_loss(sde, make_eps_fn(net), emb[:8])))
