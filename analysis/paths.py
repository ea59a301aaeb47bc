"""First-order path decomposition of every head's ablation effect, and attribution patching.

Replacing head (l, h)'s z (the input of the output projection, at every position) by z' (0 for
zero-ablation, the mean z for mean-ablation) adds

    delta = (z' - z) @ W_O[h]                                  (B, T, D)

to the residual stream right after layer l's attention. To first order around the actual forward
pass the change in dL (good - bad logit gap at the last position) is

    dL_1 = <d dL / d z_h, z' - z>                              (attribution patching, AtP)

which needs one forward and one backward per batch of prompts for all heads at once
(:func:`gradient_trace`). The residual stream is a sum, so the gradient at the point where delta
enters splits over what reads it afterwards (chain rule, unrolled along the residual stream):

    d dL / d resid = g_final + sum_{later attention layers c} J_c^T G_c + sum_{later MLPs c} J_c^T G_c

g_final is the gradient at the final norm's input (the direct path: head -> final norm -> logits);
J_c^T G_c is the gradient that enters component c's input branch (its input norm), i.e. the
effect of delta *as it enters c* (for an attention layer: the later heads' queries, keys and
values at every position), propagated through everything after c. So

    dL_1 = direct + via_heads + via_mlps                        (exactly, :class:`PathTerms`)

with direct = <delta_last, g_final> (through the exact Jacobian of the final norm), and
direct_frozen = the same through the frozen final-norm scale (= -dL_theory of the in_situ gap
table for zero-ablation: the two-body term). Each of J_c^T G_c is read from the same backward
pass with a branch tensor at the input of each norm (:func:`gradient_trace`), so every term of
every head costs one contraction per layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from analysis.ablation import ablation_check
from analysis.attention import attend, check_supported
from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.field import last_positions
from spindiff.lm.hooks import layer_values, record


@dataclass
class GradientTrace:
    """One forward and one backward of the gap (summed over the batch; rows are independent).

    (the fields after g_z are None for ``gradient_trace(..., branches=False)``, except resid_final)

    z, g_z:  per layer (B, T, H, dh): z and d gap / d z (all paths)
    v_attn:  per layer (B, T, D): the gradient entering layer l's attention branch at its input
             (J_attn^T of the gradient after it; zeros for layer 0, where no earlier head writes)
    v_mlp:   per layer (B, T, D): the gradient entering layer l's MLP branch at its input
    g_final: (B, D) gradient at the final norm's input, last position (the direct path)
    resid_final: (B, D) the final norm's input, last position (for the frozen-norm direct term)
    attn_in, mlp_in: per layer (B, T, D) the residual entering layer l's attention / MLP branch
    """

    gap: Tensor
    z: list[Tensor]
    g_z: list[Tensor]
    v_attn: list[Tensor] | None
    v_mlp: list[Tensor] | None
    g_final: Tensor | None
    resid_final: Tensor
    attn_in: list[Tensor] | None
    mlp_in: list[Tensor] | None
    de: Tensor
    mask: Tensor
    seconds: float


def gradient_trace(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                   bad: Tensor, branches: bool = True) -> GradientTrace:
    """Forward + backward of dL on a left-padded batch, with every quantity :class:`PathTerms` needs.

    On the hook points of :mod:`spindiff.lm.hooks`: the graph starts at layer 0's z (a leaf there,
    so nothing before it is differentiated); each branch input (``attn.resid_in``,
    ``mlp.resid_in``, ``ln_final.in``) is replaced by a view of itself (no copy) whose gradient is
    that branch's alone.
    Parameter gradients are never formed (``torch.autograd.grad`` with the activations as inputs).
    ``branches=False``: z and its gradient only (all attribution patching needs); v_attn, v_mlp,
    g_final, attn_in and mlp_in are then None."""
    t0 = time.perf_counter()
    L = ad.n_layers
    names = ["blocks.*.attn.z", "ln_final.in"]
    if branches:  # each branch input a view of itself: the gradient that reaches it is that branch's alone
        names += ["blocks.*.attn.resid_in", "blocks.*.mlp.resid_in"]
    with record(ad, names, grad=True, leaf=["blocks.0.attn.z"]) as acts, torch.enable_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1,
                    use_cache=False)
        logits = out.logits[:, -1]
        gap = logits.gather(-1, good[:, None])[:, 0] - logits.gather(-1, bad[:, None])[:, 0]
        z, xa, xm = (layer_values(acts, k) for k in ("attn.z", "attn.resid_in", "mlp.resid_in"))
        fin = {"final": acts["ln_final.in"], "resid": acts["ln_final.in"][:, -1].detach()}
        wanted = [z[l] for l in range(L)]
        if branches:
            wanted += [xa[l] for l in range(1, L)] + [xm[l] for l in range(L)] + [fin["final"]]
        grads = torch.autograd.grad(gap.sum(), wanted, allow_unused=True)
    zero = lambda t: torch.zeros_like(t)  # noqa: E731
    g = [zero(t) if gr is None else gr.detach() for t, gr in zip(wanted, grads)]
    W_U = ad.unembedding()
    tr = GradientTrace(gap.detach().double(), [z[l].detach() for l in range(L)],
                       [g[l] for l in range(L)], None, None, None, fin["resid"], None, None,
                       (W_U[good] - W_U[bad]).detach(), mask, 0.0)
    if branches:
        tr.v_attn = [zero(xa[0]).detach()] + g[L:2 * L - 1]
        tr.v_mlp = g[2 * L - 1:3 * L - 1]
        tr.g_final = g[-1][:, -1]
        tr.attn_in = [xa[l].detach() for l in range(L)]
        tr.mlp_in = [xm[l].detach() for l in range(L)]
    tr.seconds = time.perf_counter() - t0
    return tr


TERMS = ("total", "direct", "direct_frozen", "via_heads", "via_mlps")
QKV = ("via_q", "via_k", "via_v")


@dataclass
class PathTerms:
    """First-order effect on dL of ablating each head, and its parts; every field (B, L, H) float64.

    total = direct + via_heads + via_mlps (to rounding). direct_frozen is the two-body term
    (frozen final-norm scale; -dL_theory for zero-ablation); direct - direct_frozen is what the
    final norm's statistics add. With the query/key/value split (:func:`qkv_split`),
    via_q + via_k + via_v = via_heads: the head's output entering later heads' queries (at every
    query position), keys and values."""

    total: np.ndarray
    direct: np.ndarray
    direct_frozen: np.ndarray
    via_heads: np.ndarray
    via_mlps: np.ndarray
    via_q: np.ndarray | None = None
    via_k: np.ndarray | None = None
    via_v: np.ndarray | None = None

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    @staticmethod
    def cat(parts: "list[PathTerms]") -> "PathTerms":
        return PathTerms(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in parts[0].names()})


def need_branches(tr: GradientTrace, what: str) -> None:
    if tr.v_attn is None:
        raise ValueError(f"{what} needs the branch gradients: gradient_trace(..., branches=True)")


def ablation_delta(tr: GradientTrace, layer: int, mode: str, mean_z: dict[int, Tensor] | None) -> Tensor:
    """z' - z (B, T, H, dh) for every head of ``layer``."""
    z = tr.z[layer]
    return -z if mode == "zero" else mean_z[layer].to(z) - z


