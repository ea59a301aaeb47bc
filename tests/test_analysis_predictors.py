"""Predictors past attribution patching (float64, tiny GPT-2 and tiny Llama/GQA): integrated
gradients along the ablation path (one step = AtP; completeness: a group's terms sum to the exact
effect of ablating the group, error shrinking with the steps), and the RelP rules (forward values
unchanged; relevance conserved layer by layer where the model has no biases)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from analysis.ablation import mean_z_over
from analysis.attribution import atp
from analysis.gaps import last_logits
from analysis.paths import gradient_trace
from analysis.predictors import (alphas, ig_attribution, make_groups, relp, relp_rules, residual_relevance)
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter
from spindiff.lm.tokens import pad_left
from tests.test_analysis_paths import _exact_float64


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, tok = tiny_model
    model = _exact_float64(model)
    ad = get_adapter(model)
    ts = tokenize_set(tok, load_prompts("paper"), 128, warn=False).subset(range(5))
    ids, mask = pad_left(ts.ids, 0)
    assert len({len(x) for x in ts.ids}) > 1  # ragged: left padding is exercised
    return model, ad, ts, ids, mask, mean_z_over(model, ad, ts, 0)


def _gap(model, ids, mask, ts):
    lg = last_logits(model, ids, mask)
    return (lg.gather(-1, ts.good_first[:, None]) - lg.gather(-1, ts.bad_first[:, None]))[:, 0].double().numpy()


def _group_effect(model, ad, ids, mask, ts, group, mode, mz):
    base = _gap(model, ids, mask, ts)
    with ad.ablate(group, mode, mz):
        return _gap(model, ids, mask, ts) - base


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ig_with_one_step_is_atp(setup, mode):
    model, ad, ts, ids, mask, mz = setup
    tr = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first, branches=False)
    ref = atp(tr, mode, mz)
    for grouping in ("joint", "layer", "head"):
        ig = ig_attribution(model, ad, ids, mask, ts.good_first, ts.bad_first, make_groups(ad, grouping), 1, mode, mz)
        assert ig.passes == 1
        np.testing.assert_allclose(ig.attribution, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def _completeness(setup, mode, rule, which, steps):
    """Sum of a group's IG terms -> exact effect of ablating the group: monotone in the steps, and
    in the asymptotic regime 4x the steps divide the error by 4 (left) or 16 (midpoint), within a
    factor 2; the last error is small against the effect."""
    model, ad, ts, ids, mask, mz = setup
    group = {"head": make_groups(ad, "head")[1], "layer": make_groups(ad, "layer")[0],
             "joint": make_groups(ad, "joint")[0]}[which]
    exact = _group_effect(model, ad, ids, mask, ts, group, mode, mz)
    assert np.abs(exact).max() > 1e-3
    errs = []
    for S in steps:
        a = ig_attribution(model, ad, ids, mask, ts.good_first, ts.bad_first, [group], S, mode, mz, rule=rule,
                           max_rows=256).attribution
        errs.append(np.abs(sum(a[:, l, h] for l, h in group) - exact).max())
    order = 1 if rule == "left" else 2
    assert errs[2] < errs[1] < errs[0], (which, errs)
    assert errs[2] / errs[1] < 2 * 0.25 ** order, (which, errs)
    assert errs[2] < (0.15 if order == 1 else 0.01) * np.abs(exact).max(), (which, errs)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("rule", ["left", "midpoint"])
def test_ig_completeness_single_head(setup, mode, rule):
    """One head's own path: its IG term -> its exact single-head ablation effect."""
    _completeness(setup, mode, rule, "head", (4, 16, 64))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("rule", ["left", "midpoint"])
@pytest.mark.parametrize("which", ["layer", "joint"])
def test_ig_completeness_groups(setup, mode, rule, which):
    """A layer's heads / all heads jointly: the terms sum to the group's exact effect (a whole
    layer of the tiny Llama needs ~64 steps to reach the asymptotic regime)."""
    _completeness(setup, mode, rule, which, (16, 64, 256))


