"""Global-temperature sweep of the next-token distribution (paper Sec. IV.2, Eqs. 6-8).

From ONE forward pass per prompt: P_v(T) = softmax(L_v / T). For each T the logits are
rescaled and ``log_softmax`` gives log P exactly (no eps inside the log):

    S(T)      = -sum_v P_v log2 P_v          (bits; terms with P_v = 0 contribute 0)
    P_top1(T) = max_v P_v = exp(max_v log P_v)

averaged over prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class TemperatureSweep:
    """temps (nT,); entropy_bits, p_top1 (nT,) means over prompts; *_per_prompt (nT, P)."""

    temps: np.ndarray
    entropy_bits: np.ndarray
    p_top1: np.ndarray
    entropy_per_prompt: np.ndarray
    p_top1_per_prompt: np.ndarray

    def rows(self) -> list[dict[str, float]]:
        return [{"T": float(t), "entropy_bits": float(s), "p_top1": float(p),
                 "entropy_bits_sd": float(sd), "p_top1_sd": float(psd)}
                for t, s, p, sd, psd in zip(self.temps, self.entropy_bits, self.p_top1,
                                            self.entropy_per_prompt.std(1), self.p_top1_per_prompt.std(1))]


@torch.no_grad()
def temperature_sweep(logits: Tensor, temps: np.ndarray | list[float]) -> TemperatureSweep:
    """Order parameters vs T from last-position logits (P, V), computed in float64.

    The loop runs over temperatures only; each step is vectorised over prompts and vocabulary."""
    L = logits.double()
    ent, top = [], []
    for T in np.asarray(temps, dtype=np.float64):
        if T <= 0:
            raise ValueError(f"temperature {T} must be > 0")
        logp = torch.log_softmax(L / T, dim=-1)  # (P, V)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))  # P = 0 terms (incl. -inf logits) -> 0
        ent.append((-plogp.sum(-1) / math.log(2)).numpy())
        top.append(logp.max(-1).values.exp().numpy())
    ent_a, top_a = np.stack(ent), np.stack(top)  # (nT, P)
    return TemperatureSweep(np.asarray(temps, dtype=np.float64), ent_a.mean(1), top_a.mean(1), ent_a, top_a)