def qkv_split(tr: GradientTrace, ad: ArchitectureAdapter) -> dict[str, list[Tensor]]:
    """v_attn of every layer split into what enters its queries, keys and values: per layer
    (B, T, D) each, summing to ``tr.v_attn[l]``. One small backward per layer through the
    attention recomputed from the adapter's weights (:mod:`analysis.attention`), with three copies
    of the layer's input, one per side, each through the layer's input norm."""
    check_supported(ad)
    need_branches(tr, "qkv_split")
    pos = last_positions(tr.mask)
    out: dict[str, list[Tensor]] = {k: [torch.zeros_like(tr.v_attn[0])] for k in QKV}
    for l in range(1, ad.n_layers):
        norm = ad.attn_input_norm(l)
        with torch.enable_grad():
            r = [tr.attn_in[l].detach().clone().requires_grad_(True) for _ in QKV]
            parts = attend(ad, l, norm(r[0]), norm(r[1]), norm(r[2]), tr.mask, pos)
            g = torch.autograd.grad(parts.z, r, grad_outputs=tr.g_z[l].to(parts.z.dtype))
        for k, gk in zip(QKV, g):
            out[k].append(gk.detach())
    return out


@torch.no_grad()
def path_terms(tr: GradientTrace, ad: ArchitectureAdapter, mode: str = "zero",
               mean_z: dict[int, Tensor] | None = None, qkv: dict[str, list[Tensor]] | None = None) -> PathTerms:
    """The decomposition of the module docstring for every head of every layer (with the
    query/key/value split of the head paths when ``qkv`` from :func:`qkv_split` is given)."""
    ablation_check(mode, mean_z)
    need_branches(tr, "path_terms")
    L, H = ad.n_layers, ad.n_heads
    B = tr.gap.shape[0]
    names = list(TERMS) + (list(QKV) if qkv else [])
    out = {k: torch.zeros(B, L, H, dtype=torch.float64) for k in names}
    scale, center = ad.final_norm_scale(tr.resid_final)  # (B, D)
    # residual-space gradients that a head of layer l feeds: attention branches of layers > l,
    # MLP branches of layers >= l (suffix sums, built from the last layer down)
    sources = {"via_heads": tr.v_attn, "via_mlps": tr.v_mlp, **(qkv or {})}
    after = {k: torch.zeros_like(tr.v_attn[0]) for k in sources}
    for l in reversed(range(L)):
        after["via_mlps"] = after["via_mlps"] + tr.v_mlp[l]
        W_O = ad.frozen_weights(l).W_O.to(tr.g_z[l].dtype)  # (H, dh, D)
        dz = ablation_delta(tr, l, mode, mean_z)
        out["total"][:, l] = (tr.g_z[l] * dz).sum((1, 3)).double()
        delta = torch.einsum("bthk,hkd->bhtd", dz, W_O)  # (B, H, T, D): what each head's ablation adds
        for k, acc in after.items():
            out[k][:, l] = torch.einsum("bhtd,btd->bh", delta, acc).double()
        d_last = delta[:, :, -1]  # (B, H, D)
        out["direct"][:, l] = torch.einsum("bhd,bd->bh", d_last, tr.g_final).double()
        if center:
            d_last = d_last - d_last.mean(-1, keepdim=True)
        out["direct_frozen"][:, l] = torch.einsum("bhd,bd->bh", d_last * scale[:, None], tr.de.to(d_last)).double()
        for k in after:
            if k != "via_mlps":
                after[k] = after[k] + sources[k][l]
    return PathTerms(**{k: out[k].numpy() for k in names})
