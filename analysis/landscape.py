"""Decision landscape of one head in its value space (paper Sec. IV.1, Fig. 2, Eq. 5).

Eq. (5) defines the head-space token vector S_A = (W_O^(h))^T e_A (d_head,); in the row
convention of :mod:`spindiff.lm.adapter` that is ``S_A = W_O[h] @ e_A``. Then

    dL_theory = N0 . (S_good - S_bad)

exactly (the same number as the gap table). The plane: decision axis u1 = DeltaS / |DeltaS|;
second axis u2 = the component of N0 orthogonal to u1, normalised. N0 lies in the plane, so
the colour N0 . s of a point s = a u1 + b u2 equals N0 . S for any S projecting onto it: the
projected S_good / S_bad sit at their true head-logit values.

(The reference code's Fig2.py uses W_E[t] @ W_V instead, encodes candidates without the leading
space, and does not normalise the decision axis; we follow the paper's Eq. 5.)

Per protocol: ``paper`` takes N0 from raw embeddings and W_O as the reference slice;
``paper_fixed`` the correct W_O; ``in_situ`` N0 = the head's real output at the last position (from
:class:`spindiff.lm.field.ContextFieldProvider`) and, with ``final_norm``, e_A replaced by its image
under the frozen final norm (s * e - mean(s * e) for LayerNorm, s * e for RMSNorm), so that the
landscape is in logit units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from analysis.prompts import TokenizedSet
from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.field import ContextFieldProvider, paper_context_vectors, reference_W_O
from spindiff.lm.tokens import pad_left


@dataclass
class Landscape:
    """Everything Fig. 2 draws. Vectors (dh,) as float64 numpy; coordinates (2,) in (u1, u2)."""

    layer: int
    head: int
    prompt_id: int
    prompt: str
    good: str
    bad: str
    protocol: str
    N0: np.ndarray
    S_good: np.ndarray
    S_bad: np.ndarray
    u1: np.ndarray
    u2: np.ndarray
    dl_theory: float

    def coords(self, v: np.ndarray) -> np.ndarray:
        """Coordinates of v in the (u1, u2) plane."""
        return np.array([v @ self.u1, v @ self.u2])

    def field(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Colour N0 . s on the grid s = a u1 + b u2 (any shape)."""
        n = self.coords(self.N0)
        return a * n[0] + b * n[1]


@torch.no_grad()
def head_space(adapter: ArchitectureAdapter, model: nn.Module, tset: TokenizedSet, prompt_id: int, layer: int,
               head: int, protocol: str, final_norm: bool = True, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """N0 (dh,), S_good (dh,), S_bad (dh,) of head (layer, head) on one prompt."""
    ids, mask = pad_left([tset.ids[prompt_id]], pad_id)
    g, b = int(tset.good_first[prompt_id]), int(tset.bad_first[prompt_id])
    W_U = adapter.unembedding()
    e = W_U[[g, b]]  # (2, D)
    if protocol in ("paper", "paper_fixed"):
        X = adapter.embedding()[ids]  # (1, T, D)
        N0 = paper_context_vectors(adapter, X, mask, layer, [head])[0, 0]  # (dh,)
        W_O = reference_W_O(adapter, layer)[head] if protocol == "paper" else adapter.layer_weights(layer).W_O[head]
    elif protocol == "in_situ":
        N0, W_O, e = _in_situ_head_space(adapter, model, ids, mask, layer, head, e, final_norm)
    else:
        raise ValueError(f"protocol '{protocol}': use paper, paper_fixed or in_situ")
    S = torch.einsum("cd,nd->nc", W_O, e.to(W_O.dtype))  # S_A = W_O[h] @ e_A -> (2, dh)
    return N0, S[0], S[1]


def _in_situ_head_space(ad: ArchitectureAdapter, model: nn.Module, ids: Tensor, mask: Tensor, layer: int,
                        head: int, e: Tensor, final_norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    """N0, W_O[h] and the candidates' unembedding rows as the in_situ field sees them.

    The field comes from :class:`ContextFieldProvider` (one definition). It gives N_proj = N0 @ W_O[h]
    per head, with and without the frozen final norm, but neither N0 nor the norm's frozen scale;
    so N0 is N_proj's pre-image under W_O[h] (exact: N_proj lies in W_O[h]'s row space; least squares),
    and the frozen norm map v -> (v - mean v if centred) * scale is read off the provider's two outputs
    for the layer's heads (scale per coordinate by least squares over the heads: exact, fn = c * scale).
    Then e_A -> e_A * scale (- its mean for LayerNorm), the transpose of that map."""
    heads = [(layer, h) for h in range(ad.n_heads)]
    raw = ContextFieldProvider(model, heads, "in_situ", normalize=False, final_norm=False, adapter=ad)(ids, mask)
    v = raw.per_head[0]  # (H, D) N_proj of every head of the layer
    W_O = ad.layer_weights(layer).W_O[head]  # (dh, D)
    N0 = torch.linalg.lstsq(W_O.T.to(v.dtype), v[head][:, None]).solution[:, 0]
    if final_norm:
        fn = ContextFieldProvider(model, heads, "in_situ", normalize=False, final_norm=True, adapter=ad)(ids, mask)
        fn = fn.per_head[0]
        center = ad.final_norm_scale(v[:1])[1]
        c = v - v.mean(-1, keepdim=True) if center else v
        scale = (fn * c).sum(0) / (c * c).sum(0)
        e = e * scale
        if center:
            e = e - e.mean(-1, keepdim=True)
    return N0, W_O, e


def decision_landscape(adapter: ArchitectureAdapter, model: nn.Module, tset: TokenizedSet, prompt_id: int,
                       layer: int, head: int, protocol: str, final_norm: bool = True, pad_id: int = 0) -> Landscape:
    """The head's decision plane for one prompt (see module docstring)."""
    N0, Sg, Sb = (t.double().numpy() for t in head_space(adapter, model, tset, prompt_id, layer, head, protocol,
                                                           final_norm, pad_id))
    dS = Sg - Sb
    u1 = dS / max(np.linalg.norm(dS), 1e-300)
    w = N0 - (N0 @ u1) * u1
    if np.linalg.norm(w) < 1e-12 * max(np.linalg.norm(N0), 1e-300):  # N0 parallel to dS: any orthogonal axis
        w = np.eye(len(u1))[np.argmin(np.abs(u1))]
        w = w - (w @ u1) * u1
    u2 = w / np.linalg.norm(w)
    it = tset.pset.items[prompt_id]
    return Landscape(layer, head, prompt_id, it.prompt, it.good, it.bad, protocol, N0, Sg, Sb, u1, u2,
                     float(N0 @ dS))
