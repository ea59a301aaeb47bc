"""LM-forward interventions (spindiff.lm.interventions), float64 on tiny GPT-2 / tiny Llama:
head gain 0 = zero-ablation, gain 1 = identity, gain g = scaling the head's W_O block, activation
addition at scale 0 = identity and = the residual shift it claims, the field provider seeing the
edited heads, report parsing and safe vector loading."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from analysis.report import write_csv
from spindiff.lm.adapter import get_adapter
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.interventions import (ActivationAddition, HeadGains, InterventionError, Interventions, contrast_vector,
                                       heads_from_report, interventions_from_config, load_vector, parse_head_gains,
                                       residual_at)

TEXT = "The capital of France is Paris. The capital of Germany is"


def _logits(model, tok, text=TEXT):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gain_zero_is_zero_ablation_and_gain_one_is_identity(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    base = _logits(model, tok)
    heads = [(0, 1), (1, 3)]
    with ad.ablate(heads, "zero"):
        ablated = _logits(model, tok)
    with HeadGains(ad, {h: 0.0 for h in heads}):
        gain0 = _logits(model, tok)
    assert torch.equal(gain0, ablated)
    assert not torch.allclose(gain0, base)  # the ablation does something here
    with HeadGains(ad, {h: 1.0 for h in heads}):
        gain1 = _logits(model, tok)
    assert torch.equal(gain1, base)
    assert torch.equal(_logits(model, tok), base)  # removed on exit


def test_gain_equals_scaling_the_heads_output_block(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    layer, head, g = 1, 2, 2.5
    with HeadGains(ad, {(layer, head): g}):
        hooked = _logits(model, tok)
    edited = copy.deepcopy(model)
    ad2 = get_adapter(edited)
    dh = ad2.d_head
    with torch.no_grad():
        W = ad2.out_proj(layer).weight
        if ad2.family == "gpt2":
            W[head * dh:(head + 1) * dh, :] *= g  # Conv1D rows = the head's block of W_O
        else:
            W[:, head * dh:(head + 1) * dh] *= g  # Linear columns
    ref = _logits(edited, tok)
    assert torch.allclose(hooked, ref, atol=1e-10, rtol=1e-9)


def test_field_provider_sees_the_head_gains(tiny_model):
    """Interventions act on the forward, so the spin sampler's field reflects them too."""
    model, tok = tiny_model
    ad = get_adapter(model)
    prov = ContextFieldProvider(model, "all", normalize=False, final_norm=False, adapter=ad)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    base = prov(ids).per_head  # (1, L*H, D), head index l*H + h
    k = 0 * ad.n_heads + 2  # L0H2
    with HeadGains(ad, {(0, 2): 3.0}):
        out = prov(ids).per_head
    assert torch.allclose(out[:, k], 3.0 * base[:, k], atol=1e-12)


