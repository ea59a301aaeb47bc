"""Beyond the two-body term (float64, tiny GPT-2 and tiny Llama/GQA): the path terms sum to the full
first-order effect, the first-order effect is the derivative of dL for a small scaling of a head,
the attention recomputation and the QK fix's score shift match the real model / a JVP, and joint
ablation / pair interactions behave (zero for two heads that cannot interact)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from analysis.ablation import mean_z_over, scan_full_forward
from analysis.attention import attention_from_resid
from analysis.attribution import SaturationFix, atp, qk_fix
from analysis.gaps import compute_gaps, last_logits
from analysis.interactions import joint_ablation, pair_interactions
from analysis.paths import gradient_trace, path_terms, qkv_split
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter, last_positions
from spindiff.lm.tokens import pad_left


def _tset(tok, n=6):
    return tokenize_set(tok, load_prompts("paper"), 128, warn=False).subset(range(n))


def _exact_float64(model):
    """HF's LlamaRMSNorm computes in float32 whatever the model's dtype; for float64 identities the
    tiny Llama gets torch's RMSNorm (same weight and eps, computed in the input's dtype)."""
    if get_adapter(model).family != "llama":
        return model
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                new = nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=child.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                setattr(parent, name, new)
    return m


@pytest.fixture(scope="module")
def traced(tiny_model):
    model, tok = tiny_model
    model = _exact_float64(model)
    ad = get_adapter(model)
    ts = _tset(tok)
    ids, mask = pad_left(ts.ids, 0)
    assert len({len(x) for x in ts.ids}) > 1  # ragged: left padding is exercised
    tr = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first)
    return model, ad, ts, ids, mask, tr, mean_z_over(model, ad, ts, 0)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_path_terms_sum_to_first_order_effect(traced, mode):
    model, ad, ts, ids, mask, tr, mz = traced
    q = qkv_split(tr, ad)
    pt = path_terms(tr, ad, mode, mz, q)
    scale = np.abs(pt.total).max()
    assert scale > 0.1 and np.abs(pt.via_heads).max() > 1e-3 and np.abs(pt.via_mlps).max() > 1e-3
    np.testing.assert_allclose(pt.direct + pt.via_heads + pt.via_mlps, pt.total, atol=1e-10 * scale)
    np.testing.assert_allclose(pt.total, atp(tr, mode, mz), atol=1e-12 * scale)
    # the split of the head paths into queries, keys and values
    np.testing.assert_allclose(pt.via_q + pt.via_k + pt.via_v, pt.via_heads, atol=1e-10 * scale)
    assert min(np.abs(getattr(pt, k)).max() for k in ("via_q", "via_k", "via_v")) > 1e-4
    # last layer: nothing after it but the final norm
    assert np.abs(pt.via_heads[:, -1]).max() == 0 and np.abs(pt.via_mlps[:, -1]).max() > 0


def test_trace_without_branches_gives_the_same_attribution(traced):
    model, ad, ts, ids, mask, tr, mz = traced
    lean = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first, branches=False)
    for mode in ("zero", "mean"):
        np.testing.assert_allclose(atp(lean, mode, mz), atp(tr, mode, mz), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="branches=True"):
        path_terms(lean, ad)


def test_direct_frozen_is_minus_dl_theory(traced):
    model, ad, ts, ids, mask, tr, mz = traced
    gt = compute_gaps(model, ts, "in_situ", adapter=ad, progress=False)
    pt = path_terms(tr, ad, "zero")
    np.testing.assert_allclose(pt.direct_frozen, -gt.dl_theory, atol=1e-12)
    np.testing.assert_allclose(tr.gap.numpy(), gt.dl_actual, atol=1e-12)
    assert np.abs(pt.direct - pt.direct_frozen).max() > 1e-6  # the final norm's statistics matter


def _dl_scaled(model, ad, ids, mask, ts, layer, head, eps, target=None):
    """dL with z_h -> z_h + eps (target - z_h) (target None: 0, i.e. a scaling by 1 - eps)."""
    dh = ad.d_head

    def pre(mod, args):
        z = args[0].clone()
        zh = z[..., head * dh:(head + 1) * dh]
        tgt = torch.zeros_like(zh) if target is None else target.to(zh).expand_as(zh)
        z[..., head * dh:(head + 1) * dh] = zh + eps * (tgt - zh)
        return (z,)
    hk = ad.out_proj(layer).register_forward_pre_hook(pre)
    try:
        lg = last_logits(model, ids, mask)
    finally:
        hk.remove()
    return (lg.gather(-1, ts.good_first[:, None]) - lg.gather(-1, ts.bad_first[:, None]))[:, 0].double().numpy()


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_first_order_effect_is_a_finite_difference(traced, mode):
    model, ad, ts, ids, mask, tr, mz = traced
    pred = atp(tr, mode, mz)
    eps = 1e-4  # central difference: truncation O(eps^2), rounding O(1e-16 / eps)
    for layer, head in [(0, 1), (1, 2), (ad.n_layers - 1, 0)]:
        tgt = None if mode == "zero" else mz[layer][head]
        fd = (_dl_scaled(model, ad, ids, mask, ts, layer, head, eps, tgt)
              - _dl_scaled(model, ad, ids, mask, ts, layer, head, -eps, tgt)) / (2 * eps)
        np.testing.assert_allclose(fd, pred[:, layer, head], rtol=1e-6, atol=1e-8)
        assert np.abs(fd).max() > 1e-3


def test_attention_recompute_matches_the_model(traced):
    model, ad, ts, ids, mask, tr, mz = traced
    for l in range(ad.n_layers):
        p = attention_from_resid(ad, l, tr.attn_in[l], mask, last_positions(mask))
        real = mask.bool()
        torch.testing.assert_close(p.z[real], tr.z[l][real], atol=1e-12, rtol=0)


def test_qk_fix_score_shift_is_the_jvp_and_correction_is_second_order(traced):
    model, ad, ts, ids, mask, tr, mz = traced
    fix = SaturationFix(tr, ad)
    pos = last_positions(mask)
    l2 = ad.n_layers - 1
    x = tr.attn_in[l2]
    d = torch.randn(2, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    ds = fix.score_shift(l2, d)
    for s in range(2):
        _, jv = torch.func.jvp(lambda xx: attention_from_resid(ad, l2, xx, mask, pos).scores[:, :, -1], (x,), (d[s],))
        real = mask.bool()[:, None, :].expand_as(jv)
        torch.testing.assert_close(ds[s][real], jv[real], atol=1e-10 * jv.abs().max().item(), rtol=0)
    # exact - linear softmax response vanishes to second order in the perturbation
    c1, c2 = fix.correction(l2, 1e-2 * d), fix.correction(l2, 1e-3 * d)
    ratio = float(c2.abs().max() / c1.abs().max())
    assert c1.abs().max() > 1e-6 and 0.005 < ratio < 0.02  # 10x smaller perturbation, ~100x smaller
    corr = qk_fix(tr, ad, "zero", None, fix)
    assert corr.shape == (len(ts), ad.n_layers, ad.n_heads) and np.abs(corr[:, -1]).max() == 0


def test_joint_ablation_equals_adapter_ablate(traced):
    model, ad, ts, ids, mask, tr, mz = traced
    specs = [[(0, 1)], [(0, 1), (1, 2)], [(1, 0), (1, 3)]]
    for mode in ("zero", "mean"):
        base, dl = joint_ablation(model, ad, ts, specs, mode, mz, max_rows=8)
        for s, spec in enumerate(specs):
            with ad.ablate(spec, mode, mz):
                lg = last_logits(model, ids, mask)
            ref = (lg.gather(-1, ts.good_first[:, None]) - lg.gather(-1, ts.bad_first[:, None]))[:, 0]
            np.testing.assert_allclose(dl[:, s], ref.double().numpy(), atol=1e-10)
    full = scan_full_forward(model, ad, ts, [(0, 1)], "zero")
    np.testing.assert_allclose(base, full.base, atol=1e-12)


def _toy(model, ad, cut: bool):
    """A copy of the tiny model in which head A = L0H0 and head B = L1H1 cannot interact: every
    norm is the identity, every MLP writes 0 and (``cut``) layer 1's queries, keys and values are
    blind to the subspace head A writes to. Then dL is additive in what A and B write."""
    m = copy.deepcopy(model)
    a2 = get_adapter(m)
    fam = a2.family
    with torch.no_grad():
        for l, blk in enumerate(a2.layers()):
            for n in (a2.spec.ln1, a2.spec.ln2):  # the attention's and the MLP's input norms (families.py)
                setattr(blk, n, nn.Identity())
            for p in (blk.mlp.c_proj if fam == "gpt2" else blk.mlp.down_proj).parameters():
                p.zero_()
        if fam == "gpt2":
            m.transformer.ln_f = nn.Identity()
        else:
            m.model.norm = nn.Identity()
        if cut:
            Q, _ = torch.linalg.qr(a2.layer_weights(0).W_O[0].T)  # (D, dh): where head A writes
            P = torch.eye(Q.shape[0], dtype=Q.dtype) - Q @ Q.T
            if fam == "gpt2":
                a2.attn(1).c_attn.weight.copy_(P @ a2.attn(1).c_attn.weight)  # x @ W
            else:
                for lin in (a2.attn(1).q_proj, a2.attn(1).k_proj, a2.attn(1).v_proj):
                    lin.weight.copy_(lin.weight @ P)  # x @ W.T
    return m, a2


@pytest.mark.parametrize("cut", [True, False])
def test_pair_interaction_of_non_interacting_heads_is_zero(tiny_model, cut):
    model, tok = tiny_model
    ts = _tset(tok)
    m, a2 = _toy(model, get_adapter(model), cut)
    pi = pair_interactions(m, a2, ts, [(0, 0), (1, 1), (1, 2)], "zero")
    I = pi.interaction
    assert np.abs(pi.single).min(1).max() > 1e-3  # both heads do something
    if cut:  # A and B: additive; B and C (same layer, linear readout): additive
        assert np.abs(I[:, 0, 1]).max() < 1e-10 and np.abs(I[:, 1, 2]).max() < 1e-10
    else:  # the control: layer 1 reads head A, so A and B interact
        assert np.abs(I[:, 0, 1]).max() > 1e-3
    recs = pi.pairs()
    assert len(recs) == 3 and {"head_a", "head_b", "interaction", "q_bh", "role"} <= set(recs[0])
