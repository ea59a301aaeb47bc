"""Per-head theoretical logit gaps dL_theory and the model's actual gap dL_actual.

For head (l, h) and a prompt with candidates (good, bad):

    dL_theory(l, h) = N_proj(l, h) . (e_good - e_bad)          (paper Eq. 4 / 24)

with N_proj as :class:`spindiff.lm.field.ContextFieldProvider` defines it, under one of three
protocols (``in_situ`` reads the provider; the paper protocols use :func:`paper_gap_table`, the
same numbers reassociated so that no per-head keys/values are formed):

- ``paper``: the reference protocol (raw token embeddings into every head, no biases, norms or
  positions; W_O sliced as the reference code does -- the transposed block on GPT-2);
  e_t = unembedding row without the final-norm gain.
- ``paper_fixed``: the same with the correct W_O block (identical to ``paper`` on Llama-family
  models, whose ``nn.Linear`` slice was right all along).
- ``in_situ``: each head's real output at the last position of the real forward pass (direct
  logit attribution); with ``final_norm=True`` through the frozen final-norm scale, so the
  gaps are in logit units and, with the other residual components, sum to dL_actual.

dL_actual = logit_good - logit_bad at the last position of the unmodified prompt
(``candidates=first_token``), or log P(" "+good | prompt) - log P(" "+bad | prompt) summed over
the candidates' tokens (``candidates=full``; dL_theory then uses the first tokens' embeddings).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis.prompts import TokenizedSet
from spindiff.lm.adapter import ArchitectureAdapter, get_adapter
from spindiff.lm.field import ContextFieldProvider, last_positions
from spindiff.lm.tokens import pad_left

PROTOCOLS = ("paper", "paper_fixed", "in_situ")
CANDIDATES = ("first_token", "full")


@dataclass
class GapTable:
    """Gaps of one model/protocol on one prompt set.

    dl_theory: (P, L, H) float64 per-head theoretical gaps
    dl_actual: (P,) float64 full-model gaps
    valid:     (P,) bool, rows used by the statistics (False where good/bad share a first token)
    last_logits: (P, V) next-token logits of the unmodified prompts (kept on request)
    """

    dl_theory: np.ndarray
    dl_actual: np.ndarray
    protocol: str
    candidates: str
    final_norm: bool
    valid: np.ndarray
    last_logits: Tensor | None = None

    @property
    def n_prompts(self) -> int:
        return self.dl_theory.shape[0]

    @property
    def n_layers(self) -> int:
        return self.dl_theory.shape[1]

    @property
    def n_heads(self) -> int:
        return self.dl_theory.shape[2]

    def flat(self) -> np.ndarray:
        """(P, L*H): column k = layer k // H, head k % H."""
        return self.dl_theory.reshape(self.n_prompts, -1)

    def rows(self) -> Iterator[tuple[int, int, int, float, float]]:
        """(prompt_id, layer, head, dl_theory, dl_actual) rows, prompt-major."""
        P, L, H = self.dl_theory.shape
        for p in range(P):
            for l in range(L):
                for h in range(H):
                    yield p, l, h, float(self.dl_theory[p, l, h]), float(self.dl_actual[p])


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def unembedding_diff(adapter: ArchitectureAdapter, good: Tensor, bad: Tensor) -> Tensor:
    """e_good - e_bad (B, D) from the unembedding rows (no final-norm gain)."""
    W_U = adapter.unembedding()
    return W_U[good] - W_U[bad]


@torch.no_grad()
def last_logits(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token logits (B, V) at the last position of a left-padded batch (B, T)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1)
    return out.logits[:, -1]


