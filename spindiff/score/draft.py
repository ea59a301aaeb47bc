"""Draft heads: K independent next-next-token heads that draft a block for speculative sampling.

For a context whose last fed position has final hidden state h (and context field N), and the
pending token z that follows it (already an exact draw from the LM), head k = 1 .. K gives logits
for the token k places after z:

    x     = LN([features(N, h), e_z])                        (B, c + d)   e_z: unit row of token z
    u_k   = g_k * h + x A_k + gelu(x W_1 + b_1) W_2,k        (B, K, d)    A_k: (c + d, d), g_k: (d,)
    l_k,v = s_v (u_k . e_v) + b_v                            (B, K, V)

(the MLP term, hidden width ``hidden`` shared by the offsets, only when ``hidden`` > 0: it lets the
pending token and the context interact, which the linear read-out cannot), with e_v the unit
unembedding rows and s_v (initialised to |W_U[v]|) so that u_k = h reads out the
LM's own logits W_U h. The K read-outs are ONE (B K, d) x (d, V) product against the token table
(the table is 21% of SmolLM2's weights: reading it once per offset would cost as much as a forward).
Training (``objective=block``, :mod:`spindiff.training.block`) distils the LM's teacher-forced
distribution of the token k places after z into head k (soft top-k targets of the feature cache).

A checkpoint describes itself (``meta["score_net"]`` = :meth:`DraftHeads.hparams`); the ``block``
builder of :mod:`spindiff.score.build` rebuilds it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spindiff.score.features import context_dim, context_features

__all__ = ["DraftHeads"]


class DraftHeads(nn.Module):
    """K draft heads (module docstring).

    Args:
        dim: d. vocab: V. block: K, the number of offsets (a sampler may use the first K' <= K).
        features: context features besides the pending token (``hidden`` | ``field+hidden`` | ...).
        rank: coupling rank of the learned low-rank Potts couplings J_kj (0 = none; drafter (b)).
        hidden: width of the shared MLP term (0 = the linear read-out alone).
        row_norms: (V,) initial per-token scales (|W_U[v]|); ones if None.
        ranked: keep ``vocab_rank`` (V,) int64, the tokens by decreasing expected frequency under the LM
            (set by training from the soft targets of the training rows): a drafter may read out only the
            first N of them (``sampler.draft_vocab``). Checkpoints from before it have none.
    """

    def __init__(self, dim: int, vocab: int, block: int = 8, features: str = "field+hidden", rank: int = 0,
                 row_norms: Tensor | None = None, ranked: bool = False, hidden: int = 0) -> None:
        super().__init__()
        self.dim, self.vocab, self.block, self.features = int(dim), int(vocab), int(block), str(features)
        self.rank = int(rank)
        self.learned = True  # (training.module.build_parts copies |W_U[v]| into ``scale`` for a new run)
        c = context_dim(self.features, self.dim) + self.dim
        self.norm = nn.LayerNorm(c)
        self.gate = nn.Parameter(torch.ones(self.block, self.dim))
        self.readout = nn.Parameter(torch.zeros(self.block, c, self.dim))
        norms = torch.ones(vocab) if row_norms is None else row_norms.detach().float().clone()
        self.scale = nn.Parameter(norms)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.hidden = int(hidden)
        if self.hidden > 0:  # zero-initialised output: training starts from the linear heads
            self.mlp_in = nn.Linear(c, self.hidden)
            self.mlp_out = nn.Parameter(torch.zeros(self.block, self.hidden, self.dim))
        self.ranked = bool(ranked)
        if self.ranked:
            self.register_buffer("vocab_rank", torch.arange(vocab, dtype=torch.long))
        if self.rank > 0:  # learned low-rank couplings: J_kj(v, w) = (e_v P_k) . (e_w Q_j), j < k
            self.couple_p = nn.Parameter(torch.zeros(self.block, self.dim, self.rank))
            self.couple_q = nn.Parameter(torch.randn(self.block, self.dim, self.rank) / self.dim ** 0.5)

    def param_groups(self, lr: float, gate_lr: float = 0.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups: read-out / coupling matrices with ``weight_decay``; gates, scales, biases,
        norms without; the gates at ``gate_lr`` (0 = ``lr``)."""
        names = ("readout", "couple_p", "couple_q", "mlp_in.weight", "mlp_out")
        mats = [p for n, p in self.named_parameters() if n in names]
        gate = [self.gate]
        rest = [p for n, p in self.named_parameters() if n not in (*names, "gate")]
        return [{"name": "matrices", "params": mats, "weight_decay": float(weight_decay), "lr": float(lr)},
                {"name": "scales", "params": rest, "weight_decay": 0.0, "lr": float(lr)},
                {"name": "gates", "params": gate, "weight_decay": 0.0, "lr": float(gate_lr) if gate_lr > 0 else float(lr)}]

    def hparams(self) -> dict[str, Any]:
        return {"dim": self.dim, "vocab": self.vocab, "block": self.block, "features": self.features,
                "rank": self.rank, "ranked": self.ranked, "hidden": self.hidden}

    def draft_vocab(self, n: int) -> Tensor | None:
        """The ``n`` most frequent token ids (sorted ascending) the drafts may come from, or None for all V
        (``n`` <= 0, ``n`` >= V, or a checkpoint without a ranking)."""
        if n <= 0 or n >= self.vocab or not self.ranked:
            return None
        return torch.sort(self.vocab_rank[:n]).values

    @torch.no_grad()
    def set_vocab_rank(self, ids: Tensor, logp: Tensor) -> Tensor:
        """Rank the vocabulary by the expected frequency sum_rows p(v) of the soft targets ``ids`` / ``logp``
        (R, k) (ties by id); returns the per-token mass (V,)."""
        mass = torch.zeros(self.vocab, dtype=torch.float64)
        mass.index_add_(0, ids.reshape(-1).long(), logp.reshape(-1).double().exp())
        self.vocab_rank.copy_(torch.argsort(-mass, stable=True))
        return mass

    def directions(self, field: Tensor | None, hidden: Tensor, token_vec: Tensor, k: int | None = None,
                   prev_vecs: Tensor | None = None) -> Tensor:
        """u_k for the first ``k`` offsets (default all): field (B, d) or None, hidden (B, d),
        token_vec (B, d) unit row of the pending token -> (B, k, d). With ``prev_vecs`` (B, k, d),
        the unit rows of the tokens at offsets 1 .. k (teacher forcing), the learned coupling field
        c_k = sum_{j<k} e_j Q_j P_k^T is added to u_k (:meth:`coupling_field`)."""
        k = self.block if k is None else int(k)
        x = context_features(field if field is not None else hidden, hidden, self.features, raw_hidden=True)
        x = torch.cat([x, token_vec], -1) if x is not None else token_vec
        z = self.norm(x.to(self.readout.dtype))  # (B, c + d)
        u = hidden.to(z.dtype)[:, None, :] * self.gate[:k] + torch.einsum("bc,kcd->bkd", z, self.readout[:k])
        if self.hidden > 0:
            u = u + torch.einsum("bh,khd->bkd", F.gelu(self.mlp_in(z)), self.mlp_out[:k])
        if prev_vecs is not None and self.rank > 0:
            u = u + self.coupling_field(prev_vecs[:, :k])
        return u

    def coupling_field(self, prev_vecs: Tensor) -> Tensor:
        """c_k = sum_{j<k} (e_j Q_j) P_k^T for every offset k of ``prev_vecs`` (B, k, d) -> (B, k, d):
        the learned low-rank Potts coupling J_kj(v, w) = s_v e_v . P_k Q_j^T e_w seen by offset k."""
        k = prev_vecs.shape[1]
        a = torch.einsum("bjd,jdr->bjr", prev_vecs.to(self.couple_q.dtype), self.couple_q[:k])  # (B, k, r)
        a = torch.cumsum(a, 1) - a  # sum over j < k only
        return torch.einsum("bkr,kdr->bkd", a, self.couple_p[:k])

    def readout_logits(self, u: Tensor, table: Tensor) -> Tensor:
        """s_v (u . e_v) + b_v for u (..., d): ONE product against the table (V, d) -> (..., V)."""
        shape = u.shape[:-1]
        out = (u.reshape(-1, u.shape[-1]).to(table.dtype) @ table.T) * self.scale.to(table.dtype) + self.bias.to(table.dtype)
        return out.view(*shape, -1)

    def forward(self, field: Tensor | None, hidden: Tensor, token_vec: Tensor, table: Tensor,
                k: int | None = None) -> Tensor:
        """Logits of the first ``k`` offsets: (B, k, V)."""
        return self.readout_logits(self.directions(field, hidden, token_vec, k), table)

    def coupling_factors(self, k: int | None = None) -> tuple[Tensor, Tensor] | None:
        """(P, Q) (k, d, r) of the learned low-rank coupling, or None."""
        if self.rank <= 0:
            return None
        k = self.block if k is None else int(k)
        return self.couple_p[:k], self.couple_q[:k]


def unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)
