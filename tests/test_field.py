"""Context-field provider: in_situ equals the heads' real outputs, batching with left padding
equals single prompts, the KV-cache step equals a full recompute, the paper protocol equals an
independent per-head loop."""
from __future__ import annotations

import pytest
import torch

from spindiff.lm.adapter import get_adapter
from spindiff.lm.field import ContextFieldProvider, reference_W_O

PROMPTS = ["The capital of France is Paris. The capital of Germany is", "A dog says woof. A cat says"]


def _batch(tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_in_situ_equals_head_outputs(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    prov = ContextFieldProvider(model, "all", "in_situ", normalize=False, final_norm=False)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    out = prov(ids)
    with torch.no_grad(), ad.capture_z() as zs:
        logits = model(input_ids=ids).logits
    ref = torch.cat([ad.head_outputs(zs[l][:, -1], l) for l in range(ad.n_layers)], dim=1)
    assert torch.allclose(out.per_head, ref, atol=1e-10)
    assert torch.allclose(out.field, ref.sum(1), atol=1e-10)
    assert torch.allclose(out.logits, logits[:, -1], atol=1e-10)


def test_batched_left_padding_matches_single(tiny_model):
    model, tok = tiny_model
    prov = ContextFieldProvider(model, "L1,L0H1", "in_situ", normalize=True, final_norm=True)
    ids, mask = _batch(tok, PROMPTS)
    assert (mask == 0).any()  # really ragged
    batched = prov(ids, mask)
    for i, p in enumerate(PROMPTS):
        single = prov(tok(p, return_tensors="pt")["input_ids"])
        assert torch.allclose(batched.per_head[i], single.per_head[0], atol=1e-8)
        assert torch.allclose(batched.logits[i], single.logits[0], atol=1e-8)
        assert torch.allclose(batched.field[i].norm(), torch.tensor(1.0, dtype=torch.float64))


def test_kv_cache_step_matches_recompute(tiny_model):
    model, tok = tiny_model
    prov = ContextFieldProvider(model, "all", "in_situ")
    ids, mask = _batch(tok, PROMPTS)
    first = prov(ids, mask, use_cache=True)
    nxt = first.logits.argmax(-1)  # (B,)
    stepped = prov.step(nxt, first)
    full = prov(torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1))
    assert torch.allclose(stepped.per_head, full.per_head, atol=1e-8)
    assert torch.allclose(stepped.logits, full.logits, atol=1e-8)


def test_paper_protocol_matches_naive_loop(tiny_model):
    model, tok = tiny_model
    ad = get_adapter(model)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    for protocol in ("paper", "paper_fixed"):
        prov = ContextFieldProvider(model, "all", protocol, normalize=False)
        out = prov(ids)
        X = ad.embedding()[ids[0]]  # (T, D)
        k = 0
        for l in range(ad.n_layers):
            w = ad.layer_weights(l)
            WO = reference_W_O(ad, l) if protocol == "paper" else w.W_O
            for h in range(ad.n_heads):
                q = X[-1] @ w.W_Q[h]
                a = torch.softmax((X @ w.W_K[h]) @ q / ad.d_head**0.5, 0)
                n0 = a @ (X @ w.W_V[h])
                assert torch.allclose(out.per_head[0, k], n0 @ WO[h], atol=1e-10)
                k += 1


def test_reference_wo_is_transposed_block_for_gpt2_only(tiny_gpt2, tiny_llama):
    ad = get_adapter(tiny_gpt2[0])
    assert not torch.allclose(reference_W_O(ad, 0), ad.layer_weights(0).W_O)
    adl = get_adapter(tiny_llama[0])
    assert torch.equal(reference_W_O(adl, 0), adl.layer_weights(0).W_O)


def test_topk_head_spec(tmp_path, tiny_gpt2):
    import json
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps({"heads_ranked": [{"layer": 1, "head": 3, "r": -0.9}, {"layer": 0, "head": 0, "r": 0.8}]}))
    prov = ContextFieldProvider(tiny_gpt2[0], "topk:2", report=str(rep))
    assert prov.heads == [(1, 3), (0, 0)]
    with pytest.raises(ValueError, match="field.report"):
        ContextFieldProvider(tiny_gpt2[0], "topk:2")
