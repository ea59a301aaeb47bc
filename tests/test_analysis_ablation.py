"""Ablation: the layer-suffix fast scan equals one full forward per head (zero and mean, GPT-2
and Llama/GQA, ragged batches); targeted ablation equals the reference code's c_proj pre-hook;
mean z is the mean over real tokens."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from analysis.ablation import (ablation_scan, ablation_table, mean_z_over, scan_flops, scan_full_forward)
from analysis.prompts import from_triples, load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter


def _paper_tset(tok, window=128):
    return tokenize_set(tok, load_prompts("paper"), window, warn=False)


def test_fast_scan_equals_full_forward(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    sub = _paper_tset(tok).subset(range(7))
    assert len({len(x) for x in sub.ids}) > 1  # ragged -> left padding inside batches
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    mz = mean_z_over(model, ad, sub, 0, batch_size=4)
    for mode in ("zero", "mean"):
        fast = ablation_scan(model, ad, sub, heads, mode, mz, batch_size=3, max_rows=5, progress=False)
        full = scan_full_forward(model, ad, sub, heads, mode, mz)
        np.testing.assert_allclose(fast.base, full.base, atol=1e-10)
        np.testing.assert_allclose(fast.ablated, full.ablated, atol=1e-10)
        assert np.abs(fast.effect).max() > 1e-3  # ablation really changes the gap


def test_targeted_ablation_equals_reference_prehook(tiny_gpt2):
    """The reference code's Fig. 4 ablation: a forward pre-hook on c_proj zeroing head h's slice."""
    model, tok = tiny_gpt2
    ad = get_adapter(model)
    ts = tokenize_set(tok, from_triples([("Lions are carnivores. Cows are", "herbivores", "omnivores")]), 128,
                      warn=False)
    rows = ablation_table(model, ad, ts, [(1, 2), (0, 0)], ("zero",), None, 0)
    ids = torch.tensor([ts.ids[0]])
    g, b = int(ts.good_first[0]), int(ts.bad_first[0])
    dh = ad.d_head

    def gap_with(layer, head):
        def pre(mod, args):
            z = args[0].clone()
            z[..., head * dh:(head + 1) * dh] = 0
            return (z,)
        hk = ad.out_proj(layer).register_forward_pre_hook(pre)
        with torch.no_grad():
            lg = model(ids).logits[0, -1]
        hk.remove()
        return float(lg[g] - lg[b])

    by = {r["ablated"]: r for r in rows}
    assert by["L1H2"]["dl_ablated"] == pytest.approx(gap_with(1, 2), abs=1e-10)
    assert by["L0H0"]["dl_ablated"] == pytest.approx(gap_with(0, 0), abs=1e-10)
    assert "L1H2+L0H0" in by and all(r["prompt_id"] == 0 for r in rows)


def test_mean_z_is_mean_over_real_tokens(tiny_llama):
    model, tok = tiny_llama
    ad = get_adapter(model)
    ts = _paper_tset(tok).subset(range(5))
    mz = mean_z_over(model, ad, ts, 0, batch_size=2)
    per = []
    for ids in ts.ids:
        with torch.no_grad(), ad.capture_z() as zs:
            model(torch.tensor([ids]))
        per.append({l: z[0] for l, z in zs.items()})  # (T, H, dh)
    for l in range(ad.n_layers):
        ref = torch.cat([p[l] for p in per]).mean(0)
        assert torch.allclose(mz[l], ref, atol=1e-10)


def test_scan_flops_counts_less_work(tiny_gpt2):
    ad = get_adapter(tiny_gpt2[0])
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    fl = scan_flops(ad, [10, 12], heads)
    assert 0 < fl["fast_flops"] < fl["full_flops"] and fl["ratio_full_over_fast"] > 1.5


@pytest.mark.smollm2
@pytest.mark.slow
def test_fast_scan_on_smollm2(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ad = get_adapter(model)
    ts = _paper_tset(tok, 8192).subset([13, 19])
    heads = [(3, 5), (27, 2), (29, 8)]
    fast = ablation_scan(model, ad, ts, heads, "zero", None, progress=False)
    full = scan_full_forward(model, ad, ts, heads, "zero", None)
    np.testing.assert_allclose(fast.ablated, full.ablated, atol=1e-8)
