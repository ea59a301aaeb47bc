"""vMF primitives (Bessel functions, Wood sampler, density) and the synthetic end-to-end validation."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, special

from spindiff.sphere.vmf import (
    kappa_from_mean_resultant,
    log_bessel_iv,
    log_normalizer,
    mean_resultant_length,
    sample_vmf,
)
from spindiff.validation.vmf_mixture import (
    VMFMixture,
    mmd2,
    random_mixture,
    run_mixture_experiment,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


@pytest.mark.parametrize("nu", [0.5, 7.0, 287.0, 383.0])
@pytest.mark.parametrize("x", [1e-30, 1e-3, 1.0, 300.0, 1e5, 1e9])
def test_log_bessel_iv_against_mpmath(nu, x):
    ref = float(mpmath.log(mpmath.besseli(nu, x)))
    assert abs(float(log_bessel_iv(nu, x)) - ref) <= 1e-10 * max(1.0, abs(ref))


@pytest.mark.parametrize("d", [3, 16, 576, 768])
def test_kappa_inversion(d):
    m = np.array([1e-12, 1e-3, 0.2, 0.7, 0.99, 1 - 1e-5, 1 - 1e-8])
    k = kappa_from_mean_resultant(m, d)
    a = mean_resultant_length(k, d)
    assert np.all(np.abs(a - m) <= 1e-9 * np.maximum(m, 1 - m) + 1e-15)


@pytest.mark.parametrize("d", [3, 16, 576])
@pytest.mark.parametrize("kappa", [0.0, 0.5, 40.0, 2000.0])
def test_density_normalises(d, kappa):
    """int C_d(k) e^{k x} |S^{d-2}| (1 - x^2)^{(d-3)/2} dx = 1 over x in [-1, 1]."""
    log_area_sub = math.log(2) + (d - 1) / 2 * math.log(math.pi) - special.gammaln((d - 1) / 2)
    log_c = float(log_normalizer(kappa, d))

    def integrand(x: float) -> float:
        with np.errstate(divide="ignore"):
            return math.exp(log_c + kappa * x + log_area_sub + (d - 3) / 2 * math.log1p(-x * x)) if abs(x) < 1 else 0.0

    mode = mean_resultant_length(kappa, d) if kappa > 0 else 0.0
    val, _ = integrate.quad(integrand, -1, 1, points=[float(mode)], limit=400, epsabs=1e-13)
    assert abs(val - 1.0) < 1e-7


def test_wood_sampler_d3_matches_exact_cdf():
    """On S^2 the cosine w = mu.x has CDF (e^{k w} - e^{-k}) / (e^k - e^{-k}); KS test."""
    from scipy import stats

    kappa = 5.0
    mu = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    x = sample_vmf(mu, kappa, n=20000, generator=torch.Generator().manual_seed(0))
    w = (x @ mu).numpy()
    cdf = lambda v: np.expm1(kappa * (v + 1)) / np.expm1(2 * kappa)  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > 1e-3
    # azimuth uniform around mu
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    e2 = torch.linalg.cross(mu, e1)
    phi = torch.atan2(x @ e2, x @ e1).numpy()
    assert stats.kstest(phi, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3


@pytest.mark.parametrize("d,kappa", [(576, 300.0), (576, 1e6), (768, 0.0), (16, 50.0)])
def test_wood_sampler_high_d_moments(d, kappa):
    n = 4000
    mu = torch.zeros(d, dtype=F64)
    mu[1] = 1.0
    x = sample_vmf(mu, kappa, n=n, generator=torch.Generator().manual_seed(1))
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-14
    w = x @ mu
    a = float(mean_resultant_length(kappa, d))
    var = 1 - a * a - (d - 1) * a / kappa if kappa > 0 else 1 / d  # dA/dkappa
    assert abs(float(w.mean()) - a) < 5 * math.sqrt(var / n)
    assert abs(float(w.var()) / var - 1) < 5 * math.sqrt(2 / n)


def test_mixture_score_is_gradient_of_log_prob():
    mix = random_mixture(5, (0.6, 0.4), 8.0, seed=2, dtype=F64)
    x = sample_vmf(torch.eye(5, dtype=F64)[0], 0.0, n=16, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
    x = x.detach()
    riem = g - (g * x).sum(-1, keepdim=True) * x
    assert torch.allclose(mix.score(x), riem, atol=1e-10)


def test_mmd_separates_distributions():
    mix = random_mixture(3, seed=0, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    a, _ = mix.sample(800, generator=gen)
    b, _ = mix.sample(800, generator=gen)
    other = VMFMixture(mix.means, mix.kappas, torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    c, _ = other.sample(800, generator=gen)
    assert abs(mmd2(a, b)) < 3e-3 < mmd2(a, c)


@pytest.mark.parametrize("dim", [3, 16])
def test_reverse_sde_recovers_mixture_weights(dim):
    """Train the score net (eta_train = 0) on a 3-mode vMF mixture, sample with the reverse SDE
    through geodesic EM: mode weights within 0.05, MMD far below the untrained network's."""
    res = run_mixture_experiment(dim, kappa=30.0 if dim == 3 else 60.0, train_steps=500, batch_size=256,
                                 n_samples=2000, n_heldout=1000, sample_steps=100, seed=0)
    assert res["max_weight_err"] < 0.05, res
    assert res["trained_mmd2"] < 0.1 * res["untrained_mmd2"], res
    assert res["trained_mmd2"] < 5e-3, res
    assert res["trained_norm_err"] < 1e-5
