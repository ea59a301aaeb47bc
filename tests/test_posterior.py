"""The posterior over the vocabulary: exact score, zero-initialised model = prior, posterior decoding,
marginal-preserving precession, reverse-time grids (float64 where it is mathematics)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spindiff.config import SDEConfig
from spindiff.score.model import PosteriorScoreModel
from spindiff.score.posterior import CandidatePosterior
from spindiff.score.reverse import PosteriorReverseSDE, sample_tokens
from spindiff.sphere.geometry import SphereGeometry
from spindiff.sphere.grids import GRIDS, reverse_grid
from spindiff.sphere.sde import BrownianSphereSDE, llg_field_drift

F64 = torch.float64


def _toy(d: int = 6, K: int = 4, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(K, d, generator=g, dtype=F64), dim=-1)
    logits = torch.randn(B, K, generator=g, dtype=F64)
    spin = F.normalize(torch.randn(B, d, generator=g, dtype=F64), dim=-1)
    return table, logits, spin


@pytest.mark.parametrize("kappa", [0.3, 4.0, 40.0])
def test_score_is_the_riemannian_gradient_of_log_p_t(kappa):
    """kappa P_S sum_v pi_v e_v equals P_S of a central finite difference of log p_t (float64)."""
    table, logits, spin = _toy()
    post = CandidatePosterior.from_logits(logits, table)  # all K candidates
    geo = SphereGeometry()
    score = post.score(spin, kappa, geo)
    h = 1e-6
    grad = torch.zeros_like(spin)
    for i in range(spin.shape[1]):
        e = torch.zeros_like(spin)
        e[:, i] = h
        grad[:, i] = (post.log_density(spin + e, kappa) - post.log_density(spin - e, kappa)) / (2 * h)
    assert torch.allclose(score, geo.proju(spin, grad), atol=1e-7 * max(1.0, kappa))
    assert torch.allclose((score * spin).sum(-1), torch.zeros(3, dtype=F64), atol=1e-12)  # tangent


def test_spins_per_context_share_candidates():
    """(B, n, d) spins give the same weights / score as the contexts repeated n times."""
    table, logits, _ = _toy(d=8, K=5, B=2)
    post = CandidatePosterior.from_logits(logits, table)
    g = torch.Generator().manual_seed(1)
    S = F.normalize(torch.randn(2, 3, 8, generator=g, dtype=F64), dim=-1)
    rep = CandidatePosterior(logits.repeat_interleave(3, 0), table, post.ids.repeat_interleave(3, 0),
                             post.dropped_mass.repeat_interleave(3, 0))
    geo = SphereGeometry()
    assert torch.allclose(post.score(S, 7.0, geo).reshape(6, 8), rep.score(S.reshape(6, 8), 7.0, geo))
    pts = table[post.ids]  # (B, K, d): the per-context layout of top-k candidates
    per = CandidatePosterior(logits, pts, post.ids, post.dropped_mass)
    assert torch.allclose(per.score(S, 7.0, geo), post.score(S, 7.0, geo))


def test_top_k_reports_the_dropped_mass():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]], dtype=F64)
    table = torch.eye(5, dtype=F64)
    post = CandidatePosterior.from_logits(logits, table, top_k=2)
    p = torch.softmax(logits, -1)[0]
    assert post.ids.tolist() == [[0, 1]]
    assert math.isclose(float(post.dropped_mass), float(p[2:].sum()), rel_tol=1e-12)
    assert float(CandidatePosterior.from_logits(logits, table).dropped_mass) == 0.0


def test_mix_tail_turns_exact_top_k_draws_into_exact_draws_of_p():
    """p = (1 - m) p_top + m p_tail: exact draws of the renormalised top-k, each replaced with
    probability m by a direct tail draw, have the law p (chi-square over all V, float64)."""
    from scipy import stats

    g = torch.Generator().manual_seed(3)
    V, K, n = 12, 4, 200_000
    logits = torch.randn(2, V, generator=g, dtype=F64) * 1.5
    table = F.normalize(torch.randn(V, 5, generator=g, dtype=F64), dim=-1)
    post = CandidatePosterior.from_logits(logits, table, top_k=K)
    top = post.ids.gather(1, torch.multinomial(torch.softmax(post.logits, -1), n, True, generator=g))  # (2, n)
    ids, tail = post.mix_tail(top, g)
    p = torch.softmax(logits, -1)
    for b in range(2):
        counts = torch.bincount(ids[b], minlength=V).double()
        assert stats.chisquare(counts.numpy(), (p[b] * n).numpy()).pvalue > 1e-3
        share = float(tail[b].double().mean())
        m = float(post.dropped_mass[b])
        assert abs(share - m) < 5 * math.sqrt(m * (1 - m) / n)
        assert not torch.isin(ids[b][tail[b]], post.ids[b]).any()  # tail draws are never candidates
    dropped = post.mix_tail(top, g)[0]  # without a tail (K = V) nothing changes
    full = CandidatePosterior.from_logits(logits, table)
    assert torch.equal(full.mix_tail(top, g)[0], top) and dropped.shape == top.shape


def test_untrained_model_is_the_prior_exactly():
    """The zero-initialised correction gives the prior's logits exactly, for every prior."""
    d, V = 16, 40
    g = torch.Generator().manual_seed(2)
    table = F.normalize(torch.randn(V, d, generator=g), dim=-1)
    field, hidden = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)
    lm = torch.randn(5, V, generator=g)
    for prior in ("field", "none", "lm"):
        for prior_weight in (False, True):
            m = PosteriorScoreModel(d, V, "field+hidden", prior, eta_train=7.0, hidden=32, layers=2,
                                    row_norms=torch.rand(V) + 0.5, prior_weight=prior_weight)
            expect = {"field": 7.0 * (F.normalize(field, dim=-1) @ table.T), "none": torch.zeros(5, V), "lm": lm}[prior]
            got = m(field, hidden, lm, table)
            if prior == "field":  # one stacked product with the table: equal up to float rounding
                assert torch.allclose(got, expect, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(got, expect)
    # the read-out represents the LM's logits W_U h exactly (gate g = 1, s_v = |W_U[v]|) -- with the field
    # prior too, once its learned weight c is 0 (the correction alone cannot cancel eta N . e_v)
    W = torch.randn(V, d, generator=g)
    for prior in ("none", "field"):
        m = PosteriorScoreModel(d, V, "field+hidden", prior, eta_train=7.0, hidden=0, row_norms=W.norm(dim=-1),
                                prior_weight=True)
        with torch.no_grad():
            m.gate.fill_(1.0)
            if prior == "field":
                assert not torch.allclose(m(field, hidden, None, F.normalize(W, dim=-1)), hidden @ W.T, atol=1e-3)
                m.prior_weight.zero_()
        assert torch.allclose(m(field, hidden, None, F.normalize(W, dim=-1)), hidden @ W.T, atol=1e-5)


def test_one_pass_forward_equals_prior_plus_correction():
    """The field prior and the correction share one product with the table (forward's fused path):
    same logits as computing c eta N.e_v and s_v (u.e_v) + b_v separately, for a non-trivial network."""
    d, V = 16, 40
    g = torch.Generator().manual_seed(5)
    table = F.normalize(torch.randn(V, d, generator=g), dim=-1)
    field, hidden = torch.randn(6, d, generator=g), torch.randn(6, d, generator=g)
    for hidden_width in (0, 32):
        m = PosteriorScoreModel(d, V, "field+hidden", "field", eta_train=7.0, hidden=hidden_width,
                                row_norms=torch.rand(V) + 0.5, prior_weight=True)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        sep = m.prior_logits(field, None, table) * m.prior_weight + m.correction(m.context(field, hidden), table)
        with torch.no_grad():  # the fused path is the inference path
            assert torch.allclose(m(field, hidden, None, table), sep, atol=1e-5, rtol=1e-5)
        assert torch.allclose(m(field, hidden, None, table), sep, atol=1e-5, rtol=1e-5)


def test_param_groups_cover_every_parameter_once():
    m = PosteriorScoreModel(8, 20, "field+hidden", "field", eta_train=3.0, hidden=16, prior_weight=True)
    groups = {g["name"]: g for g in m.param_groups(1e-2, gate_lr=5e-2, weight_decay=0.1)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each parameter in exactly one group
    assert {id(p) for p in groups["lm_head_path"]["params"]} == {id(m.gate), id(m.prior_weight)}
    assert groups["lm_head_path"]["lr"] == 5e-2 and groups["lm_head_path"]["weight_decay"] == 0.0
    assert groups["matrices"]["weight_decay"] == 0.1 and id(m.readout.weight) in {id(p) for p in groups["matrices"]["params"]}
    assert {id(m.scale), id(m.bias)} <= {id(p) for p in groups["scales"]["params"]}
    assert m.param_groups(1e-2)[-1]["lr"] == 1e-2  # gate_lr = 0: one learning rate


def _toy_sde(d: int) -> BrownianSphereSDE:
    return BrownianSphereSDE.from_config(SDEConfig(), d)


def _three_tokens(d: int, g: torch.Generator):
    """3 random unit tokens in R^d (drawn from ``g``) with p = (0.6, 0.3, 0.1): (table, p, posterior, sde)."""
    table = F.normalize(torch.randn(3, d, generator=g, dtype=F64), dim=-1)
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=F64)
    return table, p, CandidatePosterior.from_logits(p.log(), table), _toy_sde(d)


def _weights(ids: torch.Tensor, K: int) -> torch.Tensor:
    return torch.bincount(ids.reshape(-1), minlength=K).double() / ids.numel()


@pytest.mark.parametrize("method", ["geodesic_em", "geodesic_midpoint", "geodesic_heun"])
def test_reverse_sde_samples_the_prior(method):
    """With the exact score and posterior decoding the sampled token frequencies match p
    (d = 16, 3 tokens, 6000 draws): within 4 standard errors."""
    d, n = 16, 6000
    g = torch.Generator().manual_seed(3)
    table, p, post, sde = _three_tokens(d, g)
    ids, pp, spin = sample_tokens(PosteriorReverseSDE(sde, post, n), reverse_grid(sde, 40, "uniform"), method, g)
    w = _weights(ids, 3)
    se = (p[0] * (1 - p[0]) / n).sqrt()
    assert ((w - p[0]).abs() <= 4 * se + 1e-3).all(), (w, p)
    assert torch.allclose(spin.norm(dim=-1), torch.ones_like(spin[..., 0]), atol=1e-12)  # |S| = 1
    assert float(pp.mean()) > 0.999  # at t_eps the posterior is one-hot: decoding is exact given S


def test_untrained_network_reproduces_the_priors_samples():
    """An untrained (zero-initialised) model's sampler draws exactly what the prior alone draws:
    the same tokens from the same noise."""
    d, V = 16, 30
    g = torch.Generator().manual_seed(4)
    table = F.normalize(torch.randn(V, d, generator=g), dim=-1)
    field, hidden = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    sde, grid = _toy_sde(d), reverse_grid(_toy_sde(d), 8, "uniform")
    untrained = PosteriorScoreModel(d, V, "field+hidden", "field", eta_train=30.0, hidden=16)
    prior_only = PosteriorScoreModel(d, V, "none", "field", eta_train=30.0, learned=False)
    draws = []
    for m in (untrained, prior_only):
        post = CandidatePosterior.from_logits(m(field, hidden, None, table), table)
        draws.append(sample_tokens(PosteriorReverseSDE(sde, post, 64), grid, "geodesic_midpoint",
                                   torch.Generator().manual_seed(9))[0])
    assert torch.equal(draws[0], draws[1])


def test_preserving_precession_is_tangent_and_divergence_free():
    """div_sphere(p w) = 0 for the vMF mixture p (checked by the divergence theorem's discrete form:
    E_p[w . grad f] = 0 for test functions f), and w is tangent."""
    d = 5
    table, logits, _ = _toy(d=d, K=3, B=1, seed=5)
    post = CandidatePosterior.from_logits(logits, table)
    geo = SphereGeometry()
    kappa = 6.0
    # samples of p: mixture of vMF(e_v, kappa) by rejection from uniform (exact, d = 5)
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(400_000, d, generator=g, dtype=F64), dim=-1)
    logp = post.log_density(x[None], kappa)[0]  # (N,) up to the constant
    keep = torch.rand(x.shape[0], generator=g, dtype=F64) < torch.exp(logp - logp.max())
    s = x[keep]
    w = post.preserving_precession(s[None], kappa, geo)[0]
    assert torch.allclose((w * s).sum(-1), torch.zeros(len(s), dtype=F64), atol=1e-12)
    a = torch.randn(d, generator=g, dtype=F64)
    M = torch.randn(d, d, generator=g, dtype=F64)
    for grad_f in (lambda y: a.expand_as(y), lambda y: y @ (M + M.T)):  # f = a.y and f = y^T M y
        flux = (w * grad_f(s)).sum(-1)
        assert abs(float(flux.mean())) < 4 * float(flux.std()) / math.sqrt(len(s)), float(flux.mean())
    # control: the paper's LLG drift toward e_0 is not divergence-free for p (the same check fails)
    llg = llg_field_drift(s, table[0].expand_as(s), 1.0, 2.0, geo)
    flux = (llg * table[0].expand_as(s)).sum(-1)  # f = e_0 . y
    assert float(flux.mean()) > 10 * float(flux.std()) / math.sqrt(len(s))


