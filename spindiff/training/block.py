"""``objective=block``: distil the LM's future-token distributions into draft heads.

For the pair at row i of the feature cache (context x_<p, its last position's field N and hidden
state h, next token x_p = the pending token z of a block), head k is trained towards the LM's own
distribution of x_{p+k} given the real sequence x_<p+k (teacher forcing): that is the soft target
(top-k + rest mass) stored at row i + k of the same sequence, so nothing new is computed and the
shared cache is reused as is. Because the cached sequences are samples from the LM itself, the
minimiser of E KL(p(. | x_<p+k) || q_k(. | x_<=p)) is the LM's marginal of x_{p+k} given x_<=p, the
best an independent head can draft. Rows whose sequence ends before p + k are masked out.

The objective widens the data module's batches with the future targets
(:class:`FuturePairDataset`, installed by :meth:`BlockObjective.prepare_datamodule` when the
Lightning module is set up) and reports per offset bounds on the probability that speculative
sampling accepts a draft from head k, sum_v min(p_v, q_k,v): the cache keeps only the LM's top-k
tokens of p, so ``val/accept@k`` = 1 - TV over the top-k plus one rest bin (lumping the rest can
only lower the TV: an UPPER bound) and ``val/accept_lb@k`` = the sum over the top-k alone (a LOWER
bound). On SmolLM2 (top-64, ~11% of p outside it) the two differ by ~0.1 and the acceptance seen
in generation sits near the lower one (docs/generation.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from spindiff.score.losses import grouped_kl
from spindiff.training.data import (EpochSampler, PairDataset, ResumableDataLoader, collate_batch)

__all__ = ["FuturePairDataset", "BlockObjective", "install_future_targets", "SAMPLED_NEGATIVES"]

SAMPLED_NEGATIVES = 2048  # uniform draws that estimate the normaliser's tail in training (0 = exact softmax)


class FuturePairDataset(PairDataset):
    """:class:`PairDataset` plus the soft targets of the next ``block`` pairs of the same sequence:
    ``future_ids`` (B, K, k) int, ``future_logp`` (B, K, k) float32, ``future_valid`` (B, K) bool."""

    def __init__(self, store: Any, indices: np.ndarray, block: int) -> None:
        super().__init__(store, indices)
        if "target_ids" not in self.keys:
            raise ValueError("objective=block needs the LM's soft targets in the features (data.targets_k > 0, "
                             "field.protocol=in_situ)")
        self.block = int(block)
        self._seq = None if store.directory is not None else np.asarray(store.arrays["seq"])

    @property
    def seq(self) -> np.ndarray:
        if self._seq is None:
            self._seq = np.load(self.directory / "seq.npy", mmap_mode="r")
        return self._seq

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self.directory is not None:
            state["_seq"] = None
        return state

    def __getitems__(self, items: Sequence[int]) -> dict[str, Tensor]:
        out = super().__getitems__(items)
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        seq = self.seq
        n = seq.shape[0]
        fut = rows[:, None] + np.arange(1, self.block + 1)[None]  # (B, K)
        inside = fut < n
        fut = np.minimum(fut, n - 1)
        valid = inside & (np.asarray(seq[fut.ravel()]).reshape(fut.shape) == np.asarray(seq[rows])[:, None])
        a = self.arrays
        flat = fut.ravel()
        ids = np.asarray(a["target_ids"][flat]).reshape(*fut.shape, -1)
        logp = np.asarray(a["target_logp"][flat]).reshape(*fut.shape, -1)
        toks = np.asarray(a["token"][flat]).reshape(fut.shape)  # x_{p+k}: the teacher-forced drafts
        out.update(future_ids=torch.from_numpy(ids), future_logp=torch.from_numpy(logp),
                   future_valid=torch.from_numpy(valid), future_tokens=torch.from_numpy(toks))
        return out


def install_future_targets(dm: Any, block: int) -> None:
    """Make a :class:`spindiff.training.data.PairDataModule` serve :class:`FuturePairDataset`
    batches (same split, order, resumable sampler)."""
    def loader(idx: np.ndarray, shuffle: bool) -> DataLoader:
        world, rank = dm._rank()
        sampler = EpochSampler(len(idx), dm.seed, shuffle, world, rank)
        cls = ResumableDataLoader if shuffle else DataLoader
        return cls(FuturePairDataset(dm.store, idx, block), batch_size=dm.batch_size, sampler=sampler,
                   collate_fn=collate_batch, num_workers=dm.num_workers, persistent_workers=dm.num_workers > 0)

    dm.train_dataloader = lambda: loader(dm.train_idx, True)
    dm.val_dataloader = lambda: [] if len(dm.val_idx) == 0 else loader(dm.val_idx, False)


@dataclass
class BlockObjective:
    """Grouped KL from the LM's future-token targets to each draft head (module docstring)."""

    name: str = "block"

    def prepare_datamodule(self, module: Any, dm: Any) -> None:
        install_future_targets(dm, int(module.score_net.block))
        net = module.score_net
        if getattr(net, "ranked", False):  # the drafter's vocabulary ranking, from the training rows' soft targets
            a = dm.store.arrays
            idx = np.sort(np.asarray(dm.train_idx))
            net.set_vocab_rank(torch.from_numpy(np.asarray(a["target_ids"][idx])),
                               torch.from_numpy(np.asarray(a["target_logp"][idx])))

    @staticmethod
    def logits(module: Any, batch: dict[str, Tensor]) -> Tensor:
        net = module.score_net
        return net.readout_logits(BlockObjective.directions(module, batch), module.token_table.to(batch["hidden"].dtype))

    @staticmethod
    def directions(module: Any, batch: dict[str, Tensor]) -> Tensor:
        """u_k (B, K, d), with the learned coupling fed the real next tokens (teacher forcing)."""
        net, table = module.score_net, module.token_table.to(batch["hidden"].dtype)
        prev = table[batch["future_tokens"].long()] if net.rank > 0 else None
        return net.directions(batch["field"], batch["hidden"], table[batch["token"].long()], prev_vecs=prev)

    @staticmethod
    def _kl(module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per (row, offset): grouped KL, grouped TV, top-1 agreement, validity, and the lower bound
        sum_{v in top-k} min(p_v, q_v) of the acceptance probability (B, K) each."""
        if "future_ids" not in batch:
            raise ValueError("objective=block needs FuturePairDataset batches (BlockObjective.prepare_datamodule)")
        logits = BlockObjective.logits(module, batch)
        B, K, V = logits.shape
        ids, logp = batch["future_ids"][:, :K], batch["future_logp"][:, :K]
        kl, tv, lq = grouped_kl(logits.reshape(B * K, V), ids.reshape(B * K, -1), logp.reshape(B * K, -1))
        lower = torch.minimum(logp.reshape(B * K, -1).float().exp(), lq.exp()).sum(-1)
        top1 = (logits.argmax(-1) == ids[..., 0].long()).float()
        return kl.view(B, K), tv.view(B, K), top1, batch["future_valid"][:, :K].to(kl.dtype), lower.view(B, K)

    def loss(self, module: Any, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        m = int(getattr(module.score_net, "train_negatives", 0) or SAMPLED_NEGATIVES)
        if m <= 0 or m >= module.token_table.shape[0] // 2:
            kl, _, _, w, _ = self._kl(module, batch)
        else:
            kl, w = self._sampled_kl(module, batch, m, generator)
        return (kl * w).sum() / w.sum().clamp_min(1.0)

    @staticmethod
    def _sampled_kl(module: Any, batch: dict[str, Tensor], m: int,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The grouped KL with the softmax normaliser estimated (sampled softmax): exact logits for
        the batch's target tokens C (the union of its top-k ids), the other V - |C| tokens' share of
        the normaliser estimated from ``m`` uniform draws among them, (V - |C|) / m * sum exp(l).
        The table product shrinks from V to |C| + m columns (~6x at V = 49152): training cost is
        the table product, and this keeps ``experiment=block`` within minutes on 2 cores."""
        net, table = module.score_net, module.token_table.to(batch["hidden"].dtype)
        u = BlockObjective.directions(module, batch)  # (B, K, d)
        B, K, _ = u.shape
        V = table.shape[0]
        ids = batch["future_ids"][:, :K].long()  # (B, K, k)
        cand = torch.unique(ids)  # sorted (C,)
        draw = torch.randint(0, V, (2 * m,), generator=generator, device=ids.device)
        draw = draw[~torch.isin(draw, cand)][:m]
        cols = torch.cat([cand, draw])
        logits = (u.reshape(B * K, -1) @ table[cols].T) * net.scale[cols] + net.bias[cols]  # (B K, C + m)
        lc, ls = logits[:, :cand.numel()], logits[:, cand.numel():]
        rest = torch.logsumexp(ls, -1) + math.log(max(V - cand.numel(), 1) / max(ls.shape[-1], 1))
        lse = torch.logaddexp(torch.logsumexp(lc, -1), rest)  # (B K,)
        pos = torch.searchsorted(cand, ids.reshape(B * K, -1))  # (B K, k) columns of the targets
        lq = lc.gather(1, pos) - lse[:, None]
        lp = batch["future_logp"][:, :K].reshape(B * K, -1).float()
        p = lp.exp()
        p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
        lq_rest = torch.log1p(-torch.exp(torch.logsumexp(lq, -1)).clamp(max=1.0 - 1e-7))
        kl = (p * (lp - lq)).sum(-1) + p_rest * (torch.log(p_rest.clamp_min(1e-30)) - lq_rest)
        return kl.view(B, K), batch["future_valid"][:, :K].to(kl.dtype)

    def metrics(self, module: Any, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        kl, tv, top1, w, lower = self._kl(module, batch)
        den = w.sum(0).clamp_min(1.0)  # (K,)
        out = {"val/loss": (kl * w).sum() / w.sum().clamp_min(1.0)}
        for k in range(kl.shape[1]):
            out[f"val/kl@{k + 1}"] = (kl[:, k] * w[:, k]).sum() / den[k]
            out[f"val/accept@{k + 1}"] = ((1 - tv[:, k]) * w[:, k]).sum() / den[k]  # an upper bound (below)
            out[f"val/accept_lb@{k + 1}"] = (lower[:, k] * w[:, k]).sum() / den[k]
            out[f"val/top1@{k + 1}"] = (top1[:, k] * w[:, k]).sum() / den[k]
        return out
