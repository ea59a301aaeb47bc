"""Causal head ablation: targeted (any head spec on any prompt) and a full scan of every head.

Ablation edits z_h (the head's input to the output projection) at every position:
``zero`` sets z_h = 0, ``mean`` sets z_h to its mean over all real tokens of a reference
prompt set (the analysis prompt set). The effect is the change in dL_actual.

Full scan, fast path (:func:`ablation_scan`): one baseline forward caches, for every layer l,
the residual stream entering it, its attention output and z. Ablating head h of layer l changes
only that layer's attention output, by (z_h' - z_h) @ W_O[h]; the other heads' z are unchanged.
So every head of layer l is handled as one batch (heads x prompts) that starts from

    resid_mid' = resid_pre[l] + attn_out[l] + (z_h' - z_h) @ W_O[h]

runs the MLP half of layer l and layers l+1 .. L-1 (called with the exact arguments the model
passed them in the baseline: attention mask, position ids, rotary embeddings, expanded over
the head batch), and reads the gap at the last position. Layers before l are never recomputed.
:func:`scan_full_forward` (one full forward per head, prompts batched: what TransformerLens'
patching helpers do) is the reference it must equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis.gaps import last_logits
from analysis.prompts import TokenizedSet
from spindiff.lm.adapter import ArchitectureAdapter, HeadList
from spindiff.lm.field import last_positions
from spindiff.lm.hooks import layer_values, record
from spindiff.lm.tokens import pad_left


def ablation_check(mode: str, mean_z: dict[int, Tensor] | None) -> None:
    """``mode`` is zero or mean, and mean-ablation comes with its mean z."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode '{mode}': use zero or mean")
    if mode == "mean" and mean_z is None:
        raise ValueError("mean ablation needs mean_z (analysis.ablation.mean_z_over)")


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, max(1, size))]


@torch.no_grad()
def mean_z_over(model: nn.Module, adapter: ArchitectureAdapter, tset: TokenizedSet, pad_id: int,
                batch_size: int = 16) -> dict[int, Tensor]:
    """Mean of z over every real token of a prompt set: {layer: (H, dh)} (left padding handled,
    position ids passed)."""
    sums: dict[int, Tensor] = {}
    count = 0
    for idx in _batches(len(tset), batch_size):
        ids, mask = pad_left([tset.ids[i] for i in idx], pad_id)
        with adapter.capture_z() as zs:
            last_logits(model, ids, mask)
        m = mask.bool()
        for l, z in zs.items():
            s = z[m].double().sum(0)  # (H, dh)
            sums[l] = sums[l] + s if l in sums else s
        count += int(m.sum())
    dtype = next(model.parameters()).dtype
    return {l: (s / count).to(dtype) for l, s in sums.items()}


def _gap(logits: Tensor, good: Tensor, bad: Tensor) -> Tensor:
    return (logits.gather(-1, good[:, None]) - logits.gather(-1, bad[:, None]))[:, 0].double()


@torch.no_grad()
def gaps_with_ablation(model: nn.Module, adapter: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                       bad: Tensor, heads: HeadList | None = None, mode: str = "zero",
                       mean_z: dict[int, Tensor] | None = None) -> Tensor:
    """dL_actual (B,) of a left-padded batch with ``heads`` ablated together (None: baseline)."""
    if not heads:
        return _gap(last_logits(model, ids, mask), good, bad)
    with adapter.ablate(heads, mode, mean_z):
        return _gap(last_logits(model, ids, mask), good, bad)


def ablation_table(model: nn.Module, adapter: ArchitectureAdapter, tset: TokenizedSet, heads: HeadList,
                   modes: tuple[str, ...], mean_z: dict[int, Tensor] | None, pad_id: int) -> list[dict[str, Any]]:
    """Targeted ablation on every prompt of ``tset`` (usually one): baseline, each head alone,
    and all heads together, for each mode. Rows: prompt_id, mode, ablated, dl_base, dl_ablated, delta."""
    ids, mask = pad_left(tset.ids, pad_id)
    g, b = tset.good_first, tset.bad_first
    base = gaps_with_ablation(model, adapter, ids, mask, g, b)
    rows = []
    specs = [[hd] for hd in heads] + ([list(heads)] if len(heads) > 1 else [])
    for mode in modes:
        for spec in specs:
            dl = gaps_with_ablation(model, adapter, ids, mask, g, b, spec, mode, mean_z)
            name = "+".join(f"L{l}H{h}" for l, h in spec)
            for p in range(len(tset)):
                rows.append({"prompt_id": p, "mode": mode, "ablated": name, "dl_base": float(base[p]),
                             "dl_ablated": float(dl[p]), "delta": float(dl[p] - base[p])})
    return rows