def test_preserving_precession_leaves_the_sampled_weights_unchanged():
    """Reverse SDE on a 3-token mixture at d = 16, 8000 draws: the token frequencies with a strong
    marginal-preserving precession (gamma = 20) match p within MC error, while the paper's LLG
    field drift toward the rarest token changes them."""
    d, n = 16, 8000
    table, p, post, sde = _three_tokens(d, torch.Generator().manual_seed(7))
    grid = reverse_grid(sde, 60, "uniform")
    se = (p[0] * (1 - p[0]) / n).sqrt()
    w_prec = _weights(sample_tokens(PosteriorReverseSDE(sde, post, n, precession=20.0), grid,
                                    "geodesic_midpoint", torch.Generator().manual_seed(8))[0], 3)
    assert ((w_prec - p[0]).abs() <= 4 * se + 2e-3).all(), w_prec
    geo = sde.geometry
    llg = lambda spin, t: llg_field_drift(spin, table[2].expand_as(spin), 8.0, 1.0, geo)  # noqa: E731
    w_llg = _weights(sample_tokens(PosteriorReverseSDE(sde, post, n, extra=llg), grid, "geodesic_midpoint",
                                   torch.Generator().manual_seed(8))[0], 3)
    assert w_llg[2] > p[0, 2] + 10 * se[2], w_llg


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_grids_are_increasing_and_span_the_reverse_time(kind):
    sde = _toy_sde(576)
    for steps in (1, 5, 20, 100):
        tau = reverse_grid(sde, steps, kind)
        assert len(tau) == steps + 1 and tau[0] == 0.0 and math.isclose(tau[-1], sde.T - sde.t_eps)
        assert all(b > a for a, b in zip(tau, tau[1:]))
    with pytest.raises(ValueError, match="unknown grid"):
        reverse_grid(sde, 5, "nope")


