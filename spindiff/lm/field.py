"""Context-field provider: the field N_proj that a model's own attention heads produce.

For a head (l, h) at the last position of a context,

    N0   = sum_j alpha_j V_j           (d_head,)   the head's value-space context vector
    N_proj = N0 @ W_O[h]                (D,)        its contribution to the residual stream
                                                    (times the frozen post-attention norm scale
                                                    for sandwich-norm families: Gemma 2, OLMo2)

(row-vector convention of :mod:`spindiff.lm.adapter`; the paper writes N_proj = W_O N0).

Two protocols:

- ``in_situ``: each head's real output in the model's forward pass, read at the input of the
  output projection (direct logit attribution). Optionally through the frozen final-norm
  scale (``final_norm=True``) so that ``N_proj . e_t`` is in logit units.
- ``paper`` (``paper_fixed`` in the analysis): the reference protocol of the paper: raw token
  embeddings as every head's input, no biases, no norms, no positions. ``wo="reference"``
  reproduces the reference code's W_O slice (``out_proj.weight[:, h*dh:(h+1)*dh]`` applied as
  ``N0 @ slice.T``), which is the transposed (wrong) block for GPT-2's ``Conv1D`` and the right
  block for ``nn.Linear`` families.

The provider is batched (left padding), returns the last hidden state and logits of the same
forward pass, and continues from the KV cache while generating (:meth:`ContextFieldProvider.step`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from spindiff.lm.adapter import ArchitectureAdapter, HeadList, get_adapter, last_positions  # noqa: F401 (re-exported)
from spindiff.lm.hooks import layer_values, record


@dataclass
class FieldOutput:
    """Everything one forward pass gives about the last position.

    per_head: (B, K, D) N_proj of each selected head (K = number of heads in the spec)
    field:    (B, D)    sum over selected heads (unit-norm when ``normalize``)
    field_norm: (B,)    |sum| before normalisation
    hidden:   (B, D)    final hidden state (after the final norm) at the last position
    logits:   (B, V)    next-token logits
    past:     the KV cache (in_situ), to continue with :meth:`ContextFieldProvider.step`
    attention_mask: (B, T) mask of the whole context so far
    """

    per_head: Tensor
    field: Tensor
    field_norm: Tensor
    hidden: Tensor | None
    logits: Tensor | None
    past: Any = None
    attention_mask: Tensor | None = None


def resolve_head_spec(spec: str, adapter: ArchitectureAdapter, report: str = "") -> HeadList:
    """Head spec -> list of (layer, head). Besides adapter specs (``all``, ``L3``, ``L3H5,L0H2``)
    accepts ``topk:K``: the K heads with largest |r| in ``report`` (a report.json of
    ``python -m analysis all``, which lists ``heads_ranked`` as [{"layer","head","r"}...])."""
    if spec.startswith("topk:"):
        k = int(spec.split(":", 1)[1])
        if not report:
            raise ValueError("field.heads=topk:K needs field.report=PATH/report.json from `python -m analysis all`")
        data = json.loads(Path(report).read_text())
        ranked = data.get("heads_ranked") or data.get("top_heads")
        if not ranked:
            raise ValueError(f"{report} has no 'heads_ranked' list; re-run `python -m analysis all`")
        heads = [(int(r["layer"]), int(r["head"])) for r in ranked[:k]]
        adapter.parse_heads(",".join(f"L{l}H{h}" for l, h in heads))  # validates the shape
        return heads
    return adapter.parse_heads(spec)


class ContextFieldProvider(nn.Module):
    """Computes N_proj (per head and summed) at the last position of a batch of contexts.

    Args:
        model: a causal LM of a supported family (:mod:`spindiff.lm.families`).
        heads: head spec string or list of (layer, head).
        protocol: ``in_situ`` | ``paper`` | ``paper_fixed`` (``paper`` = reference W_O slice).
        normalize: return a unit-norm summed field.
        final_norm: in_situ only: multiply per-head outputs by the frozen final-norm scale.
    """

    def __init__(self, model: nn.Module, heads: str | HeadList = "all", protocol: str = "in_situ",
                 normalize: bool = True, final_norm: bool = True, report: str = "",
                 adapter: ArchitectureAdapter | None = None):
        super().__init__()
        if protocol not in ("in_situ", "paper", "paper_fixed"):
            raise ValueError(f"field protocol '{protocol}': use in_situ, paper or paper_fixed")
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.heads: HeadList = resolve_head_spec(heads, self.adapter, report) if isinstance(heads, str) else list(heads)
        self.protocol = protocol
        self.normalize = normalize
        self.final_norm = final_norm
        self.layers = sorted({l for l, _ in self.heads})
        self._by_layer = {l: [h for ll, h in self.heads if ll == l] for l in self.layers}
        self._W_O = {l: self._wo(l) for l in self.layers}  # (K_l, dh, D)
        # one stacked (K, dh, D) block so that every step does a single batched matmul, and the
        # per-layer head index only where a layer is partly selected
        self._W_all = torch.cat([self._W_O[l] for l in self.layers], 0)
        self._sel = {l: (None if self._by_layer[l] == list(range(self.adapter.n_heads))
                         else torch.tensor(self._by_layer[l])) for l in self.layers}

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> "ContextFieldProvider":
        return cls(model, cfg.heads, cfg.protocol, cfg.normalize, cfg.final_norm, cfg.report)

    @property
    def dim(self) -> int:
        return self.adapter.d_model

    def _wo(self, layer: int) -> Tensor:
        idx = self._by_layer[layer]
        if self.protocol == "paper":
            return reference_W_O(self.adapter, layer)[idx].detach()
        return self.adapter.layer_weights(layer).W_O[idx].detach()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False) -> FieldOutput:
        """Field at the last position of ``input_ids`` (B, T) (left padding for ragged batches)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.protocol == "in_situ":
            return self._in_situ(input_ids, attention_mask, past=None, use_cache=use_cache)
        return self._paper(input_ids, attention_mask)

    @torch.no_grad()
    def step(self, new_ids: Tensor, prev: FieldOutput) -> FieldOutput:
        """Append ``new_ids`` (B,) or (B, 1) to the context of ``prev`` and return the new field,
        reusing the KV cache (in_situ) — one incremental forward step."""
        new_ids = new_ids.view(-1, 1)
        mask = torch.cat([prev.attention_mask, torch.ones_like(new_ids)], dim=1)
        if self.protocol != "in_situ" or prev.past is None:
            raise ValueError("step() needs an in_situ FieldOutput computed with use_cache=True")
        return self._in_situ(new_ids, mask, past=prev.past, use_cache=True)

    # ------------------------------------------------------------------ protocols
    def _combine(self, per_head: Tensor, hidden: Tensor | None, logits: Tensor | None, past: Any,
                 mask: Tensor) -> FieldOutput:
        total = per_head.sum(1)  # (B, D)
        norm = total.norm(dim=-1)
        field = total / norm.clamp_min(1e-12)[:, None] if self.normalize else total
        return FieldOutput(per_head, field, norm, hidden, logits, past, mask)

    def _in_situ(self, ids: Tensor, mask: Tensor, past: Any, use_cache: bool) -> FieldOutput:
        ad = self.adapter
        pos = last_positions(mask)[:, -ids.shape[1]:]
        post = ad.spec.post_attn_norm is not None  # sandwich norms: heads reach the residual through it
        names = [f"blocks.{l}.attn.z" for l in self.layers] + ["ln_final.in", "ln_final.out"]
        names += [f"blocks.{l}.attn.out" for l in self.layers] if post else []
        with record(ad, names, last_only=True) as acts:
            # transformers >= 5.24 names the KV cache `cache` (in and out); `past_key_values`
            # is deprecated there and removed in 5.40 (pyproject.toml pins the tested range)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             cache=past, use_cache=use_cache, output_hidden_states=False)
        zs = layer_values(acts, "attn.z")  # {layer: (B, H, dh)}
        z = torch.cat([zs[l] if self._sel[l] is None else zs[l].index_select(1, self._sel[l])
                       for l in self.layers], dim=1).to(self._W_all.dtype)  # (B, K, dh)
        per_head = torch.bmm(z.transpose(0, 1), self._W_all).transpose(0, 1)  # (B, K, D)
        if post:
            scales = [ad.post_attn_scale(l, acts[f"blocks.{l}.attn.out"]) for l in self.layers]  # (B, D) each
            per_head = per_head * torch.cat([s[:, None].expand(-1, len(self._by_layer[l]), -1)
                                             for l, s in zip(self.layers, scales)], 1).to(per_head.dtype)
        x = acts["ln_final.in"]  # (B, D) residual stream entering the final norm
        hidden = acts["ln_final.out"]
        if self.final_norm:
            scale, center = ad.final_norm_scale(x)
            if center:
                per_head = per_head - per_head.mean(-1, keepdim=True)
            per_head = per_head * scale[:, None, :]
        return self._combine(per_head, hidden, out.logits[:, -1], out.cache if use_cache else None, mask)

    def _paper(self, ids: Tensor, mask: Tensor) -> FieldOutput:
        X = self.adapter.embedding()[ids]  # (B, T, D) raw token embeddings, no positions/norm
        per_head = []
        for l in self.layers:
            n0 = paper_context_vectors(self.adapter, X, mask, l, self._by_layer[l])  # (B, K_l, dh)
            per_head.append(torch.einsum("bkc,kcd->bkd", n0, self._W_O[l]))
        return self._combine(torch.cat(per_head, 1), None, None, None, mask)