# --------------------------------------------------------------------------- full scan
def _expand(x: Any, reps: int, B: int) -> Any:
    """Repeat batch-leading tensors (dim >= 2, size B) ``reps`` times, head-major (row k*B + b)."""
    if isinstance(x, Tensor):
        return x.repeat(reps, *([1] * (x.dim() - 1))) if x.dim() >= 2 and x.shape[0] == B else x
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(e, reps, B) for e in x)
    if isinstance(x, dict):
        return {k: _expand(v, reps, B) for k, v in x.items()}
    return x


@dataclass
class _Cache:
    calls: dict[int, tuple[tuple, dict]]  # layer -> (args, kwargs) of the decoder-layer call
    resid_pre: dict[int, Tensor]  # (B, T, D) the residual entering the layer
    resid_post: dict[int, Tensor]  # (B, T, D) the layer's output (parallel-residual families only)
    z: dict[int, Tensor]  # (B, T, H, dh) input of the output projection
    attn_out: dict[int, Tensor]  # (B, T, D) its output (incl. bias)
    logits: Tensor  # (B, V) last position


@torch.no_grad()
def _baseline_with_cache(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor) -> _Cache:
    names = ["blocks.*.call", "blocks.*.resid_pre", "blocks.*.attn.z", "blocks.*.attn.out"]
    with record(ad, names + (["blocks.*.resid_post"] if ad.parallel else [])) as acts:
        out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1,
                    use_cache=False)
    return _Cache(*(layer_values(acts, k) for k in ("call", "resid_pre", "resid_post", "attn.z", "attn.out")),
                  out.logits[:, -1])


def _call_layer(layer: nn.Module, x: Tensor, positional: bool, rest: tuple, kwargs: dict) -> Tensor:
    """Rerun a decoder layer on a new residual x with the other arguments of its recorded call
    (``positional``: the residual was its first positional argument, else ``hidden_states=``)."""
    out = layer(x, *rest, **kwargs) if positional else layer(**{**kwargs, "hidden_states": x})
    return out[0] if isinstance(out, tuple) else out