@torch.no_grad()
def continuation_logprob(model: nn.Module, prefixes: Sequence[Sequence[int]],
                         conts: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """log P(cont | prefix) summed over the continuation tokens, for a batch: (B,).

    Sequences are prefix + cont, left-padded, so every continuation ends at the last position;
    only the logits of the last ``max(len(cont)) + 1`` positions are computed."""
    seqs = [list(p) + list(c) for p, c in zip(prefixes, conts)]
    ids, mask = pad_left(seqs, pad_id)
    C = max(len(c) for c in conts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=C + 1)
    logp = out.logits[:, :-1].double().log_softmax(-1)  # (B, C, V): predicts positions T-C .. T-1
    tgt = ids[:, -C:]  # (B, C)
    lp = logp.gather(-1, tgt[..., None])[..., 0]  # (B, C)
    keep = torch.arange(C)[None, :] >= (C - torch.tensor([len(c) for c in conts]))[:, None]
    return (lp * keep).sum(-1).double()


@dataclass
class StackedHeads:
    """Every head's weights stacked for :func:`paper_gap_table` (one GEMM or one batched matmul per
    step instead of one per layer). LH = n_layers * n_heads, head index l * H + h.

    Wq: (D, LH*dh) so that q = x @ Wq; Wk: (L*H_kv, dh, D), one block per KV head (GQA: the
    ``group`` query heads of a KV head share it and are multiplied together, so each block is read
    once; with tens of prompts these products are bound by reading the weights); Wv: (LH, D, dh)
    so that N0 = xbar_h @ Wv[h];
    Wo: (D, LH*dh) so that g = de @ Wo (the head's W_O block applied to de: the reference slice for
    ``paper``, the real block for ``paper_fixed``).
    """

    key: tuple
    Wq: Tensor
    Wk: Tensor
    Wv: Tensor
    Wo: Tensor
    group: int
    workspace: dict = field(default_factory=dict)  # (B, T) -> reused intermediate buffers

    def buffers(self, B: int, T: int) -> dict[str, Tensor]:
        """Intermediate buffers for a (B, T) batch, reused across calls (one shape kept): fresh
        multi-MB allocations on every call cost page faults that were ~25% of the table's time.
        Not re-entrant (one gap table at a time per adapter and protocol)."""
        if (B, T) not in self.workspace:
            LH, dh, D = self.Wk.shape[0] * self.group, self.Wk.shape[1], self.Wk.shape[2]
            kw = dict(dtype=self.Wq.dtype, device=self.Wq.device)
            self.workspace.clear()
            self.workspace[(B, T)] = {
                "q": torch.empty(B, LH * dh, **kw), "u": torch.empty(LH // self.group, self.group * B, D, **kw),
                "s": torch.empty(B, LH, T, **kw), "xbar": torch.empty(B, LH, D, **kw),
                "n0": torch.empty(LH, B, dh, **kw), "g": torch.empty(B, LH * dh, **kw)}
        return self.workspace[(B, T)]


_STACKED: "weakref.WeakKeyDictionary[ArchitectureAdapter, dict[str, StackedHeads]]" = weakref.WeakKeyDictionary()


def stacked_heads(adapter: ArchitectureAdapter, protocol: str) -> StackedHeads:
    """The :class:`StackedHeads` of ``adapter`` for ``protocol``, cached per adapter (weakly, so it goes with the adapter) and rebuilt
    when a weight changes (:meth:`ArchitectureAdapter.weights_key` of every layer)."""
    ad = adapter
    key = tuple(ad.weights_key(l) for l in range(ad.n_layers))
    cache = _STACKED.setdefault(ad, {})
    hit = cache.get(protocol)
    if hit is not None and hit.key == key:
        return hit
    D, H, dh = ad.d_model, ad.n_heads, ad.d_head
    with torch.no_grad():
        ws = [ad.frozen_weights(l) for l in range(ad.n_layers)]
        Wq = torch.cat([w.W_Q.permute(1, 0, 2).reshape(D, H * dh) for w in ws], 1).contiguous()
        g = H // ad.n_kv_heads  # W_K, W_V are expanded to query heads: every g-th is a KV head
        Wk = torch.cat([w.W_K[::g].transpose(1, 2) for w in ws], 0).contiguous()
        Wv = torch.cat([w.W_V for w in ws], 0).contiguous()
        if protocol == "paper":  # (de @ out_proj.weight)[h*dh:(h+1)*dh]: the reference slice
            Wo = torch.cat([ad.out_proj(l).weight.detach() for l in range(ad.n_layers)], 1).contiguous()
        else:  # g_h = W_O[h] de: the real block
            Wo = torch.cat([w.W_O.permute(2, 0, 1).reshape(D, H * dh) for w in ws], 1).contiguous()
    cache[protocol] = hit = StackedHeads(key, Wq, Wk, Wv, Wo, g)
    return hit


@torch.no_grad()
def paper_gap_table(adapter: ArchitectureAdapter, ids: Tensor, mask: Tensor, de: Tensor, protocol: str,
                    weights: StackedHeads | None = None) -> Tensor:
    """dL_theory of every head under the reference protocol, reassociated for speed: (B, L, H).

    Same numbers as ``N_proj . de`` with N_proj from :class:`ContextFieldProvider` (tested), but
    never forms the (T, d_head) keys and values of every head:

        scores_j = (x_last W_Q)(x_j W_K)^T = x_j . u,   u = W_K (x_last W_Q)^T        (D,)
        N0 = sum_j alpha_j x_j W_V = xbar W_V,           xbar = sum_j alpha_j x_j      (D,)
        dL = N0 . (W_O[h] de)

    Cost per (prompt, head) ~ 4 D dh + 2 T D multiply-adds instead of 2 T D dh; all heads of all
    layers go through each step together (:class:`StackedHeads`).

    Args:
        ids, mask: (B, T) left-padded prompts; de: (B, D) e_good - e_bad.
        protocol: ``paper`` (reference W_O slice) | ``paper_fixed`` (the real block).
        weights: :func:`stacked_heads` (looked up when omitted).
    """
    ad = adapter
    st = weights if weights is not None else stacked_heads(ad, protocol)
    L, H, dh, G = ad.n_layers, ad.n_heads, ad.d_head, st.group
    X = ad.embedding()[ids].to(st.Wq.dtype)  # (B, T, D) raw token embeddings: no positions, norms or biases
    B, T, D = X.shape
    ws = st.buffers(B, T)
    # query heads of one KV head side by side: (L*H_kv, G*B, dh), so each W_K block is read once;
    # the product comes out head-major, (LH, B, D) in memory, which is what the next bmm takes
    q = torch.matmul(X[:, -1], st.Wq, out=ws["q"])  # (B, LH*dh) query of the last position
    q = q.view(B, L * (H // G), G, dh).permute(1, 2, 0, 3).reshape(L * (H // G), G * B, dh)
    u = torch.bmm(q, st.Wk, out=ws["u"]).view(L * H, B, D).transpose(0, 1)  # (B, LH, D) = W_K q
    s = torch.bmm(u, X.transpose(1, 2), out=ws["s"]).div_(dh**0.5)  # (B, LH, T) = x_j . u
    alpha = s.masked_fill_(~mask.bool()[:, None, :], float("-inf")).softmax(-1)
    xbar = torch.bmm(alpha, X, out=ws["xbar"]).transpose(0, 1)  # (LH, B, D)
    n0 = torch.bmm(xbar, st.Wv, out=ws["n0"]).transpose(0, 1)  # (B, LH, dh) = N0
    g = torch.matmul(de.to(X.dtype), st.Wo, out=ws["g"]).view(B, L * H, dh)  # (B, LH, dh) = W_O[h] de
    return (n0 * g).sum(-1).view(B, L, H)


@torch.no_grad()
def compute_gaps(model: nn.Module, tset: TokenizedSet, protocol: str = "in_situ",
                 candidates: str = "first_token", final_norm: bool = True, batch_size: int = 16,
                 adapter: ArchitectureAdapter | None = None, pad_id: int = 0, keep_logits: bool = False,
                 progress: bool = True, actual: bool = True) -> GapTable:
    """dL_theory for every head and dL_actual for every prompt of ``tset``.

    Batched over prompts (left padding) and vectorised over heads. ``in_situ``: one provider
    call per batch (its forward pass also gives dL_actual). ``paper``/``paper_fixed``:
    :func:`paper_gap_table` (no model forward) plus one forward for dL_actual. ``candidates=full``
    adds two forwards per batch for the continuation log-probabilities.

    Args:
        protocol: ``paper`` | ``paper_fixed`` | ``in_situ``.
        candidates: ``first_token`` | ``full``.
        final_norm: in_situ only: through the frozen final-norm scale.
        actual: compute dL_actual (False: NaN, and no model forward for the paper protocols).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}': use one of {', '.join(PROTOCOLS)}")
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates '{candidates}': use one of {', '.join(CANDIDATES)}")
    ad = adapter or get_adapter(model)
    weights = stacked_heads(ad, protocol) if protocol != "in_situ" else None
    if protocol == "in_situ":
        prov = ContextFieldProvider(model, [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)],
                                    protocol, normalize=False, final_norm=final_norm, adapter=ad)
    P = len(tset)
    theory = torch.empty(P, ad.n_layers * ad.n_heads, dtype=torch.float64)
    actual_gap = torch.empty(P, dtype=torch.float64)
    logits_all = [] if keep_logits else None
    it = _batches(P, batch_size)
    for rng in tqdm(it, desc=f"gaps[{protocol}]", disable=not progress or len(it) < 2, leave=False):
        idx = list(rng)
        ids, mask = pad_left([tset.ids[i] for i in idx], pad_id)
        de = unembedding_diff(ad, tset.good_first[idx], tset.bad_first[idx])  # (B, D)
        if protocol == "in_situ":
            out = prov(ids, mask)  # per_head (B, K, D): each head's real N_proj (final-norm scaled)
            theory[idx] = torch.einsum("bkd,bd->bk", out.per_head, de.to(out.per_head.dtype)).double()
            logits = out.logits  # (B, V)
        else:
            theory[idx] = paper_gap_table(ad, ids, mask, de, protocol, weights).reshape(len(idx), -1).double()
            logits = None
        if not actual:
            actual_gap[idx] = float("nan")
            continue
        logits = logits if logits is not None else last_logits(model, ids, mask)  # (B, V)
        if candidates == "first_token":
            actual_gap[idx] = (logits.gather(-1, tset.good_first[idx, None]) -
                           logits.gather(-1, tset.bad_first[idx, None]))[:, 0].double()
        else:
            pre = [tset.ids[i] for i in idx]
            actual_gap[idx] = (continuation_logprob(model, pre, [tset.good_ids[i] for i in idx], pad_id)
                           - continuation_logprob(model, pre, [tset.bad_ids[i] for i in idx], pad_id))
        if keep_logits:
            logits_all.append(logits.detach().float())
    valid = np.ones(P, dtype=bool)
    valid[list(tset.shared_first)] = False  # dL_theory = 0 for every head: no information
    return GapTable(theory.view(P, ad.n_layers, ad.n_heads).numpy(), actual_gap.numpy(), protocol, candidates,
                    final_norm, valid, torch.cat(logits_all) if keep_logits and logits_all else None)


def pad_token_id(tokenizer: Any) -> int:
    """A pad id for left padding (masked out, so any valid id works)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if t is not None:
            return int(t)
    return 0
