"""Decoding a final spin into a token: nearest cosine (one matmul, optional bfloat16 pre-search),
or a draw from softmax(kappa cos).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor


def decode_spins(spins: Tensor, table: Tensor, kappa: Optional[float] = None,
                 generator: torch.Generator | None = None, chunk: int = 512,
                 coarse: Optional[Tensor] = None, candidates: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens for spins by cosine against unit rows: argmax, or a draw from softmax(kappa * cos).

    Args:
        spins: (N, d) final states (unit for the sphere; any vector works: cosine uses S/|S|).
        table: (V, d) unit-normalised unembedding rows.
        kappa: None -> nearest token; else inverse temperature of the softmax over cosines.
        chunk: rows per matmul (bounds the (chunk, V) score buffer).
        coarse: optional low-precision copy of ``table`` (bfloat16) for the nearest-token search:
            one coarse matmul picks ``candidates`` tokens per spin, which are re-scored exactly
            in the table's precision (the argmax and the runner-up are exact unless the true top-2
            fall outside the coarse top-16, i.e. unless the bfloat16 error of a cosine, < 1e-2,
            exceeds the gap between the 2nd and the 16th best). Ignored when ``kappa`` is set.
    Returns:
        ids (N,) int64, cos (N,) cosine to the chosen token, margin (N,) = cos(chosen) minus the
        best cosine among the other tokens (> 0 when the chosen token is the nearest).
    """
    ids, cos, margin = [], [], []
    unit = spins / spins.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, d)
    for part in unit.split(chunk):
        if kappa is None and coarse is not None:
            cand = (part.to(coarse.dtype) @ coarse.T).topk(candidates, dim=-1).indices  # (n, k) one coarse matmul
            exact = torch.einsum("nd,nkd->nk", part, table[cand])  # (n, k) exact cosines of the candidates
            top2 = exact.topk(2, dim=-1)
            ids.append(cand.gather(1, top2.indices[:, :1]).squeeze(1))
            cos.append(top2.values[:, 0])
            margin.append(top2.values[:, 0] - top2.values[:, 1])
            continue
        scores = part @ table.T  # (n, V)
        top2 = scores.topk(2, dim=-1)  # values, indices (n, 2)
        if kappa is None:
            chosen = top2.indices[:, 0]
        else:
            probs = torch.softmax(float(kappa) * scores, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        c = scores.gather(1, chosen[:, None]).squeeze(-1)  # (n,)
        best_other = torch.where(chosen == top2.indices[:, 0], top2.values[:, 1], top2.values[:, 0])
        ids.append(chosen)
        cos.append(c)
        margin.append(c - best_other)
    return torch.cat(ids), torch.cat(cos), torch.cat(margin)


def coarse_table(table: Tensor, rows: int = 8, reps: int = 3) -> Optional[Tensor]:
    """A bfloat16 copy of ``table`` when a bfloat16 matmul of ``rows`` spins against it is faster
    here than float32 (CPUs with native bfloat16 GEMM: ~4x at V = 49152), else None."""
    if table.dtype != torch.float32 or table.shape[0] < 4096:
        return None
    try:
        low = table.to(torch.bfloat16)
        x = torch.randn(rows, table.shape[1], dtype=table.dtype, device=table.device)

        def best(fn: Callable[[], Any]) -> float:
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        with torch.no_grad():
            t32 = best(lambda: x @ table.T)
            t16 = best(lambda: (x.to(torch.bfloat16) @ low.T).topk(16, dim=-1))
        return low if t16 < 0.8 * t32 else None
    except (RuntimeError, TypeError):
        return None
