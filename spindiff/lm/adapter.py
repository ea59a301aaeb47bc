"""Architecture adapters: one interface to per-head weights and hooks for every family.

Convention (stated once, used everywhere above this module): **row vectors**. For layer l,
query head h, with x (..., D) the attention block's (normalised) input,

    q_h = x @ W_Q[h] + b_Q[h]          W_Q: (H, D, d_head)
    k_h = x @ W_K[h] + b_K[h]          W_K: (H, D, d_head)   (GQA: query head h reads KV head
    v_h = x @ W_V[h] + b_V[h]          W_V: (H, D, d_head)    h // (H / H_kv); expanded here)
    z_h = softmax(q_h k_h^T / sqrt(d_head)) v_h               (with RoPE on q,k for Llama)
    attn_out = sum_h z_h @ W_O[h] + b_O                        W_O: (H, d_head, D), b_O: (D,)

so the paper's column-convention W_O^(h) in R^{D x d_head} is ``W_O[h].T`` and the paper's
N_proj = W_O^(h) N0 is ``N0 @ W_O[h]`` here. ``z`` (the input of the output projection,
head-major concatenation (..., H*d_head)) is where heads are read and ablated.

GPT-2 (HF ``Conv1D``, weight ``[in, out]``, computes ``x @ W``): the fused ``c_attn.weight``
(D, 3D) splits into Q|K|V column blocks, head h = columns h*d_head:(h+1)*d_head of each;
head h's block of ``c_proj.weight`` (D, D) is ROWS h*d_head:(h+1)*d_head.
Llama (``nn.Linear``, weight ``[out, in]``, computes ``x @ W.T``): W_Q[h] =
``q_proj.weight[h*dh:(h+1)*dh].T``; W_O[h] = ``o_proj.weight[:, h*dh:(h+1)*dh].T``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

HeadList = list[tuple[int, int]]


class HeadSpecError(ValueError):
    """A head spec that does not parse or lies outside the model."""


@dataclass
class LayerWeights:
    """Per-head weights of one attention layer in the row-vector convention above."""

    W_Q: Tensor  # (H, D, dh)
    W_K: Tensor  # (H, D, dh)  expanded to query heads
    W_V: Tensor  # (H, D, dh)  expanded to query heads
    W_O: Tensor  # (H, dh, D)
    b_Q: Tensor | None  # (H, dh)
    b_K: Tensor | None  # (H, dh)
    b_V: Tensor | None  # (H, dh)
    b_O: Tensor | None  # (D,)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Position ids for a left- or right-padded batch: cumsum(mask) - 1, clipped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_HEAD_RE = re.compile(r"^L(\d+)(?:H(\d+))?$", re.IGNORECASE)


def parse_heads(spec: str | Sequence[str], n_layers: int, n_heads: int, model_name: str = "model") -> HeadList:
    """Parse a head spec into ``[(layer, head), ...]`` (order kept, duplicates dropped).

    Accepted: ``all``; ``L3H5``; ``L11`` (a whole layer); comma-separated lists
    (``L3H5,L0H2,L11``). Raises :class:`HeadSpecError` naming the model's shape otherwise.
    """
    shape = (f"{model_name} has {n_layers} layers x {n_heads} heads "
             f"(valid: L0H0 .. L{n_layers - 1}H{n_heads - 1}, L0 .. L{n_layers - 1}, all)")
    items = spec if not isinstance(spec, str) else [s for s in spec.replace(" ", "").split(",") if s]
    if not items:
        raise HeadSpecError(f"empty head spec; {shape}")
    out: HeadList = []
    for item in items:
        if item.lower() == "all":
            out.extend((l, h) for l in range(n_layers) for h in range(n_heads))
            continue
        m = _HEAD_RE.match(item)
        if not m:
            raise HeadSpecError(f"cannot parse head spec '{item}'; write e.g. L3H5, L11 or all. {shape}")
        layer = int(m.group(1))
        if layer >= n_layers:
            raise HeadSpecError(f"head spec '{item}' is outside the model: {shape}")
        if m.group(2) is None:
            out.extend((layer, h) for h in range(n_heads))
        else:
            head = int(m.group(2))
            if head >= n_heads:
                raise HeadSpecError(f"head spec '{item}' is outside the model: {shape}")
            out.append((layer, head))
    seen: set[tuple[int, int]] = set()
    return [x for x in out if not (x in seen or seen.add(x))]


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


class ArchitectureAdapter(ABC):
    """Per-family access to weights, norms and the per-head hook point."""

    family: str = ""

    def __init__(self, model: nn.Module, name: str = "model"):
        self.model = model
        self.name = name
        c = model.config
        self.n_layers: int = c.num_hidden_layers
        self.n_heads: int = c.num_attention_heads
        self.n_kv_heads: int = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = c.hidden_size
        self.d_head: int = getattr(c, "head_dim", None) or self.d_model // self.n_heads
        self._mean_z: dict[int, Tensor] = {}
        self._frozen: dict[int, tuple[tuple, LayerWeights]] = {}

    # ----------------------------------------------------------------- structure
    @abstractmethod
    def layers(self) -> Sequence[nn.Module]: ...

    @abstractmethod
    def attn(self, layer: int) -> nn.Module: ...

    @abstractmethod
    def attn_input_norm(self, layer: int) -> nn.Module: ...

    @abstractmethod
    def out_proj(self, layer: int) -> nn.Module: ...

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @abstractmethod
    def embedding(self) -> Tensor:
        """Token embedding W_E (V, D)."""

    def unembedding(self) -> Tensor:
        """Unembedding rows W_U (V, D): logits = final_norm(h) @ W_U.T (+ bias if any)."""
        return self.model.get_output_embeddings().weight

    @property
    def tied(self) -> bool:
        return self.unembedding().data_ptr() == self.embedding().data_ptr()

    @abstractmethod
    def layer_weights(self, layer: int) -> LayerWeights: ...

    def weights_key(self, layer: int) -> tuple:
        """Changes whenever a parameter of the layer's attention module is replaced or modified in
        place (identity, storage, autograd version counter, dtype, device): the cache key of
        everything derived from that layer's weights."""
        return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in self.attn(layer).parameters())

    def frozen_weights(self, layer: int) -> LayerWeights:
        """:meth:`layer_weights` detached and contiguous, for repeated no-grad use (gap tables,
        fields). Cached per layer and rebuilt when any parameter of the layer's attention module is
        replaced or modified in place (:meth:`weights_key`)."""
        key = self.weights_key(layer)
        hit = self._frozen.get(layer)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            w = self.layer_weights(layer)
            w = LayerWeights(*(None if t is None else t.detach().contiguous()
                               for t in (getattr(w, f.name) for f in dataclasses.fields(w))))
        self._frozen[layer] = (key, w)
        return w

    def kv_head(self, head: int) -> int:
        """KV head read by query head ``head`` (GQA: h // (H / H_kv))."""
        return head // (self.n_heads // self.n_kv_heads)

    def parse_heads(self, spec: str | Sequence[str]) -> HeadList:
        return parse_heads(spec, self.n_layers, self.n_heads, self.name)

    def apply_positional(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Positional transform of queries/keys (B, H, T, dh) inside attention (RoPE for
        Llama; identity for GPT-2, whose positions are added to the residual stream)."""
        return q, k

    # ----------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def capture_z(self, layers: Sequence[int] | None = None, last_only: bool = False) -> Iterator[dict[int, Tensor]]:
        """Record z, the input of each layer's output projection, as (B, T, H, dh)
        (or (B, H, dh) with ``last_only``). Yields the dict filled during the forward pass."""
        store: dict[int, Tensor] = {}
        handles = []
        for l in (range(self.n_layers) if layers is None else layers):
            def hook(mod, args, l=l):
                z = args[0]
                z = z.view(*z.shape[:-1], self.n_heads, self.d_head)
                store[l] = (z[:, -1] if last_only else z).detach()
            handles.append(self.out_proj(l).register_forward_pre_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def ablate(self, heads: HeadList, mode: str = "zero", mean_z: dict[int, Tensor] | None = None) -> Iterator[None]:
        """Ablate heads at every position by editing z before the output projection.

        mode ``zero`` sets z_h = 0; ``mean`` sets z_h to ``mean_z[layer][h]`` (dh,), a mean
        over a reference prompt set (see :meth:`mean_z`)."""
        if mode not in ("zero", "mean"):
            raise ValueError(f"ablation mode '{mode}': use zero or mean")
        if mode == "mean" and mean_z is None:
            raise ValueError("mean ablation needs mean_z (adapter.mean_z(input_ids, attention_mask))")
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append(h)
        handles = []
        for l, hs in by_layer.items():
            idx = torch.tensor(hs)

            def hook(mod, args, l=l, idx=idx):
                z = args[0]
                zz = z.view(*z.shape[:-1], self.n_heads, self.d_head).clone()
                if mode == "zero":
                    zz[..., idx, :] = 0
                else:
                    zz[..., idx, :] = mean_z[l][idx].to(zz)
                return (zz.view_as(z),) + tuple(args[1:])
            handles.append(self.out_proj(l).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def mean_z(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[int, Tensor]:
        """Mean of z over all real tokens of a reference batch: {layer: (H, dh)}."""
        mask = torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # left-padded rows need explicit positions, or their real tokens sit at shifted positions
        pos = last_positions(mask).to(input_ids.device)
        with self.capture_z() as store:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos)
        mask = mask.to(next(iter(store.values())).device)
        return {l: z[mask].mean(0) for l, z in store.items()}

    def head_outputs(self, z: Tensor, layer: int) -> Tensor:
        """Per-head contributions to the residual stream: z (..., H, dh) -> (..., H, D)."""
        W_O = self.layer_weights(layer).W_O
        return torch.einsum("...hk,hkd->...hd", z.to(W_O.dtype), W_O)

    # ----------------------------------------------------------------- final norm
    def final_norm_scale(self, resid: Tensor) -> tuple[Tensor, bool]:
        """Frozen linearisation of the final norm at residual ``resid`` (..., D).

        Returns (scale (..., D), center): the norm maps a small addition v to
        ``(v - mean(v) if center else v) * scale``, with the statistics (std or RMS) frozen at
        ``resid`` (standard direct-logit-attribution practice)."""
        norm = self.final_norm()
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        w = norm.weight
        if isinstance(norm, nn.LayerNorm):
            var = resid.var(-1, keepdim=True, unbiased=False)
            return w / torch.sqrt(var + eps), True
        rms = resid.pow(2).mean(-1, keepdim=True)
        return w / torch.sqrt(rms + eps), False


class GPT2Adapter(ArchitectureAdapter):
    family = "gpt2"

    def layers(self):
        return self.model.transformer.h

    def attn(self, layer):
        return self.layers()[layer].attn

    def attn_input_norm(self, layer):
        return self.layers()[layer].ln_1

    def out_proj(self, layer):
        return self.attn(layer).c_proj

    def final_norm(self):
        return self.model.transformer.ln_f

    def embedding(self):
        return self.model.transformer.wte.weight

    def layer_weights(self, layer: int) -> LayerWeights:
        a = self.attn(layer)
        D, H, dh = self.d_model, self.n_heads, self.d_head
        W = a.c_attn.weight  # (D, 3D), Conv1D: x @ W
        b = a.c_attn.bias  # (3D,)
        Wq, Wk, Wv = W.split(D, dim=1)
        bq, bk, bv = b.split(D)
        per = lambda M: M.reshape(D, H, dh).permute(1, 0, 2)  # (H, D, dh)
        W_O = a.c_proj.weight.reshape(H, dh, D)  # rows h*dh:(h+1)*dh -> head h
        return LayerWeights(per(Wq), per(Wk), per(Wv), W_O, bq.view(H, dh), bk.view(H, dh),
                            bv.view(H, dh), a.c_proj.bias)


class LlamaAdapter(ArchitectureAdapter):
    family = "llama"

    def layers(self):
        return self.model.model.layers

    def attn(self, layer):
        return self.layers()[layer].self_attn

    def attn_input_norm(self, layer):
        return self.layers()[layer].input_layernorm

    def out_proj(self, layer):
        return self.attn(layer).o_proj

    def final_norm(self):
        return self.model.model.norm

    def embedding(self):
        return self.model.model.embed_tokens.weight

    def layer_weights(self, layer: int) -> LayerWeights:
        a = self.attn(layer)
        D, H, Hkv, dh = self.d_model, self.n_heads, self.n_kv_heads, self.d_head
        group = H // Hkv
        per = lambda lin, n: lin.weight.view(n, dh, D).transpose(1, 2)  # (n, D, dh)
        expand = lambda M: M.repeat_interleave(group, dim=0)  # KV head -> query heads
        bias = lambda lin, n: None if lin.bias is None else lin.bias.view(n, dh)
        bk, bv = bias(a.k_proj, Hkv), bias(a.v_proj, Hkv)
        W_O = a.o_proj.weight.view(D, H, dh).permute(1, 2, 0)  # (H, dh, D)
        return LayerWeights(per(a.q_proj, H), expand(per(a.k_proj, Hkv)), expand(per(a.v_proj, Hkv)),
                            W_O, bias(a.q_proj, H), None if bk is None else expand(bk),
                            None if bv is None else expand(bv), a.o_proj.bias)

    def apply_positional(self, q, k, positions):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        pos = positions if positions.dim() == 2 else positions[None]
        cos, sin = self.model.model.rotary_emb(q, pos)
        return apply_rotary_pos_emb(q, k, cos, sin)


ADAPTERS: dict[str, type[ArchitectureAdapter]] = {"gpt2": GPT2Adapter, "llama": LlamaAdapter}


def get_adapter(model: nn.Module, name: str | None = None) -> ArchitectureAdapter:
    """The adapter for ``model`` (by ``config.model_type``)."""
    from spindiff.lm.models import family_of

    fam = family_of(model)
    return ADAPTERS[fam](model, name or getattr(model.config, "_name_or_path", "") or fam)


def manual_attention(adapter: ArchitectureAdapter, x: Tensor, layer: int, use_bias: bool = True,
                     positional: bool = True) -> tuple[Tensor, Tensor]:
    """Recompute one layer's attention from the adapter's weights (causal).

    Args:
        x: the attention block's input (B, T, D), after the layer's input norm.
        use_bias / positional: drop biases / RoPE (the paper protocol uses neither).
    Returns:
        alpha (B, H, T, T) attention weights and z (B, T, H, dh).
    """
    w = adapter.layer_weights(layer)
    q = torch.einsum("btd,hdk->bhtk", x, w.W_Q)
    k = torch.einsum("btd,hdk->bhtk", x, w.W_K)
    v = torch.einsum("btd,hdk->bhtk", x, w.W_V)
    if use_bias:
        for t, b in ((q, w.b_Q), (k, w.b_K), (v, w.b_V)):
            if b is not None:
                t += b[None, :, None, :]
    if positional:
        q, k = adapter.apply_positional(q, k, torch.arange(x.shape[1], device=x.device)[None])
    T = x.shape[1]
    scores = q @ k.transpose(-1, -2) / adapter.d_head**0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    alpha = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    z = (alpha @ v).transpose(1, 2)  # (B, T, H, dh)
    return alpha, z
