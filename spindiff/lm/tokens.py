"""Token-id batches for the LM: ragged id lists -> left-padded (B, T) ids and attention mask."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["pad_left"]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-padded ids (B, T) int64 and attention mask (B, T) int64 for ragged token lists
    (``torch.nn.utils.rnn.pad_sequence``; left padding keeps every row's last token at T - 1)."""
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=int(pad_id), padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)