class LayerSuffixScanner:
    """The fast scan on one left-padded batch (B prompts), one layer at a time.

    ``__init__`` runs the baseline forward and caches, per layer, the decoder layer's call
    arguments, z and the attention output; :meth:`layer` then returns the gap with each given
    head of that layer ablated alone, rerunning only the MLP half of the layer and the layers
    after it, with all those heads x prompts as one batch (chunks of ``max_rows`` rows).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                 bad: Tensor, mode: str = "zero", mean_z: dict[int, Tensor] | None = None, max_rows: int = 256):
        self.model, self.ad, self.mode, self.mean_z, self.max_rows = model, adapter, mode, mean_z, max_rows
        self.B = ids.shape[0]
        self.cache = _baseline_with_cache(model, adapter, ids, mask)
        self.base = _gap(self.cache.logits, good, bad)  # (B,)
        W_U = adapter.unembedding()
        self.de = W_U[good] - W_U[bad]  # (B, D)
        bias = getattr(model.get_output_embeddings(), "bias", None)
        self.db = (bias[good] - bias[bad]) if bias is not None else torch.zeros(self.B, dtype=self.de.dtype)
        self.cap = adapter.final_softcap()  # logit soft-capping (Gemma 2): gap from the capped logits
        if self.cap:
            self.good_bad = (W_U[good], W_U[bad], *((bias[good], bias[bad]) if bias is not None else (0, 0)))

    def _gap_of(self, hid: Tensor, K: int) -> Tensor:
        """Gap (K, B) from the final hidden states (K*B, D) of K copies of the batch."""
        h = hid.view(K, self.B, -1)
        if not self.cap:
            return (h * self.de[None]).sum(-1) + self.db[None]
        wg, wb, bg, bb = self.good_bad
        cap = lambda x: torch.tanh(x / self.cap) * self.cap  # noqa: E731
        return cap((h * wg[None]).sum(-1) + bg) - cap((h * wb[None]).sum(-1) + bb)

    @torch.no_grad()
    def layer(self, layer: int, heads: list[int]) -> Tensor:
        """Gap (B, len(heads)) with each head of ``layer`` in ``heads`` ablated alone."""
        ad, B, cache = self.ad, self.B, self.cache
        layers = ad.layers()
        W_O = ad.layer_weights(layer).W_O  # (H, dh, D)
        zl = cache.z[layer]  # (B, T, H, dh)
        a = cache.attn_out[layer]  # (B, T, D)
        out = torch.empty(B, len(heads), dtype=torch.float64)
        per_chunk = max(1, self.max_rows // B)
        for c in range(0, len(heads), per_chunk):
            hs = heads[c:c + per_chunk]
            K = len(hs)
            zh = zl[:, :, hs]  # (B, T, K, dh)
            dz = -zh if self.mode == "zero" else self.mean_z[layer][hs].to(zh) - zh
            delta = torch.einsum("btkc,kcd->kbtd", dz, W_O[hs])  # (K, B, T, D): change of the attention output
            x = ad.after_attention(layer, cache.resid_pre[layer], a, delta, cache.resid_post.get(layer))  # (K*B, T, D)
            for l2 in range(layer + 1, ad.n_layers):
                args, kwargs = cache.calls[l2]
                x = _call_layer(layers[l2], x, bool(args), _expand(args[1:], K, B), _expand(kwargs, K, B))
            hid = ad.final_norm()(x[:, -1])  # (K*B, D)
            out[:, c:c + K] = self._gap_of(hid, K).T.double()
        return out


def _scan_batch(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor, bad: Tensor,
                heads: HeadList, mode: str, mean_z: dict[int, Tensor] | None, max_rows: int,
                progress: bool) -> tuple[Tensor, Tensor]:
    """Fast path on one left-padded batch: returns (base (B,), ablated (B, K))."""
    sc = LayerSuffixScanner(model, ad, ids, mask, good, bad, mode, mean_z, max_rows)
    out = torch.empty(ids.shape[0], len(heads), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for k, (l, h) in enumerate(heads):
        by_layer.setdefault(l, []).append(k)
    for l in tqdm(sorted(by_layer), desc="scan", disable=not progress, leave=False):
        ks = by_layer[l]
        out[:, ks] = sc.layer(l, [heads[k][1] for k in ks])
    return sc.base, out


@dataclass
class ScanResult:
    """Every head ablated on every prompt. base: (P,), ablated: (P, K), heads: K (layer, head)."""

    base: np.ndarray
    ablated: np.ndarray
    heads: HeadList
    mode: str
    prompt_ids: list[int]

    @property
    def effect(self) -> np.ndarray:
        """Change in dL_actual, (P, K)."""
        return self.ablated - self.base[:, None]


def ablation_scan(model: nn.Module, adapter: ArchitectureAdapter, tset: TokenizedSet, heads: HeadList,
                  mode: str = "zero", mean_z: dict[int, Tensor] | None = None, pad_id: int = 0,
                  batch_size: int = 16, max_rows: int = 256, progress: bool = True,
                  prompt_ids: list[int] | None = None) -> ScanResult:
    """Ablate each head of ``heads`` alone on each prompt of ``tset`` (layer-suffix fast path)."""
    ablation_check(mode, mean_z)
    P = len(tset)
    base = np.empty(P)
    abl = np.empty((P, len(heads)))
    for idx in _batches(P, batch_size):
        ids, mask = pad_left([tset.ids[i] for i in idx], pad_id)
        b, a = _scan_batch(model, adapter, ids, mask, tset.good_first[idx], tset.bad_first[idx], heads, mode,
                           mean_z, max_rows, progress)
        base[idx], abl[idx] = b.numpy(), a.numpy()
    return ScanResult(base, abl, list(heads), mode, list(prompt_ids if prompt_ids is not None else range(P)))


@torch.no_grad()
def scan_full_forward(model: nn.Module, adapter: ArchitectureAdapter, tset: TokenizedSet, heads: HeadList,
                      mode: str = "zero", mean_z: dict[int, Tensor] | None = None, pad_id: int = 0,
                      progress: bool = False) -> ScanResult:
    """Reference scan: one full forward per head with all prompts batched (hook ablation)."""
    ids, mask = pad_left(tset.ids, pad_id)
    g, b = tset.good_first, tset.bad_first
    base = gaps_with_ablation(model, adapter, ids, mask, g, b).numpy()
    abl = np.stack([gaps_with_ablation(model, adapter, ids, mask, g, b, [hd], mode, mean_z).numpy()
                    for hd in tqdm(heads, desc="scan(full)", disable=not progress, leave=False)], 1)
    return ScanResult(base, abl, list(heads), mode, list(range(len(tset))))


def _weights_numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters() if p.dim() >= 2)


def scan_flops(adapter: ArchitectureAdapter, token_counts: list[int], heads: HeadList) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of the work a scan must do, from parameter counts.

    Per token, a layer costs 2 (attention weights + MLP weights) + 4 T H dh (scores and
    mixing over T keys); the MLP half alone 2 (MLP weights). ``fast`` counts the MLP half of the
    ablated layer plus all later layers; ``full`` counts every layer (one full forward per head)."""
    layers = adapter.layers()
    attn_w = [_weights_numel(adapter.attn(l)) for l in range(adapter.n_layers)]
    mlp_w = [sum(_weights_numel(m) for m in adapter.mlp_modules(l)) for l in range(adapter.n_layers)]
    n_tok = float(sum(token_counts))
    quad = float(sum(t * t for t in token_counts)) * 4 * adapter.n_heads * adapter.d_head
    per_layer = [2 * (a + m) * n_tok + quad for a, m in zip(attn_w, mlp_w)]
    fast = sum(2 * mlp_w[l] * n_tok + sum(per_layer[l + 1:]) for l, _ in heads)
    full = len(heads) * sum(per_layer)
    return {"fast_flops": fast, "full_flops": full, "ratio_full_over_fast": full / max(fast, 1.0),
            "tokens": n_tok}
