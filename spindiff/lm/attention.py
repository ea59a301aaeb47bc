"""The one attention recomputation: a layer's attention from the adapter's weights and the
family's declarative details (:mod:`spindiff.lm.families`), differentiable in its inputs.

From the normalised inputs n_q, n_k, n_v (B, T, D) of a layer (they may differ: the query/key/value
split of the head paths differentiates each side on its own), in the row-vector convention of
:mod:`spindiff.lm.adapter`:

    q = n_q W_Q + b_Q,  k = n_k W_K + b_K,  v = n_v W_V + b_V      (GQA: W_K, W_V expanded)
    q, k <- q_norm(q), k_norm(k)         per head (Qwen3) or over all heads at once (OLMo2)
    (q, k) <- RoPE(q, k, positions)      rotate-half / interleaved, partial; skipped on layers
                                         without RoPE (SmolLM3) and for absolute-position families
    s = scaling * q k^T                  scaling: the module's own (1/sqrt(dh), Gemma 2's
                                         query_pre_attn_scalar^-1/2)
    s <- c tanh(s / c)                   attention soft-capping (Gemma 2)
    key j visible from query t iff j <= t, mask[j], and t - j < window (sliding-window layers)
    alpha = softmax(s),  z = alpha v     z: (B, T, H, dh), the output projection's input

``tests/test_families.py`` checks z against the model's own forward for every family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["AttnParts", "allowed_keys", "project", "attend", "attention_from_resid", "transpose_positional"]


@dataclass
class AttnParts:
    """q, k (after q/k norms and the positional transform) and v: (B, H, T, dh); scores, alpha:
    (B, H, T, T) (masked scores at the dtype's minimum); z: (B, T, H, dh)."""

    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    alpha: Tensor
    z: Tensor


def allowed_keys(mask: Tensor, window: int | None = None) -> Tensor:
    """(B, T, T) bool: key j visible from query t (causal, j a real token, t - j < window)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    if window:
        causal = causal.triu(-(window - 1))
    return causal[None] & mask.bool()[:, None, :]


def project(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """x (B, T, D) @ W (H, D, dh) (+ b (H, dh)) -> (B, H, T, dh)."""
    y = torch.einsum("btd,hdk->bhtk", x, W.to(x.dtype))
    return y if b is None else y + b.to(x.dtype)[None, :, None, :]


def _qk_norm(norm: nn.Module, x: Tensor, scope: str, group: int) -> Tensor:
    """A q or k norm on (B, H, T, dh): per head, or over the concatenation of the distinct heads
    (``full``; for k the KV heads, re-expanded to the query heads afterwards)."""
    if scope == "head":
        return norm(x)
    heads = x[:, ::group]  # (B, n, T, dh) the distinct (KV) heads
    B, n, T, dh = heads.shape
    y = norm(heads.transpose(1, 2).reshape(B, T, n * dh)).view(B, T, n, dh).transpose(1, 2)
    return y if group == 1 else y.repeat_interleave(group, dim=1)


def attend(ad, layer: int, n_q: Tensor, n_k: Tensor, n_v: Tensor, mask: Tensor, positions: Tensor,
           use_bias: bool = True, positional: bool = True, frozen: bool = True) -> AttnParts:
    """Attention of ``layer`` (module docstring) from normalised inputs n_q, n_k, n_v (B, T, D),
    the (B, T) mask of real tokens and the forward pass's (B, T) position ids.

    ``use_bias`` / ``positional`` = False drop the biases / RoPE (the paper protocol);
    ``frozen`` reads :meth:`ArchitectureAdapter.frozen_weights` (False: differentiable weights)."""
    w = ad.frozen_weights(layer) if frozen else ad.layer_weights(layer)
    q = project(n_q, w.W_Q, w.b_Q if use_bias else None)
    k = project(n_k, w.W_K, w.b_K if use_bias else None)
    v = project(n_v, w.W_V, w.b_V if use_bias else None)
    qn, kn = ad.qk_norms(layer)
    if qn is not None:
        q = _qk_norm(qn, q, ad.spec.qk_norm, 1)
    if kn is not None:
        k = _qk_norm(kn, k, ad.spec.qk_norm, ad.n_heads // ad.n_kv_heads)
    if positional:
        q, k = ad.apply_positional(q, k, positions, layer)
    s = ad.scaling(layer)
    scores = q @ k.transpose(-1, -2)
    # dividing by sqrt(dh) where that is the scale keeps the historical numbers bit for bit
    scores = scores / ad.d_head**0.5 if s == ad.d_head**-0.5 else scores * s
    cap = ad.softcap(layer)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed_keys(mask, ad.sliding_window(layer))[:, None], torch.finfo(scores.dtype).min)
    alpha = scores.softmax(-1)
    return AttnParts(q, k, v, scores, alpha, (alpha @ v).transpose(1, 2))


def attention_from_resid(ad, layer: int, resid: Tensor, mask: Tensor, positions: Tensor) -> AttnParts:
    """Attention of ``layer`` from the residual entering it (B, T, D), through its input norm."""
    n = ad.attn_input_norm(layer)(resid)
    return attend(ad, layer, n, n, n, mask, positions)


def transpose_positional(ad, x: Tensor, positions: Tensor, layer: int | None = None) -> Tensor:
    """R(positions)^T x for the layer's positional transform R (linear in q), x (B, H, T, dh):
    the vector-Jacobian product of ``apply_positional`` (identity without RoPE)."""
    f = lambda t: ad.apply_positional(t, t, positions, layer)[0]  # noqa: E731
    _, vjp = torch.func.vjp(f, torch.zeros_like(x))
    return vjp(x)[0]
