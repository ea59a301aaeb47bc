"""Induction scores by the standard repeated-random-tokens test (Olsson et al. 2022).

A batch of sequences ``[BOS] r_1 .. r_R r_1 .. r_R`` (R distinct random tokens, repeated once).
An induction head at a token of the second copy attends to the token *after* that token's
previous occurrence: query position t (second copy) -> key position t - R + 1. The score of a
head is that attention weight averaged over the second copy and the batch: ~1 for a perfect
induction head, ~1/t for a head that attends uniformly.

Attention weights are recomputed from the adapter's weights
(:func:`spindiff.lm.adapter.manual_attention`, i.e. :func:`spindiff.lm.attention.attend`) on
each layer's real attention input (hook point ``blocks.{l}.attn.in``), recorded in one forward pass, so the test works for every family the adapter knows (no eager-attention
switch of the HF model).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spindiff.lm.adapter import ArchitectureAdapter, manual_attention
from spindiff.lm.hooks import layer_values, record


def repeated_random_tokens(batch: int, R: int, vocab: Sequence[int] | int, bos: int | None = None,
                           seed: int = 0) -> Tensor:
    """(batch, [1 +] 2R) token ids: R distinct tokens drawn from ``vocab`` (ids or a count), twice."""
    pool = np.arange(vocab) if isinstance(vocab, int) else np.asarray(list(vocab))
    if len(pool) < R:
        raise ValueError(f"induction test: {R} distinct tokens requested from a pool of {len(pool)}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        r = rng.choice(pool, R, replace=False).tolist()
        rows.append(([bos] if bos is not None else []) + r + r)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def attention_patterns(model: nn.Module, adapter: ArchitectureAdapter, ids: Tensor) -> Tensor:
    """Attention weights of every layer and head on unpadded ``ids`` (B, T): (L, B, H, T, T)."""
    with record(adapter, ["blocks.*.attn.in"]) as acts:
        model(input_ids=ids, logits_to_keep=1)
    xs = layer_values(acts, "attn.in")  # {layer: (B, T, D)} each attention module's input
    return torch.stack([manual_attention(adapter, xs[l], l)[0] for l in range(adapter.n_layers)])


@torch.no_grad()
def induction_scores(model: nn.Module, adapter: ArchitectureAdapter, R: int = 40, batch: int = 8,
                     vocab: Sequence[int] | int | None = None, bos: int | None = None, seed: int = 0) -> np.ndarray:
    """Induction score of every head: (L, H) float64 (module docstring).

    Args:
        R: random tokens per copy; batch: sequences; vocab: token pool (default: ids 100 ..
            V - 1, away from the special tokens at the start of most vocabularies); bos: prefix.
    """
    V = adapter.unembedding().shape[0]
    if vocab is None:
        vocab = range(min(100, V // 2), V)
    ids = repeated_random_tokens(batch, R, vocab, bos, seed).to(next(model.parameters()).device)
    alpha = attention_patterns(model, adapter, ids)  # (L, B, H, T, T)
    off = 1 if bos is not None else 0
    q = torch.arange(off + R, off + 2 * R)  # second copy
    k = q - R + 1  # the token after the previous occurrence
    return alpha[:, :, :, q, k].mean(dim=(1, 3)).double().cpu().numpy()  # (L, H)
