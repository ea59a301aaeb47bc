"""One layer's attention recomputed from the adapter's weights, differentiable in its inputs.

Used by the query/key/value split of the head paths (:func:`analysis.paths.qkv_split`) and by
the attention-saturation correction of attribution patching (:mod:`analysis.attribution`). It
takes the residual entering the layer, the left-padding mask and the position ids of the real
forward pass, applies the layer's input norm, and follows the adapter's row-vector convention:

    q = n_q W_Q + b_Q,  k = n_k W_K + b_K,  v = n_v W_V + b_V      (GQA: W_K, W_V expanded)
    (q, k) -> adapter.apply_positional(q, k, positions)             (RoPE for Llama)
    alpha = softmax(q k^T / sqrt(dh)), key j allowed iff j <= t and mask[j]
    z = alpha v

``n_q``, ``n_k``, ``n_v`` may differ (the split differentiates each side on its own).
``tests/test_analysis_paths.py`` checks z against the real forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spindiff.lm.adapter import ArchitectureAdapter


@dataclass
class AttnParts:
    """q, k (after the positional transform) and v: (B, H, T, dh); scores, alpha: (B, H, T, T)
    (masked scores at the dtype's minimum); z: (B, T, H, dh)."""

    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    alpha: Tensor
    z: Tensor


def check_supported(ad: ArchitectureAdapter) -> None:
    """The recomputation covers standard 1/sqrt(dh) dot-product attention (GPT-2, Llama)."""
    c = ad.model.config
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False) \
            or getattr(c, "attn_logit_softcapping", None):
        raise NotImplementedError("attention recomputation supports plain 1/sqrt(d_head) scaling only")


def allowed_keys(mask: Tensor) -> Tensor:
    """(B, T, T) bool: key j visible from query t (causal, and j is a real token)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return causal[None] & mask.bool()[:, None, :]


def project(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """x (B, T, D) @ W (H, D, dh) (+ b (H, dh)) -> (B, H, T, dh)."""
    y = torch.einsum("btd,hdk->bhtk", x, W.to(x.dtype))
    return y if b is None else y + b.to(x.dtype)[None, :, None, :]


def attend(ad: ArchitectureAdapter, layer: int, n_q: Tensor, n_k: Tensor, n_v: Tensor, mask: Tensor,
           positions: Tensor) -> AttnParts:
    """Attention of ``layer`` from normalised inputs n_q, n_k, n_v (B, T, D)."""
    w = ad.frozen_weights(layer)
    q = project(n_q, w.W_Q, w.b_Q)
    k = project(n_k, w.W_K, w.b_K)
    v = project(n_v, w.W_V, w.b_V)
    q, k = ad.apply_positional(q, k, positions)
    scores = q @ k.transpose(-1, -2) / ad.d_head**0.5
    scores = scores.masked_fill(~allowed_keys(mask)[:, None], torch.finfo(scores.dtype).min)
    alpha = scores.softmax(-1)
    return AttnParts(q, k, v, scores, alpha, (alpha @ v).transpose(1, 2))


def attention_from_resid(ad: ArchitectureAdapter, layer: int, resid: Tensor, mask: Tensor,
                         positions: Tensor) -> AttnParts:
    """Attention of ``layer`` from the residual entering it (B, T, D), through its input norm."""
    n = ad.attn_input_norm(layer)(resid)
    return attend(ad, layer, n, n, n, mask, positions)


def transpose_positional(ad: ArchitectureAdapter, x: Tensor, positions: Tensor) -> Tensor:
    """R(positions)^T x for the adapter's positional transform R (linear in q), x (B, H, T, dh):
    the vector-Jacobian product of ``apply_positional`` (identity for GPT-2)."""
    f = lambda t: ad.apply_positional(t, t, positions)[0]  # noqa: E731
    _, vjp = torch.func.vjp(f, torch.zeros_like(x))
    return vjp(x)[0]
