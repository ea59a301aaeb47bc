"""Per-pair LM features of training sequences: the in-situ context field N and the final hidden
state h at every position from one teacher-forced forward, and the LM's own next-token
distribution there (top-k log-probabilities + the rest mass: the soft targets of distillation).
See :mod:`spindiff.training.cache` for the on-disk layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spindiff.lm.field import ContextFieldProvider, last_positions
from spindiff.lm.hooks import layer_values, record
from spindiff.lm.tokens import pad_left
from spindiff.score.posterior import unit_rows

FEATURE_VERSION = 2  # 2: + token_norms and the LM's top-k next-token targets
ARRAYS = ("field", "hidden", "spin", "token", "seq", "pos", "token_table", "token_norms")
TARGET_ARRAYS = ("target_ids", "target_logp")  # (N, k) top-k of the LM at each pair (in_situ only)


def _no_logits(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model supports it: features need no vocabulary projection
    at every position (~20% of SmolLM2's forward)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def sequence_features(provider: ContextFieldProvider, input_ids: Tensor, attention_mask: Tensor,
                      targets_k: int = 0) -> tuple[Tensor, ...]:
    """In-situ field and hidden state at EVERY position, from one forward pass.

    input_ids, attention_mask: (B, T), left padding. Returns field (B, T, D) (unit when
    ``provider.normalize``) and hidden (B, T, D); position j equals the provider's output for the
    prefix ending at j. Padding positions hold garbage. With ``targets_k`` > 0 also the LM's
    next-token distribution at every position as its top-k: ids (B, T, k) int64 and
    log-probabilities (B, T, k) float32 (the rest mass is 1 - sum exp).
    """
    if provider.protocol != "in_situ":
        raise ValueError("sequence_features computes the in_situ protocol; use prefix_features for paper")
    ad, model = provider.adapter, provider.model
    by_layer: dict[int, list[int]] = {}
    for l, h in provider.heads:
        by_layer.setdefault(l, []).append(h)
    post = ad.spec.post_attn_norm is not None  # sandwich norms: heads reach the residual through it
    names = [f"blocks.{l}.attn.z" for l in sorted(by_layer)] + ["ln_final.in"]
    names += [f"blocks.{l}.attn.out" for l in sorted(by_layer)] if post else []
    with record(ad, names) as acts:
        res = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=last_positions(attention_mask), use_cache=False,
                    **({} if targets_k else _no_logits(model)))
    zs = layer_values(acts, "attn.z")  # {layer: (B, T, H, dh)}
    total = None
    for l, heads in by_layer.items():
        W_O = ad.layer_weights(l).W_O[heads].detach()  # (K_l, dh, D)
        part = torch.einsum("btkc,kcd->btd", zs[l][:, :, heads].to(W_O.dtype), W_O)  # (B, T, D)
        if post:
            part = part * ad.post_attn_scale(l, acts[f"blocks.{l}.attn.out"]).to(part.dtype)
        total = part if total is None else total + part
    x = acts["ln_final.in"]  # (B, T, D) residual stream entering the final norm
    hidden = ad.final_norm()(x)  # (B, T, D)
    if provider.final_norm:
        scale, center = ad.final_norm_scale(x)  # (B, T, D)
        if center:
            total = total - total.mean(-1, keepdim=True)
        total = total * scale
    if provider.normalize:
        total = F.normalize(total, dim=-1)
    if not targets_k:
        return total, hidden
    logp = torch.log_softmax(res.logits.float(), dim=-1)  # (B, T, V)
    top = logp.topk(int(targets_k), dim=-1)
    return total, hidden, top.indices, top.values


@torch.no_grad()
def prefix_features(provider: ContextFieldProvider, sequences: Sequence[Sequence[int]], seq_idx: Sequence[int],
                    pos: Sequence[int], pad_id: int, hidden_fallback: bool = True) -> tuple[Tensor, Tensor]:
    """Field and hidden state for the pairs (seq_idx[i], pos[i]) by running the provider on each
    prefix ``sequences[seq_idx[i]][:pos[i]]`` (one batched, left-padded forward).

    This is the per-batch recompute path (benchmark baseline, paper protocols, reference in
    tests). Returns field (n, D) and hidden (n, D) (for the paper protocol, which has no hidden
    state, the model's final hidden state from a plain forward when ``hidden_fallback``).
    """
    prefixes = [list(sequences[s][:p]) for s, p in zip(seq_idx, pos)]
    ids, mask = pad_left(prefixes, pad_id)
    device = next(provider.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = provider(ids, mask)
    hidden = out.hidden
    if hidden is None and hidden_fallback:
        ad = provider.adapter
        with record(ad, ["ln_final.in"], last_only=True) as acts:
            provider.model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), use_cache=False,
                           **_no_logits(provider.model))
        hidden = ad.final_norm()(acts["ln_final.in"])
    return out.field, hidden


def pair_index(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(seq, pos) of every pair: positions 1..L-1 of every sequence. Two (N,) int32 arrays."""
    seq = np.concatenate([np.full(max(L - 1, 0), i, dtype=np.int32) for i, L in enumerate(lengths)])
    pos = np.concatenate([np.arange(1, L, dtype=np.int32) for L in lengths if L > 1])
    return seq, pos


def _allocate(directory: Path | None, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, np.ndarray]:
    if directory is None:
        return {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in shapes.items()}
    return {k: np.lib.format.open_memmap(directory / f"{k}.npy", mode="w+", dtype=dt, shape=shape)
            for k, (shape, dt) in shapes.items()}


@torch.no_grad()
def compute_features(provider: ContextFieldProvider, sequences: Sequence[Sequence[int]], pad_id: int,
                     directory: Path | None = None, batch_size: int = 16, progress: bool = True,
                     targets_k: int = 64) -> dict[str, np.ndarray]:
    """Features of every pair of ``sequences`` (see the module docstring), written into
    memory-mapped .npy files in ``directory`` (or in-memory arrays when ``None``).

    in_situ: one forward per batch of ``batch_size`` whole sequences. paper protocols: the
    provider on every prefix. Returns the arrays (``ARRAYS`` + ``token_table``).
    """
    from tqdm.auto import tqdm

    model = provider.model
    lengths = [len(s) for s in sequences]
    seq, pos = pair_index(lengths)
    n = int(seq.shape[0])
    if n == 0:
        raise ValueError("no (context, next token) pair: every sequence has fewer than 2 tokens")
    D = provider.dim
    W = provider.adapter.unembedding().detach().float()  # (V, D)
    table = unit_rows(W)  # (V, D)
    V = table.shape[0]
    K = int(targets_k) if provider.protocol == "in_situ" else 0
    arrays = _allocate(directory, {
        "field": ((n, D), np.float32), "hidden": ((n, D), np.float32), "spin": ((n, D), np.float32),
        "token": ((n,), np.int64), "seq": ((n,), np.int32), "pos": ((n,), np.int32),
        "token_table": ((V, D), np.float32), "token_norms": ((V,), np.float32),
        **({"target_ids": ((n, K), np.int32), "target_logp": ((n, K), np.float32)} if K else {})})
    arrays["token_norms"][:] = W.norm(dim=-1).cpu().numpy()
    arrays["seq"][:] = seq
    arrays["pos"][:] = pos
    tokens = np.array([sequences[s][p] for s, p in zip(seq, pos)], dtype=np.int64)
    arrays["token"][:] = tokens
    arrays["token_table"][:] = table.cpu().numpy()
    arrays["spin"][:] = table[torch.from_numpy(tokens)].cpu().numpy()
    device = next(model.parameters()).device
    starts = np.concatenate([[0], np.cumsum([max(L - 1, 0) for L in lengths])])  # first pair row of each sequence
    with tqdm(total=n, desc="context features", disable=not progress, unit="pair") as bar:
        if provider.protocol == "in_situ":
            for b in range(0, len(sequences), batch_size):
                chunk = list(range(b, min(len(sequences), b + batch_size)))
                ids, mask = pad_left([sequences[i] for i in chunk], pad_id)
                feats = sequence_features(provider, ids.to(device), mask.to(device), K)  # (B, T, ...)
                field, hidden = feats[0], feats[1]
                T = ids.shape[1]
                for row, i in enumerate(chunk):
                    L = lengths[i]
                    if L < 2:
                        continue
                    cols = slice(T - L, T - 1)  # context ends at positions 0..L-2 of the sequence
                    rows = slice(int(starts[i]), int(starts[i + 1]))
                    arrays["field"][rows] = field[row, cols].float().cpu().numpy()
                    arrays["hidden"][rows] = hidden[row, cols].float().cpu().numpy()
                    if K:
                        arrays["target_ids"][rows] = feats[2][row, cols].cpu().numpy()
                        arrays["target_logp"][rows] = feats[3][row, cols].cpu().numpy()
                    bar.update(L - 1)
        else:
            step = max(1, batch_size * 8)
            for b in range(0, n, step):
                sl = slice(b, min(n, b + step))
                field, hidden = prefix_features(provider, sequences, seq[sl], pos[sl], pad_id)
                arrays["field"][sl] = field.float().cpu().numpy()
                arrays["hidden"][sl] = hidden.float().cpu().numpy()
                bar.update(sl.stop - sl.start)
    for a in arrays.values():
        if isinstance(a, np.memmap):
            a.flush()
    return arrays