@pytest.mark.parametrize("brownian", ["increments", "interval"])
def test_posterior_reverse_sde_is_a_torchsde_sde_and_both_brownians_sample_p(brownian):
    """PosteriorReverseSDE is a torchsde SDE (Ito, general noise, f = a - (d-1)/2 beta S,
    g_prod = sqrt(beta) P_S v; sdeint runs it), and the per-token loop samples p with either
    torchsde Brownian object."""
    import torchsde

    from spindiff.sphere.integrators import GaussianIncrements

    d, n = 16, 4000
    g = torch.Generator().manual_seed(5)
    table, p, post, sde = _three_tokens(d, g)
    rev = PosteriorReverseSDE(sde, post, n)
    assert (rev.noise_type, rev.sde_type) == ("general", "ito") and rev.geometry is sde.geometry
    S = sde.prior_sampling(n, dtype=F64, generator=g)
    tau = 0.3
    beta = float(sde.beta(torch.tensor([sde.T - tau], dtype=F64))[0])
    assert torch.allclose(rev.f(torch.tensor(tau, dtype=F64), S),
                          rev.tangent_drift(tau, S) - 0.5 * (d - 1) * beta * S, atol=1e-12)
    v = torch.randn(n, d, dtype=F64, generator=g)
    assert torch.allclose(rev.g_prod(torch.tensor(tau), S, v), math.sqrt(beta) * sde.geometry.proju(S, v), atol=1e-12)
    ys = torchsde.sdeint(PosteriorReverseSDE(sde, post, 8), S[:8], torch.tensor([0.0, 0.05], dtype=F64),
                         bm=GaussianIncrements(8, d, F64, seed=0), method="euler", dt=0.005)  # a torchsde Brownian
    assert ys.shape == (2, 8, d) and torch.isfinite(ys).all()
    from spindiff.score.reverse import integrate_posterior

    grid = reverse_grid(sde, 40, "uniform")
    spin = integrate_posterior(rev, grid, "geodesic_midpoint", g, brownian=brownian)
    kappa, _ = rev.coefficients(sde.T - grid[-1])
    w = _weights(post.draw(spin, kappa, g)[0], 3)
    assert ((w - p[0]).abs() <= 4 * (p[0] * (1 - p[0]) / n).sqrt() + 1e-3).all(), (w, p)
    with pytest.raises(ValueError, match="brownian"):
        integrate_posterior(rev, grid, "geodesic_midpoint", g, brownian="nope")


def test_exit_grid_spends_every_step_before_kappa_exit():
    """reverse_grid(end_kappa=k): n steps ending exactly where kappa(t) = k."""
    from spindiff.sphere.grids import exit_time

    sde = _toy_sde(576)
    tau = reverse_grid(sde, 10, "speciation", end_kappa=100.0)
    assert len(tau) == 11 and tau[0] == 0.0
    k_end = float(sde.kappa(torch.tensor([sde.T - tau[-1]], dtype=F64))[0])
    assert abs(k_end / 100.0 - 1) < 1e-3
    assert exit_time(sde, 1e12) == pytest.approx(sde.t_eps)  # beyond kappa(t_eps): t_eps (no exit)
    with pytest.raises(ValueError, match="end_kappa"):
        reverse_grid(sde, 10, "speciation", end_kappa=1e-6)  # below kappa(T): nothing to integrate
