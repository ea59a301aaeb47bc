"""Every model family (spindiff/lm/families.py) on a tiny randomly initialised float64 model built
in-process from its transformers config class: one parametrised test per identity.

Adding a family = one entry in ``spindiff.lm.families.FAMILIES`` + one line in ``CASES``.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from analysis.ablation import ablation_scan, scan_full_forward
from analysis.attribution import atp
from analysis.paths import gradient_trace
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter, last_positions
from spindiff.lm.attention import attend
from spindiff.lm.families import FAMILIES, UnsupportedFamily, family_for
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.hooks import HookPointError, hooks, layer_values, record
from spindiff.lm.models import ModelLoadError, build_tiny_tokenizer, family_of
from spindiff.lm.tokens import pad_left

_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128)
# (case id, family, config class, config kwargs): ONE LINE PER FAMILY (or layout of a family)
CASES = [
    ("gpt2", "gpt2", "GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=128)),
    ("llama", "llama", "LlamaConfig", dict(_LM, attention_bias=True, tie_word_embeddings=False)),
    ("smollm2", "llama", "LlamaConfig", dict(_LM, hidden_size=48, num_attention_heads=6, tie_word_embeddings=True)),
    ("smollm3", "smollm3", "SmolLM3Config", dict(_LM, no_rope_layers=[1, 0, 1], tie_word_embeddings=True)),
    ("mistral", "mistral", "MistralConfig", dict(_LM, sliding_window=3)),
    ("mixtral", "mixtral", "MixtralConfig", dict(_LM, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
                                                 experts_implementation="eager")),
    ("qwen2", "qwen2", "Qwen2Config", dict(_LM, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    ("qwen3", "qwen3", "Qwen3Config", dict(_LM, head_dim=8)),
    ("gemma", "gemma", "GemmaConfig", dict(_LM, head_dim=8)),
    # float32: Gemma 2 runs HF's eager attention (soft-capping), whose float32 softmax turns a float64
    # model's masks into NaN rows under left padding
    ("gemma2", "gemma2", "Gemma2Config", dict(_LM, head_dim=8, sliding_window=3, query_pre_attn_scalar=12,
                                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                              dtype="float32")),
    ("pythia", "gpt_neox", "GPTNeoXConfig", dict(_LM, rotary_pct=0.5, use_parallel_residual=True)),
    ("gptj", "gptj", "GPTJConfig", dict(n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=4)),
    ("phi3", "phi3", "Phi3Config", dict(_LM, partial_rotary_factor=0.5, sliding_window=3)),
    ("opt", "opt", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                     word_embed_proj_dim=32, max_position_embeddings=128)),
    ("olmo2", "olmo2", "Olmo2Config", dict(_LM)),
]
IDS = [c[0] for c in CASES]
# identity tolerance: float64 to rounding; float32 cases (and HF's float32 RMSNorm / softmax inside
# float64 models, where a check goes through them) to float32 rounding
TIGHT, LOOSE = dict(rtol=1e-9, atol=1e-10), dict(rtol=2e-5, atol=2e-6)


def tol(case: str) -> dict:
    return LOOSE if "dtype" in next(c for c in CASES if c[0] == case)[3] else TIGHT
_MODELS: dict[str, tuple] = {}


def build(case: str):
    """(model, tokenizer) of a case: float64, eval, every parameter perturbed (biases and norm gains
    nonzero / not 1, so that each identity sees them)."""
    if case not in _MODELS:
        _, fam, cls, kw = next(c for c in CASES if c[0] == case)
        tok = build_tiny_tokenizer()
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        kw = dict(kw)
        dtype = getattr(torch, kw.pop("dtype", "float64"))
        impl = {k: kw.pop(k) for k in ("attn_implementation", "experts_implementation") if k in kw}
        cfg = getattr(transformers, cls)(vocab_size=len(tok), **ids, **kw)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, **impl).to(dtype).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        assert family_of(model) == fam
        _MODELS[case] = (model, tok)
    return _MODELS[case]


def _batch(tok):
    texts = ["The capital of France is Paris. The capital of Germany is", "A dog says woof. A cat"]
    return pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)


def _fwd(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), use_cache=False).logits


def _traced(case, names, last_only=False):
    """(model, adapter, ids, mask, activations at ``names``) of one forward of the case's batch."""
    model, tok = build(case)
    ad = get_adapter(model)
    ids, mask = _batch(tok)
    with torch.no_grad(), record(ad, names, last_only=last_only) as acts:
        _fwd(model, ids, mask)
    return model, ad, ids, mask, acts