def test_ig_groups_and_bad_arguments(setup):
    model, ad, ts, ids, mask, mz = setup
    assert len(make_groups(ad, "joint")) == 1 and len(make_groups(ad, "layer")) == ad.n_layers
    assert len(make_groups(ad, "head", [0])) == ad.n_heads
    assert alphas(2, "left") == [0.0, 0.5] and alphas(2, "midpoint") == [0.25, 0.75]
    for bad in (lambda: make_groups(ad, "neuron"), lambda: alphas(0, "left"), lambda: alphas(2, "simpson")):
        with pytest.raises(ValueError):
            bad()
    ig = ig_attribution(model, ad, ids, mask, ts.good_first, ts.bad_first, make_groups(ad, "layer", [0]), 3)
    assert np.isnan(ig.attribution[:, 1:]).all() and np.isfinite(ig.attribution[:, 0]).all()
    assert ig.passes == 1 + 2  # the shared a = 0 row + 2 steps of the one group
    # chunking the rows does not change the result
    small = ig_attribution(model, ad, ids, mask, ts.good_first, ts.bad_first, make_groups(ad, "layer", [0]), 3,
                           max_rows=len(ts))
    np.testing.assert_allclose(small.attribution[:, 0], ig.attribution[:, 0], atol=1e-12)


def test_relp_rules_leave_the_forward_unchanged(setup):
    model, ad, ts, ids, mask, mz = setup
    ref = _gap(model, ids, mask, ts)
    with relp_rules(ad, mask) as zs, torch.enable_grad():
        got = _gap(model, ids, mask, ts)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert len(zs) == ad.n_layers
    # and RelP differs from AtP (the rules change the backward)
    tr = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first, branches=False)
    r = relp(model, ad, ids, mask, ts.good_first, ts.bad_first)
    assert np.abs(r - atp(tr)).max() > 1e-3


def _biases(model, scale: float):
    """A copy with every bias set to ``scale`` x standard normal (0: bias-free)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def test_relp_conserves_relevance_without_biases(setup):
    """Bias-free copy: the rules make the network linear at the actual point, so the relevance of
    the residual entering every layer and the final norm equals the logit gap; with biases it
    does not (they absorb some)."""
    model, ad, ts, ids, mask, mz = setup
    m = _biases(model, 0.0)
    a2 = get_adapter(m)
    rel, gap = residual_relevance(m, a2, ids, mask, ts.good_first, ts.bad_first)
    assert gap.abs().max() > 1e-2
    np.testing.assert_allclose(rel.numpy(), gap[:, None].expand_as(rel).numpy(), atol=1e-9 * gap.abs().max().item())
    mb = _biases(model, 0.1)
    rel_b, gap_b = residual_relevance(mb, get_adapter(mb), ids, mask, ts.good_first, ts.bad_first)
    assert np.abs(rel_b.numpy() - gap_b[:, None].numpy()).max() > 1e-6  # biases absorb relevance


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_lookahead_is_atp_like_and_exact_at_the_end(setup, mode):
    """The residual trace's z gradients give AtP; looking ahead past the last layer is the exact
    scan; looking ahead k layers is exact up to the linearisation after them (a small head
    scaling: LA_k and the exact effect agree to second order)."""
    from analysis.ablation import ablation_scan
    from analysis.lookahead import lookahead, residual_trace, unembed_rows

    model, ad, ts, ids, mask, mz = setup
    tr = residual_trace(model, ad, ids, mask, ts.good_first, ts.bad_first)
    ref = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first, branches=False)
    for l in range(ad.n_layers):
        torch.testing.assert_close(tr.g_z[l], ref.g_z[l], atol=1e-12, rtol=0)
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    ue = unembed_rows(model, ad, ts.good_first, ts.bad_first)
    exact = ablation_scan(model, ad, ts, heads, mode, mz, 0, len(ts), progress=False).effect
    la = lookahead(ad, tr, heads, ad.n_layers, ue, mode, mz)
    np.testing.assert_allclose(la, exact, atol=1e-10)
    la1 = lookahead(ad, tr, heads, 1, ue, mode, mz, max_rows=len(ts))  # chunked rows
    last = [i for i, (l, _) in enumerate(heads) if l == ad.n_layers - 1]
    np.testing.assert_allclose(la1[:, last], exact[:, last], atol=1e-10)  # k = 1 at the last layer: exact
    early = [i for i, (l, _) in enumerate(heads) if l < ad.n_layers - 1]
    assert np.abs(la1[:, early] - exact[:, early]).max() > 1e-6  # elsewhere linearised
    with pytest.raises(ValueError, match="k=0"):
        lookahead(ad, tr, heads, 0, ue, mode, mz)
