"""Head-pair interactions: joint ablation of every pair of the top-K heads against the sum of the
single ablation effects.

For heads a, b on one prompt, with e(S) the change in dL when the heads in S are ablated together,

    I(a, b) = e({a, b}) - e({a}) - e({b})

which is also the pair's Harsanyi dividend with dL as the value of the heads that are present:
v(ab) - v(a) - v(b) + v(none), v(S) = dL with the other heads of the pair ablated. I = 0 is
additivity. I > 0: **cooperative** beyond additivity (with both present, dL moves toward the good
candidate by more than the sum of their separate contributions: complements); I < 0:
**antagonistic** (less than the sum: redundant backups, or heads whose pushes interfere).

Every ablation (singles and pairs) runs as rows of one batch (specs x prompts) through the full
model with a per-row ablation mask at each layer's output projection (:func:`joint_ablation`),
equal to :meth:`ArchitectureAdapter.ablate` on each spec alone (tested).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis.ablation import ablation_check, _gap
from analysis.gaps import last_logits
from analysis.prompts import TokenizedSet
from analysis.stats import bh_q
from spindiff.lm.adapter import ArchitectureAdapter, HeadList, head_name
from spindiff.lm.hooks import hooks
from spindiff.lm.tokens import pad_left


@torch.no_grad()
def joint_ablation(model: nn.Module, ad: ArchitectureAdapter, tset: TokenizedSet, specs: list[HeadList],
                   mode: str = "zero", mean_z: dict[int, Tensor] | None = None, pad_id: int = 0,
                   max_rows: int = 256, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """dL with each spec's heads ablated together, for every prompt: returns (base (P,), (P, S))."""
    ablation_check(mode, mean_z)
    ids, mask = pad_left(tset.ids, pad_id)
    P = ids.shape[0]
    g, b = tset.good_first, tset.bad_first
    base = _gap(last_logits(model, ids, mask), g, b).numpy()
    out = np.empty((P, len(specs)))
    per = max(1, max_rows // P)
    H = ad.n_heads
    for c in tqdm(range(0, len(specs), per), desc="pairs", disable=not progress, leave=False):
        chunk = specs[c:c + per]
        S = len(chunk)
        sel = torch.zeros(ad.n_layers, S, H, dtype=torch.bool)  # layer, spec, head
        for s, spec in enumerate(chunk):
            for l, h in spec:
                sel[l, s, h] = True
        rows = sel.repeat_interleave(P, 1)[:, :, None, :, None]  # (L, S*P, 1, H, 1), spec-major rows

        def edit(z: Tensor, point: Any, rows: Tensor = rows) -> Tensor:
            repl = torch.zeros_like(z) if mode == "zero" else mean_z[point.layer].to(z).expand_as(z)
            return torch.where(rows[point.layer], repl, z)
        with hooks(ad, {f"blocks.{l}.attn.z": edit for l in sorted({l for spec in chunk for l, _ in spec})}):
            lg = last_logits(model, ids.repeat(S, 1), mask.repeat(S, 1))
        out[:, c:c + S] = _gap(lg, g.repeat(S), b.repeat(S)).numpy().reshape(S, P).T
    return base, out


@dataclass
class PairInteractions:
    """heads: K (layer, head); single: (P, K) effects; joint: (P, K, K) effects of each pair (the
    diagonal holds the single effects); interaction: (P, K, K), 0 on the diagonal."""

    heads: HeadList
    single: np.ndarray
    joint: np.ndarray
    mode: str
    prompt_ids: list[int]

    @property
    def interaction(self) -> np.ndarray:
        I = self.joint - self.single[:, :, None] - self.single[:, None, :]
        idx = np.arange(len(self.heads))
        I[:, idx, idx] = 0.0
        return I

    @property
    def names(self) -> list[str]:
        return [head_name(l, h) for l, h in self.heads]

    def pairs(self, alpha: float = 0.05) -> list[dict[str, Any]]:
        """One record per pair, sorted by |mean I|: means, sd, t-test over prompts (p, BH q), role."""
        I, K = self.interaction, len(self.heads)
        n = I.shape[0]
        recs = []
        for i, j in itertools.combinations(range(K), 2):
            x = I[:, i, j]
            sd = float(x.std(ddof=1)) if n > 1 else float("nan")
            p = float(sps.ttest_1samp(x, 0.0).pvalue) if n > 1 and sd > 0 else float("nan")
            recs.append({"head_a": self.names[i], "head_b": self.names[j],
                         "effect_a": float(self.single[:, i].mean()), "effect_b": float(self.single[:, j].mean()),
                         "effect_ab": float(self.joint[:, i, j].mean()), "interaction": float(x.mean()),
                         "interaction_sd": sd, "p": p,
                         "relative": float(np.abs(x).mean() / max(np.abs(self.single[:, [i, j]]).sum(1).mean(), 1e-12))})
        q = bh_q(np.nan_to_num(np.array([r["p"] for r in recs]), nan=1.0)) if recs else []
        for r, qq in zip(recs, q):
            r["q_bh"] = float(qq)
            r["role"] = ("cooperative" if r["interaction"] > 0 else "antagonistic") if qq < alpha else "additive"
        return sorted(recs, key=lambda r: -abs(r["interaction"]))


def pair_interactions(model: nn.Module, ad: ArchitectureAdapter, tset: TokenizedSet, heads: HeadList,
                      mode: str = "zero", mean_z: dict[int, Tensor] | None = None, pad_id: int = 0,
                      max_rows: int = 256, progress: bool = False,
                      prompt_ids: list[int] | None = None) -> PairInteractions:
    """Singles and every pair of ``heads`` ablated on every prompt of ``tset``."""
    K = len(heads)
    pairs = list(itertools.combinations(range(K), 2))
    specs = [[hd] for hd in heads] + [[heads[i], heads[j]] for i, j in pairs]
    base, dl = joint_ablation(model, ad, tset, specs, mode, mean_z, pad_id, max_rows, progress)
    eff = dl - base[:, None]
    single = eff[:, :K]
    joint = np.zeros((eff.shape[0], K, K))
    idx = np.arange(K)
    joint[:, idx, idx] = single
    for c, (i, j) in enumerate(pairs):
        joint[:, i, j] = joint[:, j, i] = eff[:, K + c]
    return PairInteractions(list(heads), single, joint, mode,
                            list(prompt_ids if prompt_ids is not None else range(len(tset))))
