"""Lookahead attribution: each head's ablation run exactly through the next ``k`` layers, the rest
of the model linearised (attribution patching at the residual stream ``k`` layers later).

For head (l, h) with delta = (z'_h - z_h) @ W_O[h] added after layer l's attention:

    x'_{l+k} = layers l (MLP half), l+1, ..., l+k-1 applied to resid_mid_l + delta     (exact)
    LA_k(l, h) = < d dL / d x_{l+k}, x'_{l+k} - x_{l+k} >                                 (linear)

x_j is the residual entering decoder layer j (x_L: the final norm's input), summed over positions
and features. k = 0 is AtP (the gradient where delta enters, times delta); when l + k >= L the
head's ablation is run to the logits, i.e. exact. The costs: one forward + backward for z, its
gradient and the gradient at every layer's input (:func:`residual_trace`) plus, per head, k
layers of a forward (heads x prompts batched, as the exact scan's layer-suffix path, which runs
L - l layers per head). So the first layers' heads -- where AtP fails: their ablation is a large
perturbation that the next layers (their MLPs first) respond to nonlinearly -- can be looked
ahead at a small fraction of the scan's cost (:func:`lookahead`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from analysis.ablation import _expand, ablation_check
from spindiff.lm.adapter import ArchitectureAdapter, HeadList
from spindiff.lm.field import last_positions
from spindiff.lm.hooks import layer_values, record


@dataclass
class ResidualTrace:
    """One forward + backward of the gap on a left-padded batch (B rows).

    z, g_z:   per layer (B, T, H, dh): z and d gap / d z
    x, g_x:   per j = 0 .. L (B, T, D): the residual entering layer j (j = L: the final norm's
              input) and d gap / d x_j
    attn_out: per layer (B, T, D) the attention output (after W_O and its bias)
    calls:    per layer the decoder layer's (args, kwargs) of the forward
    resid_post: per layer the layer's output (parallel-residual families; else None)
    gap:      (B,) float64
    """

    z: list[Tensor]
    g_z: list[Tensor]
    x: list[Tensor]
    g_x: list[Tensor]
    attn_out: list[Tensor]
    calls: list[tuple[tuple, dict]]
    resid_post: list[Tensor | None]
    gap: Tensor


def _call_layer(layer: nn.Module, x: Tensor, call: tuple[tuple, dict], K: int, B: int) -> Tensor:
    """Rerun a decoder layer on K variants of the residual x (K*B, T, D) with the other arguments
    of its recorded call (expanded over the variants)."""
    args, kwargs = call
    if args:
        out = layer(x, *_expand(args[1:], K, B), **_expand(kwargs, K, B))
    else:
        out = layer(**{**_expand(kwargs, K, B), "hidden_states": x})
    return out[0] if isinstance(out, tuple) else out


def residual_trace(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                   bad: Tensor) -> ResidualTrace:
    """The forward + backward of the module docstring (graph from layer 0's input on; parameter
    gradients never formed), on the hook points of :mod:`spindiff.lm.hooks`."""
    L = ad.n_layers
    grad_names = ["blocks.*.resid_pre", "blocks.*.attn.z", "ln_final.in"]
    plain = ["blocks.*.call", "blocks.*.attn.out"] + (["blocks.*.resid_post"] if ad.parallel else [])
    with record(ad, plain) as rec, record(ad, grad_names, grad=True, leaf=["blocks.0.resid_pre"]) as g, \
            torch.enable_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1,
                    use_cache=False)
        lg = out.logits[:, -1]
        gap = lg.gather(-1, good[:, None])[:, 0] - lg.gather(-1, bad[:, None])[:, 0]
        z, x = layer_values(g, "attn.z"), layer_values(g, "resid_pre")
        x[L] = g["ln_final.in"]
        wanted = [z[l] for l in range(L)] + [x[j] for j in range(L + 1)]
        grads = torch.autograd.grad(gap.sum(), wanted)
    calls, attn, post = layer_values(rec, "call"), layer_values(rec, "attn.out"), layer_values(rec, "resid_post")
    return ResidualTrace([z[l].detach() for l in range(L)], list(grads[:L]), [x[j].detach() for j in range(L + 1)],
                         list(grads[L:]), [attn[l] for l in range(L)], [calls[l] for l in range(L)],
                         [post.get(l) for l in range(L)], gap.detach().double())


@torch.no_grad()
def lookahead(ad: ArchitectureAdapter, tr: ResidualTrace, heads: HeadList, k: int, ue: tuple[Tensor, ...],
              mode: str = "zero", mean_z: dict[int, Tensor] | None = None, max_rows: int = 256) -> np.ndarray:
    """LA_k (module docstring) of each of ``heads`` on the traced batch: (B, len(heads)) float64.
    ``ue``: :func:`unembed_rows` of the batch (used where the lookahead reaches the logits)."""
    ablation_check(mode, mean_z)
    if k < 1:
        raise ValueError(f"lookahead k={k}: must be >= 1 (k = 0 is AtP)")
    L, B = ad.n_layers, tr.gap.shape[0]
    layers = ad.layers()
    out = torch.empty(B, len(heads), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for i, (l, _) in enumerate(heads):
        by_layer.setdefault(l, []).append(i)
    per = max(1, max_rows // B)
    for l, idx in sorted(by_layer.items()):
        W_O = ad.layer_weights(l).W_O  # (H, dh, D)
        stop = min(l + k, L)
        shape = tr.x[l].shape[1:]  # (T, D)
        for c in range(0, len(idx), per):
            ii = idx[c:c + per]
            hs = [heads[i][1] for i in ii]
            K = len(hs)
            zh = tr.z[l][:, :, hs]
            dz = -zh if mode == "zero" else mean_z[l][hs].to(zh) - zh
            delta = torch.einsum("btkc,kcd->kbtd", dz, W_O[hs].to(zh))
            xx = ad.after_attention(l, tr.x[l], tr.attn_out[l], delta, tr.resid_post[l])  # (K*B, T, D)
            for j in range(l + 1, stop):
                xx = _call_layer(layers[j], xx, tr.calls[j], K, B)
            xx = xx.view(K, B, *shape)
            if stop == L:  # reached the logits: exact
                hid = ad.final_norm()(xx[:, :, -1])  # (K, B, D)
                out[:, ii] = (_gap(ad, hid, ue).double() - tr.gap[None]).T
            else:
                out[:, ii] = torch.einsum("kbtd,btd->bk", (xx - tr.x[stop][None]).double(),
                                          tr.g_x[stop].double())
    return out.numpy()


def unembed_rows(model: nn.Module, ad: ArchitectureAdapter, good: Tensor, bad: Tensor) -> tuple[Tensor, ...]:
    """(W_U[good], W_U[bad] (B, D), their output biases (B,), zeros without a bias)."""
    W_U = ad.unembedding()
    bias = getattr(model.get_output_embeddings(), "bias", None)
    zero = torch.zeros(good.shape[0], dtype=W_U.dtype)
    return (W_U[good].detach(), W_U[bad].detach(), zero if bias is None else bias[good].detach(),
            zero if bias is None else bias[bad].detach())


def _gap(ad: ArchitectureAdapter, hid: Tensor, ue: tuple[Tensor, ...]) -> Tensor:
    """Gap (K, B) from final hidden states (K, B, D) (logit soft-capping applied where the family has it)."""
    wg, wb, bg, bb = (t.to(hid) for t in ue)
    lg, lb = (hid * wg[None]).sum(-1) + bg[None], (hid * wb[None]).sum(-1) + bb[None]
    cap = ad.final_softcap()
    if cap:
        lg, lb = torch.tanh(lg / cap) * cap, torch.tanh(lb / cap) * cap
    return lg - lb
