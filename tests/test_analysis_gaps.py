"""Gap tables: protocol=paper against an independent loop re-implementation of the reference
formulas on HF weights, the W_O slice question settled by the real forward pass, GQA, the
in_situ decomposition of dL_actual, whole-word candidates, and batching invariance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.gaps import compute_gaps, paper_gap_table, unembedding_diff
from analysis.prompts import from_triples, load_prompts, tokenize_set

PROMPTS = [("The capital of France is Paris. The capital of Germany is", "Berlin", "Rome"),
           ("A dog says woof. A cat says", "meow", "moo"),
           ("The opposite of hot is", "cold", "warm"),
           ("Lions are carnivores. Cows are", "herbivores", "omnivores"),
           ("To see, you use your eyes. To hear, you use your", "ears", "nose"),
           ("The Pacific is an ocean. The Amazon is a", "river", "lake")]


def _tset(tok, triples=PROMPTS, candidates="first_token"):
    return tokenize_set(tok, from_triples(triples), 128, candidates=candidates, warn=False)


def _enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def reference_gpt2_loop(model, tok, triples):
    """The reference code's formulas, written independently: Conv1D weights sliced per head,
    W_O = c_proj.weight[:, h*dh:(h+1)*dh] applied as N0 @ W_O.T, raw wte inputs, e = wte rows,
    dL_actual from last_hidden_state @ wte.T. Loops over prompt, layer, head."""
    tr = model.transformer
    wte = tr.wte.weight
    D, H = model.config.n_embd, model.config.n_head
    dh = D // H
    theory = np.zeros((len(triples), len(tr.h), H))
    actual = np.zeros(len(triples))
    with torch.no_grad():
        for p, (prompt, good, bad) in enumerate(triples):
            ids = torch.tensor(_enc(tok, prompt))
            tg, tb = _enc(tok, " " + good)[0], _enc(tok, " " + bad)[0]
            S = wte[ids]
            for l, block in enumerate(tr.h):
                W_Q, W_K, W_V = block.attn.c_attn.weight.split(D, dim=1)
                for h in range(H):
                    sl = slice(h * dh, (h + 1) * dh)
                    Q, K, V = S @ W_Q[:, sl], S @ W_K[:, sl], S @ W_V[:, sl]
                    alpha = torch.softmax(Q[-1] @ K.T / math.sqrt(dh), dim=-1)
                    N0 = alpha @ V
                    W_O = block.attn.c_proj.weight[:, sl]
                    N_proj = N0 @ W_O.T
                    theory[p, l, h] = float(N_proj @ (wte[tg] - wte[tb]))
            hidden = tr(ids[None]).last_hidden_state[0, -1]
            logits = hidden @ wte.T
            actual[p] = float(logits[tg] - logits[tb])
    return theory, actual


def test_paper_protocol_matches_reference_loop(tiny_gpt2):
    model, tok = tiny_gpt2
    gt = compute_gaps(model, _tset(tok), "paper", batch_size=4, progress=False)
    theory, actual = reference_gpt2_loop(model, tok, PROMPTS)
    np.testing.assert_allclose(gt.dl_theory, theory, atol=1e-10)
    np.testing.assert_allclose(gt.dl_actual, actual, atol=1e-10)
    fixed = compute_gaps(model, _tset(tok), "paper_fixed", progress=False)
    assert np.abs(fixed.dl_theory - gt.dl_theory).max() > 1e-3  # the W_O slice matters on GPT-2


@pytest.mark.parametrize("protocol", ["paper", "paper_fixed"])
def test_reassociated_paper_table_equals_field_provider(tiny_model, protocol):
    """paper_gap_table (x_j . u scores, xbar W_V) == N_proj . de from ContextFieldProvider."""
    from spindiff.lm.adapter import get_adapter
    from spindiff.lm.field import ContextFieldProvider
    from spindiff.lm.tokens import pad_left

    model, tok = tiny_model
    ad = get_adapter(model)
    ts = _tset(tok)
    ids, mask = pad_left(ts.ids, 0)
    de = unembedding_diff(ad, ts.good_first, ts.bad_first)
    fast = paper_gap_table(ad, ids, mask, de, protocol)  # (B, L, H)
    per_head = ContextFieldProvider(model, "all", protocol, normalize=False)(ids, mask).per_head  # (B, K, D)
    ref = torch.einsum("bkd,bd->bk", per_head, de).view_as(fast)
    assert torch.allclose(fast, ref, atol=1e-10)


def test_which_wo_slice_is_the_real_head_output(tiny_gpt2):
    """c_proj ROWS h*dh:(h+1)*dh reproduce head h's contribution in the real forward pass; the
    reference code's COLUMNS slice does not."""
    model, tok = tiny_gpt2
    D, H = model.config.n_embd, model.config.n_head
    dh = D // H
    ids = torch.tensor([_enc(tok, PROMPTS[0][0])])
    for l, block in enumerate(model.transformer.h):
        store = {}
        hk = block.attn.c_proj.register_forward_hook(lambda m, a, o: store.update(z=a[0], out=o))
        with torch.no_grad():
            model(ids)
        hk.remove()
        z, out = store["z"][0, -1], store["out"][0, -1]
        W, b = block.attn.c_proj.weight, block.attn.c_proj.bias
        rows_sum = torch.zeros(D, dtype=W.dtype)
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            masked = torch.zeros_like(z)
            masked[sl] = z[sl]
            real = block.attn.c_proj(masked[None])[0] - b  # head h alone through the real layer
            rows, cols = z[sl] @ W[sl, :], z[sl] @ W[:, sl].T
            assert torch.allclose(rows, real, atol=1e-10)
            assert not torch.allclose(cols, real, atol=1e-3)
            rows_sum += rows
        assert torch.allclose(rows_sum + b, out, atol=1e-10)  # heads + bias = attention output