def reference_W_O(adapter: ArchitectureAdapter, layer: int) -> Tensor:
    """W_O as the paper's reference code slices it: ``out_proj.weight[:, h*dh:(h+1)*dh]``,
    applied as ``N0 @ slice.T`` -> returned as (H, dh, D) in our convention. For GPT-2's
    ``Conv1D`` ([in, out]) these are output COLUMNS (wrong block); for ``nn.Linear`` ([out, in])
    they are the right block."""
    W = adapter.out_proj(layer).weight
    H, dh = adapter.n_heads, adapter.d_head
    return torch.stack([W[:, h * dh:(h + 1) * dh].T for h in range(H)])


def paper_context_vectors(adapter: ArchitectureAdapter, X: Tensor, mask: Tensor, layer: int,
                          heads: Sequence[int] | None = None) -> Tensor:
    """N0 of the reference protocol for many prompts and heads at once.

    X: (B, T, D) raw token embeddings; mask: (B, T). Query = last position (left padding).
    Returns (B, K, dh): alpha = softmax(Q_last . K^T / sqrt(dh)) over unmasked keys, N0 = alpha @ V.
    No biases, norms or positions."""
    w = adapter.layer_weights(layer)
    idx = list(range(adapter.n_heads)) if heads is None else list(heads)
    Wq, Wk, Wv = w.W_Q[idx], w.W_K[idx], w.W_V[idx]  # (K, D, dh)
    q = torch.einsum("bd,kdc->bkc", X[:, -1], Wq)  # (B, K, dh)
    k = torch.einsum("btd,kdc->bktc", X, Wk)  # (B, K, T, dh)
    v = torch.einsum("btd,kdc->bktc", X, Wv)
    scores = torch.einsum("bkc,bktc->bkt", q, k) / adapter.d_head**0.5
    scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    alpha = scores.softmax(-1)  # (B, K, T)
    return torch.einsum("bkt,bktc->bkc", alpha, v)