@pytest.mark.parametrize("case", IDS)
def test_head_outputs_sum_to_attention_output(case):
    _, ad, _, _, acts = _traced(case, ["blocks.*.attn.z", "blocks.*.attn.out"])
    for l in range(ad.n_layers):
        b = ad.layer_weights(l).b_O
        total = ad.head_outputs(acts[f"blocks.{l}.attn.z"], l).sum(-2) + (0 if b is None else b)
        torch.testing.assert_close(total, acts[f"blocks.{l}.attn.out"], **tol(case))


@pytest.mark.parametrize("case", IDS)
def test_hook_ablation_equals_weight_edit(case):
    model, tok = build(case)
    ad = get_adapter(model)
    ids, mask = _batch(tok)
    layer, head, dh = 1, 2, ad.d_head
    with torch.no_grad(), ad.ablate([(layer, head)], "zero"):
        hooked = _fwd(model, ids, mask)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        W = get_adapter(edited).out_proj(layer).weight
        if ad.spec.o_layout == "conv1d":
            W[head * dh:(head + 1) * dh, :] = 0  # Conv1D: rows are the head's block
        else:
            W[:, head * dh:(head + 1) * dh] = 0  # Linear: columns
        ref = _fwd(edited, ids, mask)
        base = _fwd(model, ids, mask)
    torch.testing.assert_close(hooked, ref, **tol(case))
    assert not torch.allclose(hooked, base)


@pytest.mark.parametrize("case", IDS)
def test_layer_suffix_scan_equals_full_forward_scan(case):
    model, tok = build(case)
    ad = get_adapter(model)
    ts = tokenize_set(tok, load_prompts("paper"), 128, warn=False).subset(range(4))
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    fast = ablation_scan(model, ad, ts, heads, "zero", None, tok.pad_token_id, batch_size=3, max_rows=6,
                         progress=False)
    full = scan_full_forward(model, ad, ts, heads, "zero", None, tok.pad_token_id)
    np.testing.assert_allclose(fast.base, full.base, **tol(case))
    np.testing.assert_allclose(fast.ablated, full.ablated, **tol(case))
    assert np.abs(fast.effect).max() > 1e-4


@pytest.mark.parametrize("case", IDS)
def test_recomputed_attention_equals_model(case):
    _, ad, _, mask, acts = _traced(case, ["blocks.*.attn.in", "blocks.*.attn.z"])
    real = mask.bool()
    for l in range(ad.n_layers):
        x = acts[f"blocks.{l}.attn.in"]
        z = attend(ad, l, x, x, x, mask, last_positions(mask)).z
        torch.testing.assert_close(z[real], acts[f"blocks.{l}.attn.z"][real], **tol(case))


@pytest.mark.parametrize("case", IDS)
def test_atp_equals_first_order_finite_difference(case):
    model, tok = build(case)
    ad = get_adapter(model)
    ids, mask = _batch(tok)
    good, bad = torch.tensor([5, 7]), torch.tensor([9, 11])
    tr = gradient_trace(model, ad, ids, mask, good, bad, branches=False)
    pred = atp(tr, "zero")  # (B, L, H)
    # HF's RMSNorm (and Gemma 2's softmax) compute in float32, whose rounding over eps limits the
    # difference there: a larger step, Richardson-extrapolated (error O(eps^4)); LayerNorm families
    # are float64 throughout (and OPT's ReLU wants a small step)
    eps, rtol = (1e-5, 1e-5) if ad.spec.norm == "layer" else (1e-2, 1e-3) if tol(case) is TIGHT else (1e-2, 2e-2)

    def gap(l, h, s):
        def scale(z, point):
            z = z.clone()
            z[..., h, :] *= 1 - s
            return z
        with torch.no_grad(), hooks(ad, {f"blocks.{l}.attn.z": scale}):
            lg = _fwd(model, ids, mask)[:, -1]
        return (lg.gather(-1, good[:, None]) - lg.gather(-1, bad[:, None]))[:, 0]
    for l, h in [(0, 1), (1, 3), (ad.n_layers - 1, 0)]:
        d = lambda e: (gap(l, h, e) - gap(l, h, -e)) / (2 * e)  # noqa: E731
        fd = ((4 * d(eps) - d(2 * eps)) / 3).numpy()
        np.testing.assert_allclose(pred[:, l, h], fd, rtol=rtol, atol=rtol * 3e-2)