def test_gqa_paper_fixed_matches_linear_loop(tiny_llama):
    """Llama/GQA: query head h reads KV head h // (H / H_kv); nn.Linear slices; untied unembedding."""
    model, tok = tiny_llama
    c = model.config
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    dh = D // H
    ts = _tset(tok)
    gt = compute_gaps(model, ts, "paper_fixed", progress=False)
    paper = compute_gaps(model, ts, "paper", progress=False)
    np.testing.assert_allclose(paper.dl_theory, gt.dl_theory, atol=1e-12)  # Linear: reference slice is right
    E, U = model.model.embed_tokens.weight, model.lm_head.weight
    assert U.data_ptr() != E.data_ptr()
    with torch.no_grad():
        for p, (prompt, good, bad) in enumerate(PROMPTS):
            S = E[torch.tensor(_enc(tok, prompt))]
            de = U[_enc(tok, " " + good)[0]] - U[_enc(tok, " " + bad)[0]]
            for l, layer in enumerate(model.model.layers):
                a = layer.self_attn
                for h in range(H):
                    kv = h // (H // Hkv)
                    q = S[-1] @ a.q_proj.weight[h * dh:(h + 1) * dh].T
                    K = S @ a.k_proj.weight[kv * dh:(kv + 1) * dh].T
                    V = S @ a.v_proj.weight[kv * dh:(kv + 1) * dh].T
                    N0 = torch.softmax(K @ q / math.sqrt(dh), 0) @ V
                    N_proj = N0 @ a.o_proj.weight[:, h * dh:(h + 1) * dh].T
                    assert abs(float(N_proj @ de) - gt.dl_theory[p, l, h]) < 1e-10


