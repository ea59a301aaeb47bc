"""Architecture adapter identities (float64) on tiny GPT-2, tiny Llama and the bundled SmolLM2."""
from __future__ import annotations

import copy

import pytest
import torch

from spindiff.lm.adapter import HeadSpecError, get_adapter, manual_attention, parse_heads
from spindiff.lm.hooks import layer_values, record


def _ids(tok, text="The capital of France is Paris. The capital of Germany is", device=None):
    return tok(text, return_tensors="pt")["input_ids"].to(device)


def _check_head_sum(model, tok):
    ad = get_adapter(model)
    ids = _ids(tok, device=next(model.parameters()).device)
    with torch.no_grad(), record(ad, ["blocks.*.attn.out", "blocks.*.attn.in"]) as acts, ad.capture_z() as zs:
        model(input_ids=ids)
    attn_out, attn_in = layer_values(acts, "attn.out"), layer_values(acts, "attn.in")
    for l in range(ad.n_layers):
        per_head = ad.head_outputs(zs[l], l)  # (B, T, H, D)
        b = ad.layer_weights(l).b_O
        total = per_head.sum(-2) + (0 if b is None else b)
        rel = (total - attn_out[l]).norm() / attn_out[l].norm()
        assert rel <= 1e-6, (l, rel)
        # the adapter's W_Q/W_K/W_V (+ biases, RoPE, GQA mapping) reproduce z itself
        _, z = manual_attention(ad, attn_in[l], l)
        relz = (z - zs[l]).norm() / zs[l].norm()
        assert relz <= 1e-6, (l, relz)
    return ad


def _check_hook_ablation_equals_weight_edit(model, tok, layer, head):
    ad = get_adapter(model)
    ids = _ids(tok)
    with torch.no_grad(), ad.ablate([(layer, head)], "zero"):
        hooked = model(input_ids=ids).logits
    edited = copy.deepcopy(model)
    ad2 = get_adapter(edited)
    with torch.no_grad():
        op = ad2.out_proj(layer)
        dh = ad2.d_head
        if ad2.spec.o_layout == "conv1d":
            op.weight[head * dh:(head + 1) * dh, :] = 0  # Conv1D: rows are the head's block
        else:
            op.weight[:, head * dh:(head + 1) * dh] = 0  # Linear: columns are the head's block
        ref = edited(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert torch.allclose(hooked, ref, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(hooked, base)  # the ablation did something


def test_head_sum_identity_tiny(tiny_model):
    model, tok = tiny_model
    _check_head_sum(model, tok)


def test_ablation_hook_matches_weight_edit_tiny(tiny_model):
    model, tok = tiny_model
    _check_hook_ablation_equals_weight_edit(model, tok, layer=1, head=2)


def test_gqa_mapping(tiny_llama):
    model, _ = tiny_llama
    ad = get_adapter(model)
    assert (ad.n_heads, ad.n_kv_heads) == (4, 2)
    assert [ad.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    w = ad.layer_weights(0)
    k = model.model.layers[0].self_attn.k_proj.weight  # (Hkv*dh, D)
    for h in range(ad.n_heads):
        kv = h // (ad.n_heads // ad.n_kv_heads)
        assert torch.equal(w.W_K[h], k[kv * ad.d_head:(kv + 1) * ad.d_head].T)


def test_gpt2_wo_block_is_rows(tiny_gpt2):
    model, _ = tiny_gpt2
    ad = get_adapter(model)
    w = ad.layer_weights(0)
    c = model.transformer.h[0].attn.c_proj.weight
    assert torch.equal(w.W_O[1], c[ad.d_head:2 * ad.d_head, :])


def test_mean_ablation_uses_reference_mean(tiny_gpt2):
    model, tok = tiny_gpt2
    ad = get_adapter(model)
    ids = _ids(tok)
    mz = ad.mean_z(ids)
    with torch.no_grad(), ad.ablate([(0, 1)], "mean", mz), ad.capture_z([0]) as zs:
        model(input_ids=ids)
    # capture hook was registered after the ablation hook, so it sees the replaced z
    assert torch.allclose(zs[0][0, :, 1], mz[0][1].expand_as(zs[0][0, :, 1]))


@pytest.mark.parametrize("spec,expected", [
    ("L1H2", [(1, 2)]),
    ("L1H2,L0H0", [(1, 2), (0, 0)]),
    ("L1", [(1, 0), (1, 1), (1, 2), (1, 3)]),
    ("all", [(l, h) for l in range(2) for h in range(4)]),
    ("l0h3, L0H3", [(0, 3)]),
])
def test_parse_heads(spec, expected):
    assert parse_heads(spec, 2, 4) == expected


@pytest.mark.parametrize("spec", ["L99H3", "L0H9", "L5", "X3", "L3H", ""])
def test_parse_heads_errors_name_shape(spec):
    with pytest.raises(HeadSpecError, match="2 layers x 4 heads"):
        parse_heads(spec, 2, 4, "tiny")


@pytest.mark.smollm2
@pytest.mark.slow
def test_head_sum_identity_smollm2(smollm2):
    ad = _check_head_sum(smollm2.model, smollm2.tokenizer)
    assert (ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.d_model) == (30, 9, 3, 576)
    assert ad.tied


@pytest.mark.smollm2
@pytest.mark.slow
def test_ablation_hook_matches_weight_edit_smollm2(smollm2):
    _check_hook_ablation_equals_weight_edit(smollm2.model, smollm2.tokenizer, layer=3, head=5)


@pytest.mark.gpu
def test_head_sum_identity_cuda():
    from spindiff.lm.models import build_tiny_model

    for name in ("tiny-gpt2", "tiny-llama"):
        model, tok = build_tiny_model(name, dtype=torch.float64)
        _check_head_sum(model.cuda(), tok)


def test_mean_z_ignores_left_padding(tiny_gpt2):
    """A left-padded batch gives the same mean z as the unpadded sequences run one by one
    (GPT-2's learned absolute positions must start at each row's first real token; RoPE is
    shift-invariant, so only an absolute-position family shows the difference)."""
    model, tok = tiny_gpt2
    ad = get_adapter(model)
    a = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    b = tok("a dog", add_special_tokens=False)["input_ids"]
    assert len(a) > len(b)
    pad = [0] * (len(a) - len(b))
    ids = torch.tensor([a, pad + b])
    mask = torch.tensor([[1] * len(a), [0] * len(pad) + [1] * len(b)])
    with torch.no_grad():
        mz = ad.mean_z(ids, mask)
        za = ad.mean_z(torch.tensor([a]))
        zb = ad.mean_z(torch.tensor([b]))
    for l in mz:
        ref = (za[l] * len(a) + zb[l] * len(b)) / (len(a) + len(b))
        assert torch.allclose(mz[l], ref, atol=1e-5), l
