"""Statistics: vectorised formulas against scipy, the permutation test against an explicit
loop and for calibration under the null, bootstrap and split-half against direct computation,
replication with planted heads."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from analysis.stats import (bh_q, bootstrap_r, head_regression, head_stats, pearson_many, permutation_maxabs,
                            r_pvalue, replication, split_half)


def _data(P=20, K=30, strong=(3, -0.8), seed=0):
    """y ~ N(0,1); X noise, except column strong[0] correlated with y with sign of strong[1]."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=P)
    X = rng.normal(size=(P, K))
    k, c = strong
    X[:, k] = c * y + np.sqrt(1 - c * c) * 0.5 * rng.normal(size=P)
    return X, y


def test_regression_matches_scipy_linregress():
    X, y = _data()
    reg = head_regression(X, y)
    for k in range(X.shape[1]):
        lr = sps.linregress(X[:, k], y)
        assert reg["r"][k] == pytest.approx(lr.rvalue, abs=1e-12)
        assert reg["p"][k] == pytest.approx(lr.pvalue, rel=1e-8, abs=1e-300)
        assert reg["slope"][k] == pytest.approx(lr.slope, abs=1e-10)
        assert reg["intercept"][k] == pytest.approx(lr.intercept, abs=1e-10)
        assert reg["stderr"][k] == pytest.approx(lr.stderr, rel=1e-8)
        assert reg["p"][k] == pytest.approx(sps.pearsonr(X[:, k], y).pvalue, rel=1e-8)


def test_constant_column_and_batched_pearson():
    X, y = _data(K=4)
    X[:, 2] = 1.0
    r = pearson_many(X, y)
    assert r[2] == 0 and r_pvalue(r, len(y))[2] == pytest.approx(1.0)
    Xb = np.stack([X, 2 * X + 1])  # batched (2, P, K)
    np.testing.assert_allclose(pearson_many(Xb, np.stack([y, y])), np.stack([r, r]), atol=1e-12)


def test_bh_matches_scipy():
    p = np.random.default_rng(1).uniform(size=50) ** 3
    np.testing.assert_allclose(bh_q(p), sps.false_discovery_control(p), atol=1e-15)


def test_permutation_equals_explicit_loop():
    X, y = _data(P=12, K=8)
    N, seed = 50, 7
    res = permutation_maxabs(X, y, N, seed, chunk=N)
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(len(y)), (N, 1)), axis=1)
    null = [max(abs(sps.pearsonr(X[:, k], y[pm]).statistic) for k in range(X.shape[1])) for pm in perms]
    np.testing.assert_allclose(res.null_max, null, atol=1e-12)
    obs = np.abs(pearson_many(X, y)).max()
    assert res.p_family == pytest.approx((1 + np.sum(np.array(null) >= obs - 1e-12)) / (N + 1))


def test_permutation_detects_planted_head_and_controls_fwer():
    X, y = _data(P=40, K=100, strong=(17, 0.8))
    res = permutation_maxabs(X, y, 500, 0)
    assert res.p_family <= 2 / 501
    assert res.p_fwer[17] <= 2 / 501
    assert np.sum(res.p_fwer < 0.05) == 1  # only the planted head survives


def test_family_wise_p_is_calibrated_under_the_null():
    """Under H0 (y independent of every head) P(p_family < 0.05) ~ 0.05, although the best of
    100 heads at n = 20 routinely reaches |r| ~ 0.6."""
    rng = np.random.default_rng(3)
    ps, maxr = [], []
    for _ in range(300):
        X, y = rng.normal(size=(20, 100)), rng.normal(size=20)
        res = permutation_maxabs(X, y, 199, int(rng.integers(1 << 30)))
        ps.append(res.p_family)
        maxr.append(res.observed_max)
    rate = np.mean(np.array(ps) < 0.05)
    assert 0.02 <= rate <= 0.09
    assert np.median(maxr) > 0.55  # chance alone gives large |r| with many heads


def test_bootstrap_matches_direct_resampling():
    X, y = _data(P=15, K=5)
    lo, hi = bootstrap_r(X, y, n_bootstrap=200, seed=4, chunk=200)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 15, size=(200, 15))
    rs = np.array([[np.corrcoef(X[i, k], y[i])[0, 1] for k in range(5)] for i in idx])
    np.testing.assert_allclose(lo, np.quantile(rs, 0.025, axis=0), atol=1e-10)
    np.testing.assert_allclose(hi, np.quantile(rs, 0.975, axis=0), atol=1e-10)
    r = pearson_many(X, y)
    assert np.all((lo <= r + 1e-12) & (r <= hi + 1e-12))


def test_split_half_stability():
    X, y = _data(P=60, K=50, strong=(5, 0.95))
    sh = split_half(X, y, top_k=5, n_splits=100, seed=0)
    assert sh["top1_same_frac"] > 0.9 and sh["overlap_chance"] == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    noise = split_half(rng.normal(size=(60, 50)), rng.normal(size=60), top_k=5, n_splits=200, seed=1)
    assert abs(noise["overlap_mean"] - 0.1) < 0.05  # pure noise: chance overlap


def test_head_stats_and_replication():
    rng = np.random.default_rng(5)

    def sample(P):
        y = rng.normal(size=P)
        X = rng.normal(size=(P, 40))
        X[:, 3] = 0.9 * y + 0.3 * rng.normal(size=P)  # a real cooperative head
        X[:, 8] = -0.9 * y + 0.3 * rng.normal(size=P)  # a real antagonistic head
        return X, y

    X, y = sample(50)
    layer, head = np.arange(40) // 8, np.arange(40) % 8
    st = head_stats(X, y, layer, head, n_permutations=300, n_bootstrap=200, n_splits=50, top_k=5)
    assert {st.name(int(k)) for k in st.order[:2]} == {"L0H3", "L1H0"}
    assert st.record(3)["role"] == "cooperative" and st.record(8)["role"] == "antagonistic"
    assert st.index_of(1, 0) == 8 and st.index_of(9, 9) is None
    Xh, yh = sample(40)
    rep = replication(st, Xh, yh, top_k=5)
    replicated = {h["name"] for h in rep["heads"] if h["replicated"]}
    assert replicated == {"L0H3", "L1H0"}
    assert rep["n_replicated"] == 2