def _check_decomposition(model, ts, tol_ln: float, tol_rms: float) -> None:
    from spindiff.lm.adapter import get_adapter

    ad = get_adapter(model)
    gt = compute_gaps(model, ts, "in_situ", final_norm=True, batch_size=4, progress=False)
    norm = ad.final_norm()
    is_ln = isinstance(norm, torch.nn.LayerNorm)
    tol = tol_ln if is_ln else tol_rms  # LlamaRMSNorm computes in float32 even for float64 inputs
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    U = ad.unembedding()
    for p in range(len(ts)):
        store = {}
        hooks = [ad.out_proj(l).register_forward_hook(lambda m, a, o, l=l: store.__setitem__(l, o[0, -1]))
                 for l in range(ad.n_layers)]
        hooks.append(norm.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0][0, -1])))
        with torch.no_grad():
            model(torch.tensor([ts.ids[p]]))
        for h in hooks:
            h.remove()
        x = store["x"]
        sd = torch.sqrt((x.var(unbiased=False) if is_ln else x.pow(2).mean()) + eps)
        de = U[ts.good_first[p]] - U[ts.bad_first[p]]

        def dla(v):
            with torch.no_grad():
                return float(((v - v.mean()) if is_ln else v) * norm.weight / sd @ de)

        for l in range(ad.n_layers):
            b_O = ad.out_proj(l).bias
            attn = store[l] - (b_O if b_O is not None else 0)
            assert abs(gt.dl_theory[p, l].sum() - dla(attn)) < tol
        bias = float((norm.bias @ de).detach()) if getattr(norm, "bias", None) is not None else 0.0
        assert abs(dla(x) + bias - gt.dl_actual[p]) < tol


def test_in_situ_decomposes_actual_gap(tiny_model):
    """in_situ with final_norm: per layer, the heads' dL_theory sum to the frozen-norm logit gap of
    (attention output - b_O); and the frozen-norm gap of the whole final residual (+ norm bias)
    is dL_actual. Checked per prompt without padding against hooks on the real modules."""
    model, tok = tiny_model
    _check_decomposition(model, _tset(tok), 1e-9, 1e-6)


def test_full_candidates_are_whole_word_logprobs(tiny_model):
    model, tok = tiny_model
    ts_full = _tset(tok, candidates="full")
    assert any(len(g) > 1 for g in ts_full.good_ids)  # really multi-token on the tiny tokenizer
    full = compute_gaps(model, ts_full, "in_situ", candidates="full", batch_size=4, progress=False)
    first = compute_gaps(model, _tset(tok), "in_situ", candidates="first_token", progress=False)
    np.testing.assert_allclose(full.dl_theory, first.dl_theory, atol=1e-10)  # theory: first tokens
    with torch.no_grad():
        for p, (prompt, good, bad) in enumerate(PROMPTS):
            lp = []
            for word in (good, bad):
                pre, cont = _enc(tok, prompt), _enc(tok, " " + word)
                logp = model(torch.tensor([pre + cont])).logits[0].log_softmax(-1)
                lp.append(sum(float(logp[len(pre) - 1 + j, t]) for j, t in enumerate(cont)))
            assert abs(full.dl_actual[p] - (lp[0] - lp[1])) < 1e-8


@pytest.mark.parametrize("protocol", ["paper", "paper_fixed", "in_situ"])
def test_batching_with_left_padding_is_invariant(tiny_model, protocol):
    model, tok = tiny_model
    ts = _tset(tok)
    a = compute_gaps(model, ts, protocol, batch_size=1, progress=False)
    b = compute_gaps(model, ts, protocol, batch_size=5, progress=False)
    np.testing.assert_allclose(a.dl_theory, b.dl_theory, atol=1e-9)
    np.testing.assert_allclose(a.dl_actual, b.dl_actual, atol=1e-9)


def test_shared_first_tokens_are_excluded(tiny_gpt2):
    model, tok = tiny_gpt2
    ps = load_prompts("paper")
    ts = tokenize_set(tok, ps, 128, warn=False)
    gt = compute_gaps(model, ts, "paper", progress=False)
    assert ts.shared_first and not gt.valid[ts.shared_first].any()
    assert np.all(gt.dl_theory[ts.shared_first] == 0)
    rows = list(gt.rows())
    assert len(rows) == 20 * 2 * 4 and rows[5][:3] == (0, 1, 1)