@pytest.mark.parametrize("case", IDS)
def test_field_reproduces_the_logits_attention_part(case):
    """The provider's per-head N (frozen final norm) summed over heads equals every attention branch's
    contribution to the residual at the last position through the same frozen norm (biases aside),
    and the components through that linear map give the model's logits."""
    model, ad, ids, mask, acts = _traced(case, ["blocks.*.attn.resid_out", "blocks.*.attn.out", "ln_final.in",
                                                "logits"], last_only=True)
    out = ContextFieldProvider(model, "all", "in_situ", normalize=False, final_norm=True, adapter=ad)(ids, mask)
    x = acts["ln_final.in"]
    scale, center = ad.final_norm_scale(x)
    lin = lambda v: ((v - v.mean(-1, keepdim=True)) if center else v) * scale  # noqa: E731
    attn = torch.zeros_like(x)
    bias = torch.zeros_like(x)
    for l in range(ad.n_layers):
        attn = attn + acts[f"blocks.{l}.attn.resid_out"]
        b = ad.layer_weights(l).b_O
        if b is not None:
            s = ad.post_attn_scale(l, acts[f"blocks.{l}.attn.out"])
            bias = bias + (b if s is None else b * s)
    # (post-attention norms: HF's RMSNorm computes in float32)
    torch.testing.assert_close(out.per_head.sum(1), lin(attn - bias), **(LOOSE if ad.spec.post_attn_norm else tol(case)))
    fn = ad.final_norm()
    const = getattr(fn, "bias", None)
    W_U = ad.unembedding()
    b_U = getattr(model.get_output_embeddings(), "bias", None)
    logits = (lin(x) + (0 if const is None else const)) @ W_U.T + (0 if b_U is None else b_U)
    torch.testing.assert_close(logits, acts["logits"], **LOOSE)  # HF's RMSNorm computes in float32


def test_unsupported_model_type_is_refused_by_name():
    cfg = transformers.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    with pytest.raises(UnsupportedFamily, match="model_type 'bloom' has no model family"):
        family_for(cfg)
    with pytest.raises(ModelLoadError, match="'bloom'"):
        family_of(transformers.AutoModelForCausalLM.from_config(cfg))
    post_ln = transformers.OPTConfig(do_layer_norm_before=False, hidden_size=16, num_attention_heads=2)
    with pytest.raises(UnsupportedFamily, match="post-LayerNorm OPT"):
        family_for(post_ln)


def test_missing_hook_point_names_the_family():
    model, _ = build("olmo2")
    with pytest.raises(HookPointError, match="blocks.0.ln1.in.*olmo2"):
        with hooks(get_adapter(model), {"blocks.0.ln1.in": lambda x, p: None}):
            pass
    assert set(FAMILIES) <= {c[1] for c in CASES}  # every family entry has a test case


def test_hooks_are_removed_after_an_error():
    model, tok = build("llama")
    ad = get_adapter(model)
    with pytest.raises(RuntimeError):
        with hooks(ad, {"blocks.*.attn.z": lambda z, p: None, "ln_final.in": lambda x, p: None}):
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    ids, mask = _batch(tok)
    with torch.no_grad(), record(ad, ["blocks.*.attn.z"], last_only=True) as acts:
        _fwd(model, ids, mask)
    assert set(layer_values(acts, "attn.z")) == set(range(ad.n_layers))


def _run(args, cwd, home):
    """A CLI in a subprocess with the suite's hermetic environment (conftest) and an empty $HOME."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": str(home)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", IDS)
def test_saved_folder_runs_both_clis(case, tmp_path):
    """(float32, as the CLIs run models: HF's grouped-expert kernel of Mixtral has no float64 on CPU)"""
    model, tok = build(case)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    root = Path(__file__).resolve().parents[1]
    r = _run(["-m", "analysis", "all", f"model.name={folder}", "model.dtype=float32", "prompts=paper",
              "scan_prompts=3", "t_steps=3", "n_permutations=20", "n_bootstrap=20", "n_splits=5", "progress=false",
              f"out={tmp_path / 'analysis'}"], root, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "analysis" / "report.json").exists()
    r = _run(["sample.py", "ckpt=none", "sampler.prior=lm", f"model.name={folder}", "max_new_tokens=3",
              "sampler.steps=3", "prompt=The capital of France is", f"out={tmp_path / 'sample'}"], root, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "sample" / "samples.jsonl").exists()
