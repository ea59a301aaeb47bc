"""Attribution patching of every head, and the AtP* correction for attention saturation.

AtP (Nanda 2023; Kramar et al. 2024, "AtP*") predicts the effect on dL of replacing head (l, h)'s
z by z' (zero or the mean z) as the gradient times the activation difference,

    AtP(l, h) = <d dL / d z_h, z'_h - z_h>                      (summed over positions and d_head)

all heads at once from one forward and one backward per batch (:func:`analysis.paths.gradient_trace`;
it is the ``total`` of :class:`analysis.paths.PathTerms`).

Attention saturation (the query/key side). The head's output delta = (z' - z) @ W_O[h] enters
every later layer's queries and keys; AtP passes the resulting change of the attention scores
through the softmax's Jacobian, which is ~0 where the softmax is saturated, however large the
change. The AtP* "QK fix" recomputes the softmax instead. Here, for every later attention layer
l2 > l and every one of its heads, at the last query position T (the one the gap is read at):

    ds_j  = d s_Tj / d resid . delta        (first order in delta: through l2's input norm, W_Q at
                                             T and W_K at j, the positional transform; all of a
                                             layer's source heads in one contraction each side)
    exact = sum_j g_j (softmax(s_T + ds)_j - alpha_Tj),     g_j = d dL / d alpha_Tj = <d dL/d z_T, v_j>
    lin   = sum_j g_j alpha_Tj (ds_j - sum_i alpha_Ti ds_i)                 (what AtP contains)

    AtP*(l, h) = AtP(l, h) + sum_{l2 > l, heads of l2} (exact - lin)

Only the last query position is corrected (earlier queries stay linear), the score shift is the
first-order one (the term quadratic in delta, delta.W_Q W_K^T.delta, is left out), and the change
goes one hop: delta entering l2 directly, not as changed by the layers in between. AtP*'s
GradDrop (for cancellation) is not implemented. The reassociation: ds_j = (J_T^T a_j) . delta_T
+ (J_j^T b_j) . delta_j with a_j = W_Q R_T^T k_j / sqrt(dh), b_j = W_K R_j^T q_T / sqrt(dh)
(R: the positional rotation, J: the input norm's Jacobian at the real residual), so each target
layer costs O(B H T D dh) once and O(B H T D) per source head.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from analysis.ablation import ablation_check
from analysis.attention import attend, check_supported, transpose_positional
from analysis.paths import GradientTrace, ablation_delta, need_branches
from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.field import last_positions


def atp(tr: GradientTrace, mode: str = "zero", mean_z: dict[int, Tensor] | None = None) -> np.ndarray:
    """AtP of every head: (B, L, H) float64."""
    ablation_check(mode, mean_z)
    return torch.stack([(tr.g_z[l] * ablation_delta(tr, l, mode, mean_z)).sum((1, 3)).double()
                        for l in range(len(tr.z))], 1).numpy()


def _norm_vjp(norm: torch.nn.Module, x: Tensor, cot: Tensor) -> Tensor:
    """J^T cot for the norm at inputs x (any leading shape, same as cot)."""
    _, vjp = torch.func.vjp(norm, x)
    return vjp(cot.to(x.dtype))[0]


class SaturationFix:
    """The per-target-layer quantities of the QK fix (module docstring) for one gradient trace."""

    @torch.no_grad()
    def __init__(self, tr: GradientTrace, ad: ArchitectureAdapter):
        check_supported(ad)
        if ad.spec.q_norm or ad.spec.k_norm or any(ad.softcap(l) for l in range(ad.n_layers)):
            raise NotImplementedError(f"the AtP* QK fix does not linearise the q/k norms or score soft-capping of "
                                      f"family {ad.family}; run with qk_fix=false")
        need_branches(tr, "SaturationFix")
        self.tr, self.ad = tr, ad
        self.pos = last_positions(tr.mask)
        self.targets: dict[int, dict[str, Tensor]] = {}
        for l2 in range(1, ad.n_layers):
            self.targets[l2] = self._target(l2)

    def _target(self, l2: int) -> dict[str, Tensor]:
        ad, tr = self.ad, self.tr
        x = tr.attn_in[l2]  # (B, T, D)
        B, T, D = x.shape
        H = ad.n_heads
        norm = ad.attn_input_norm(l2)
        n = norm(x)
        p = attend(ad, l2, n, n, n, tr.mask, self.pos)
        w = ad.frozen_weights(l2)
        scale = ad.scaling(l2)
        pos_T = self.pos[:, -1:].expand(B, T)
        kappa = transpose_positional(ad, p.k, pos_T, l2) * scale  # R_T^T k_j: (B, H, T, dh)
        rho = transpose_positional(ad, p.q[:, :, -1:].expand_as(p.q).contiguous(), self.pos, l2) * scale  # R_j^T q_T
        a = torch.einsum("bhjk,hdk->bhjd", kappa, w.W_Q.to(x.dtype))  # d s_Tj / d n_T
        b = torch.einsum("bhjk,hdk->bhjd", rho, w.W_K.to(x.dtype))  # d s_Tj / d n_j
        a = _norm_vjp(norm, x[:, None, None, -1].expand(B, H, T, D), a)  # ... / d resid_T
        b = _norm_vjp(norm, x[:, None].expand(B, H, T, D), b)  # ... / d resid_j
        g = torch.einsum("bhk,bhjk->bhj", tr.g_z[l2][:, -1].to(p.v.dtype), p.v)  # d dL / d alpha_Tj
        return {"a": a, "b": b, "s": p.scores[:, :, -1], "alpha": p.alpha[:, :, -1], "g": g}

    def score_shift(self, l2: int, delta: Tensor) -> Tensor:
        """First-order change of layer l2's last-query scores (S, B, H2, T) when delta (S, B, T, D)
        (one residual-stream perturbation per source) is added to the residual entering l2."""
        t = self.targets[l2]
        return (torch.einsum("sbd,bhjd->sbhj", delta[:, :, -1].to(t["a"].dtype), t["a"])
                + torch.einsum("sbjd,bhjd->sbhj", delta.to(t["b"].dtype), t["b"]))

    def correction(self, l2: int, delta: Tensor) -> Tensor:
        """sum over l2's heads of (exact - lin) for each source: (S, B)."""
        t = self.targets[l2]
        ds = self.score_shift(l2, delta)
        alpha, g = t["alpha"][None], t["g"][None]
        new = (t["s"][None] + ds).softmax(-1)
        exact = (g * (new - alpha)).sum(-1)
        lin = (g * alpha * (ds - (alpha * ds).sum(-1, keepdim=True))).sum(-1)
        return (exact - lin).sum(-1).double()


@torch.no_grad()
def qk_fix(tr: GradientTrace, ad: ArchitectureAdapter, mode: str = "zero",
           mean_z: dict[int, Tensor] | None = None, fix: SaturationFix | None = None) -> np.ndarray:
    """AtP* - AtP for every head (B, L, H) float64 (module docstring)."""
    ablation_check(mode, mean_z)
    fix = fix or SaturationFix(tr, ad)
    L, H = ad.n_layers, ad.n_heads
    B = tr.gap.shape[0]
    out = torch.zeros(B, L, H, dtype=torch.float64)
    for l in range(L - 1):
        W_O = ad.frozen_weights(l).W_O.to(tr.z[l].dtype)
        delta = torch.einsum("bthk,hkd->hbtd", ablation_delta(tr, l, mode, mean_z), W_O)  # (H, B, T, D)
        for l2 in range(l + 1, L):
            out[:, l] += fix.correction(l2, delta).T
    return out.numpy()