@pytest.mark.smollm2
@pytest.mark.slow
def test_in_situ_sum_on_smollm2(smollm2):
    """On the real SmolLM2 (float64): the in_situ decomposition of dL_actual holds; the paper
    protocol's W_O slice equals the correct one (Llama's nn.Linear)."""
    model, tok = smollm2.model, smollm2.tokenizer
    ts = tokenize_set(tok, from_triples(PROMPTS[:2]), 8192, warn=False)
    _check_decomposition(model, ts, 1e-9, 1e-4)
    paper = compute_gaps(model, ts, "paper", progress=False, actual=False)
    fixed = compute_gaps(model, ts, "paper_fixed", progress=False, actual=False)
    np.testing.assert_allclose(paper.dl_theory, fixed.dl_theory, atol=1e-12)


def test_stacked_and_frozen_weights_follow_weight_edits(tiny_model):
    """The cached stacked weights (and the adapter's frozen per-layer weights) are rebuilt when a
    parameter is edited in place, so a gap table never uses stale weights."""
    from analysis.gaps import stacked_heads
    from spindiff.lm.adapter import get_adapter

    model, tok = tiny_model
    ad = get_adapter(model)
    ids = torch.tensor([tok("the cat sat on the mat", add_special_tokens=False)["input_ids"][:5]])
    mask = torch.ones_like(ids)
    de = torch.randn(1, ad.d_model, dtype=torch.float64)
    before = paper_gap_table(ad, ids, mask, de, "paper_fixed")
    assert stacked_heads(ad, "paper_fixed") is stacked_heads(ad, "paper_fixed")  # cached
    w0 = ad.frozen_weights(0)
    assert ad.frozen_weights(0) is w0
    out = ad.out_proj(0)
    with torch.no_grad():
        out.weight.mul_(2.0)
    try:
        assert ad.frozen_weights(0) is not w0
        after = paper_gap_table(ad, ids, mask, de, "paper_fixed")
        assert torch.allclose(after[:, 0], 2 * before[:, 0], atol=1e-10)
        assert torch.allclose(after[:, 1:], before[:, 1:], atol=1e-12)
    finally:
        with torch.no_grad():
            out.weight.mul_(0.5)
    assert torch.allclose(paper_gap_table(ad, ids, mask, de, "paper_fixed"), before, atol=1e-12)


def test_gap_table_workspace_reuse_does_not_leak_between_calls(tiny_model):
    """paper_gap_table reuses its intermediate buffers across calls of the same shape: results of
    one call are not changed by the next, and interleaved inputs give the same numbers."""
    from spindiff.lm.adapter import get_adapter

    model, tok = tiny_model
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    V = ad.embedding().shape[0]
    ids_a, ids_b = torch.randint(0, V, (3, 6), generator=g), torch.randint(0, V, (3, 6), generator=g)
    mask = torch.ones_like(ids_a)
    de_a = torch.randn(3, ad.d_model, generator=g, dtype=torch.float64)
    de_b = torch.randn(3, ad.d_model, generator=g, dtype=torch.float64)
    a1 = paper_gap_table(ad, ids_a, mask, de_a, "paper")
    keep = a1.clone()
    b1 = paper_gap_table(ad, ids_b, mask, de_b, "paper")
    assert torch.equal(a1, keep)  # the first result is not a view of the workspace
    assert not torch.allclose(a1, b1)
    assert torch.equal(paper_gap_table(ad, ids_a, mask, de_a, "paper"), keep)
    # another shape, then back
    paper_gap_table(ad, ids_a[:2, 1:], mask[:2, 1:], de_a[:2], "paper")
    assert torch.equal(paper_gap_table(ad, ids_b, mask, de_b, "paper"), b1)