def test_activation_addition_scale_zero_is_identity_and_shifts_the_residual(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    base = _logits(model, tok)
    pos, neg = ["The cat sat on the mat"], ["A dog ran in the park"]
    v0, info = contrast_vector(model, ad, tok, pos, neg, layer=0, scale=0.0)
    assert float(v0.norm()) == 0 and info["diff_norm"] > 0
    with ActivationAddition(ad, 0, v0):
        assert torch.equal(_logits(model, tok), base)
    # at the last layer the addition passes only through the final norm and the unembedding
    L = ad.n_layers - 1
    v, info = contrast_vector(model, ad, tok, pos, neg, layer=L, scale=0.7)
    assert abs(float(v.norm()) - 0.7 * info["ref_norm"]) < 1e-9 * info["ref_norm"]
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    grab = {}
    hk = ad.layers()[L].register_forward_hook(lambda m, a, o: grab.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    hk.remove()
    with torch.no_grad():
        manual = model.get_output_embeddings()(ad.final_norm()(grab["h"] + v))
        with ActivationAddition(ad, L, v):
            hooked = model(input_ids=ids).logits
    assert torch.allclose(hooked, manual, atol=1e-10, rtol=1e-9)
    assert torch.equal(_logits(model, tok), base)


def test_residual_direction_is_the_mean_difference(tiny_gpt2):
    model, tok = tiny_gpt2
    ad = get_adapter(model)
    pos, neg = ["The cat sat", "A big red"], ["He is up", "two and the"]
    v, info = contrast_vector(model, ad, tok, pos, neg, layer=1, scale=1.0)
    hp, hn = residual_at(model, ad, tok, pos, 1), residual_at(model, ad, tok, neg, 1)
    # batching with left padding gives the same last-position residual as one prompt at a time
    single = torch.stack([residual_at(model, ad, tok, [p], 1)[0] for p in pos])
    assert torch.allclose(hp, single, atol=1e-10)
    diff = hp.mean(0) - hn.mean(0)
    assert torch.allclose(v / v.norm(), diff / diff.norm(), atol=1e-12)
    with pytest.raises(InterventionError, match="zero"):
        contrast_vector(model, ad, tok, pos, pos, layer=1, scale=1.0)


def test_parse_head_gains(tiny_llama):
    ad = get_adapter(tiny_llama[0])
    g = parse_head_gains("L1H2:0.5, L0:2,L0H3:0", ad)
    assert g == {(1, 2): 0.5, (0, 0): 2.0, (0, 1): 2.0, (0, 2): 2.0, (0, 3): 0.0}
    for bad, match in [("L2H0:1", "outside the model"), ("L0H9:1", "outside the model"), ("L0H1", "HEAD:GAIN"),
                       ("L0H1:nan", "not finite"), ("L0H1:abc", "not a number"), ("", "empty")]:
        with pytest.raises(InterventionError, match=match):
            parse_head_gains(bad, ad)


def test_heads_from_report(tmp_path, tiny_llama):
    ad = get_adapter(tiny_llama[0])
    cols = ["layer", "head", "r", "p", "rank", "role"]
    rows = [[0, 1, 0.30, 0.1, 3, "cooperative"], [1, 2, 0.62, 0.01, 1, "cooperative"],
            [1, 0, -0.55, 0.02, 2, "antagonistic"], [0, 3, -0.10, 0.5, 4, "antagonistic"]]
    path = write_csv(tmp_path / "heads.csv", cols, rows)
    assert heads_from_report(path, ad, "cooperative", 2) == [(1, 2), (0, 1)]
    assert heads_from_report(path, ad, "antagonistic", 1) == [(1, 0)]
    iv = interventions_from_config({"heads_report": str(path), "heads_role": "cooperative", "heads_top": 1,
                                    "heads_gain": 0.0, "head_gains": "L0H0:2"}, tiny_llama[0], ad, tiny_llama[1])
    assert iv.items[0].gains == {(1, 2): 0.0, (0, 0): 2.0}
    bigger = write_csv(tmp_path / "other.csv", cols, [[5, 0, 0.9, 0.0, 1, "cooperative"]])
    with pytest.raises(InterventionError, match="does not fit this model"):
        heads_from_report(bigger, ad, "cooperative", 1)
    with pytest.raises(InterventionError, match="no such file"):
        heads_from_report(tmp_path / "missing.csv", ad)


class _NotATensor:
    pass


def test_load_vector_is_safe(tmp_path):
    v = np.arange(8, dtype=np.float32)
    np.save(tmp_path / "v.npy", v)
    assert torch.equal(load_vector(tmp_path / "v.npy", 8), torch.arange(8, dtype=torch.float64))
    torch.save({"direction": torch.ones(8)}, tmp_path / "v.pt")
    assert torch.equal(load_vector(tmp_path / "v.pt", 8), torch.ones(8, dtype=torch.float64))
    with pytest.raises(InterventionError, match="shape"):
        load_vector(tmp_path / "v.npy", 6)
    np.save(tmp_path / "obj.npy", np.array([_NotATensor()], dtype=object), allow_pickle=True)
    with pytest.raises(InterventionError, match="cannot be read safely"):
        load_vector(tmp_path / "obj.npy", 1)
    with open(tmp_path / "obj.pt", "wb") as f:
        pickle.dump(_NotATensor(), f, protocol=2)  # torch.load's own protocol (4 draws a UserWarning)
    with pytest.raises(InterventionError, match="cannot be read safely"):
        load_vector(tmp_path / "obj.pt", 8)


def test_interventions_compose_and_config(tiny_gpt2):
    model, tok = tiny_gpt2
    ad = get_adapter(model)
    base = _logits(model, tok)
    iv = interventions_from_config({"head_gains": "L0H1:0", "actadd": {"layer": 1, "scale": 0.3,
                                                                        "positive": "The cat", "negative": "A dog"}},
                                   model, ad, tok)
    assert isinstance(iv, Interventions) and [d["kind"] for d in iv.describe()] == ["head_gains", "activation_addition"]
    with iv:
        both = _logits(model, tok)
    assert not iv.installed and torch.equal(_logits(model, tok), base)
    with ad.ablate([(0, 1)], "zero"), iv.items[1]:
        ref = _logits(model, tok)
    assert torch.allclose(both, ref, atol=1e-12)
    assert not interventions_from_config({"actadd": {"scale": 0.0}}, model, ad, tok)
    with pytest.raises(InterventionError, match="outside"):
        interventions_from_config({"actadd": {"layer": 7, "scale": 1.0, "positive": "a", "negative": "b"}}, model, ad, tok)
    with pytest.raises(InterventionError, match="needs a direction"):
        interventions_from_config({"actadd": {"layer": 0, "scale": 1.0}}, model, ad, tok)
