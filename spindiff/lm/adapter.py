"""The model adapter: one interface to per-head weights, norms and hook points for every family,
driven by the family's declarative entry (:mod:`spindiff.lm.families`).

Convention (stated once, used everywhere above this module): **row vectors**. For layer l,
query head h, with x (..., D) the attention block's (normalised) input,

    q_h = x @ W_Q[h] + b_Q[h]          W_Q: (H, D, d_head)
    k_h = x @ W_K[h] + b_K[h]          W_K: (H, D, d_head)   (GQA: query head h reads KV head
    v_h = x @ W_V[h] + b_V[h]          W_V: (H, D, d_head)    h // (H / H_kv); expanded here)
    z_h = softmax(s * q_h k_h^T) v_h                            (s = the module's scaling, usually
                                                                1/sqrt(d_head); RoPE, q/k norms,
                                                                soft-capping, sliding windows per
                                                                family: spindiff.lm.attention)
    attn_out = sum_h z_h @ W_O[h] + b_O                        W_O: (H, d_head, D), b_O: (D,)

so the paper's column-convention W_O^(h) in R^{D x d_head} is ``W_O[h].T`` and the paper's
N_proj = W_O^(h) N0 is ``N0 @ W_O[h]`` here. ``z`` (the input of the output projection,
head-major concatenation (..., H*d_head)) is where heads are read and ablated.

GPT-2 (HF ``Conv1D``, weight ``[in, out]``, computes ``x @ W``): the fused ``c_attn.weight``
(D, 3D) splits into Q|K|V column blocks, head h = columns h*d_head:(h+1)*d_head of each;
head h's block of ``c_proj.weight`` (D, D) is ROWS h*d_head:(h+1)*d_head.
Llama (``nn.Linear``, weight ``[out, in]``, computes ``x @ W.T``): W_Q[h] =
``q_proj.weight[h*dh:(h+1)*dh].T``; W_O[h] = ``o_proj.weight[:, h*dh:(h+1)*dh].T``. The fused
layouts of other families are described in :mod:`spindiff.lm.families`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from spindiff.lm.attention import attend
from spindiff.lm.families import Family, family_for
from spindiff.lm.hooks import hooks

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


def _get(root: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), root)


def _heads_in(W: Tensor, n: int, dh: int) -> Tensor:
    """``nn.Linear`` rows (n*dh, D), head-major -> (n, D, dh)."""
    return W.view(n, dh, W.shape[-1]).transpose(1, 2)


class ArchitectureAdapter:
    """Per-family access to weights, norms and hook points, from a :class:`Family` entry."""

    def __init__(self, model: nn.Module, name: str = "model", family: Family | None = None):
        self.model = model
        self.name = name
        c = model.config
        self.spec: Family = family or family_for(c)
        self.family: str = self.spec.name
        self.n_layers: int = c.num_hidden_layers
        self.n_heads: int = c.num_attention_heads
        self.n_kv_heads: int = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = c.hidden_size
        self.d_head: int = getattr(c, "head_dim", None) or self.d_model // self.n_heads
        self.parallel: bool = self.spec.is_parallel(c)
        self._frozen: dict[int, tuple[tuple, LayerWeights]] = {}

    # ----------------------------------------------------------------- structure
    def layers(self) -> Sequence[nn.Module]:
        return _get(self.model, self.spec.layers)

    def attn(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.spec.attn)

    def _block_part(self, layer: int, path: str | None) -> nn.Module | None:
        return None if path is None else _get(self.layers()[layer], path)

    def attn_input_norm(self, layer: int) -> nn.Module:
        """The attention branch's input norm (``nn.Identity`` for families without one: OLMo2)."""
        return self._block_part(layer, self.spec.ln1) or nn.Identity()

    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The MLP branch's input norm (parallel families with one shared norm: the attention's)."""
        if self.spec.ln2 is None and self.parallel:
            return self.attn_input_norm(layer)
        return self._block_part(layer, self.spec.ln2) or nn.Identity()

    def mlp_modules(self, layer: int) -> list[nn.Module]:
        """The MLP's modules in call order (one for most families; fc1, act, fc2 for OPT)."""
        return [_get(self.layers()[layer], p) for p in self.spec.mlp]

    def out_proj(self, layer: int) -> nn.Module:
        return _get(self.attn(layer), self.spec.o_proj)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def embedding(self) -> Tensor:
        """Token embedding W_E (V, D) (without any embedding scale the model applies)."""
        return _get(self.model, self.spec.embed).weight

    def unembedding(self) -> Tensor:
        """Unembedding rows W_U (V, D): logits = final_norm(h) @ W_U.T (+ bias if any)."""
        return self.model.get_output_embeddings().weight

    @property
    def tied(self) -> bool:
        return self.unembedding().data_ptr() == self.embedding().data_ptr()

    def role_module(self, layer: int | None, role: str) -> nn.Module | None:
        """The module behind a hook point role (:mod:`spindiff.lm.hooks`); None where the family
        has none."""
        s = self.spec
        if layer is None:
            return {"ln_final": self.final_norm(), "unembed": self.model.get_output_embeddings()}[role]
        blk = self.layers()[layer]
        part = lambda p: self._block_part(layer, p)  # noqa: E731
        mlp = self.mlp_modules(layer)
        shared = s.ln2 is None and self.parallel  # GPT-J: the MLP reads ln_1's output
        roles = {
            "block": blk, "attn": self.attn(layer), "o_proj": self.out_proj(layer), "ln1": part(s.ln1),
            "ln2": part(s.ln2), "mlp_in": mlp[0], "mlp_out": mlp[-1],
            "post_attn_norm": part(s.post_attn_norm), "post_mlp_norm": part(s.post_mlp_norm),
            "attn_resid_in": part(s.ln1) or self.attn(layer),
            "attn_resid_out": part(s.post_attn_norm) or self.out_proj(layer),
            "mlp_resid_in": None if shared else (part(s.ln2) or mlp[0]),
            "mlp_resid_out": part(s.post_mlp_norm) or mlp[-1],
        }
        if role not in roles:
            raise KeyError(f"unknown module role '{role}'")
        return roles[role]

    # ----------------------------------------------------------------- weights
    def layer_weights(self, layer: int) -> LayerWeights:
        """W_Q, W_K, W_V (KV heads expanded to query heads), W_O and biases of one layer."""
        a = self.attn(layer)
        D, H, Hkv, dh, lay = self.d_model, self.n_heads, self.n_kv_heads, self.d_head, self.spec.qkv
        fused = [_get(a, n) for n in self.spec.qkv_names]
        if lay == "separate":
            lins = fused
            Ws = [lin.weight for lin in lins]
            bs = [lin.bias for lin in lins]
        elif lay == "fused_conv1d":  # Conv1D (D, 3 H dh): column blocks Q | K | V
            W, b = fused[0].weight, fused[0].bias
            Ws = [M.T for M in W.split(H * dh, dim=1)]
            bs = [None] * 3 if b is None else list(b.split(H * dh))
        elif lay == "fused_blocks":  # Linear rows Q (H dh) | K (Hkv dh) | V (Hkv dh)
            sizes = [H * dh, Hkv * dh, Hkv * dh]
            W, b = fused[0].weight, fused[0].bias
            Ws = list(W.split(sizes, dim=0))
            bs = [None] * 3 if b is None else list(b.split(sizes))
        elif lay == "fused_per_head":  # Linear rows (H, 3, dh)
            W, b = fused[0].weight.view(H, 3, dh, D), fused[0].bias
            Ws = [W[:, i].reshape(H * dh, D) for i in range(3)]
            bs = [None] * 3 if b is None else [b.view(H, 3, dh)[:, i].reshape(H * dh) for i in range(3)]
        else:
            raise ValueError(f"family {self.family}: unknown qkv layout '{lay}'")
        n_kv = H if lay in ("fused_conv1d", "fused_per_head") else Hkv
        group = H // n_kv
        expand = lambda M: M if group == 1 else M.repeat_interleave(group, dim=0)  # noqa: E731
        bias = lambda v, n: None if v is None else v.view(n, dh)  # noqa: E731
        o = self.out_proj(layer)
        if self.spec.o_layout == "conv1d":
            W_O = o.weight.reshape(H, dh, D)  # rows h*dh:(h+1)*dh -> head h
        else:
            W_O = o.weight.view(D, H, dh).permute(1, 2, 0)  # (H, dh, D)
        bk, bv = bias(bs[1], n_kv), bias(bs[2], n_kv)
        return LayerWeights(_heads_in(Ws[0], H, dh), expand(_heads_in(Ws[1], n_kv, dh)),
                            expand(_heads_in(Ws[2], n_kv, dh)), W_O, bias(bs[0], H),
                            None if bk is None else expand(bk), None if bv is None else expand(bv), o.bias)

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

    # ----------------------------------------------------------------- attention details
    def scaling(self, layer: int) -> float:
        return float(getattr(self.attn(layer), "scaling", self.d_head ** -0.5))

    def sliding_window(self, layer: int) -> int | None:
        """Keys j with t - j < window are visible from query t (None: no window)."""
        src = self.attn(layer) if self.spec.sliding_window == "module" else self.model.config
        w = getattr(src, "sliding_window", None)
        return int(w) if w else None

    def softcap(self, layer: int) -> float | None:
        v = getattr(self.attn(layer), self.spec.softcap, None) if self.spec.softcap else None
        return float(v) if v else None

    def final_softcap(self) -> float | None:
        v = getattr(self.model.config, self.spec.final_softcap, None) if self.spec.final_softcap else None
        return float(v) if v else None

    def uses_rope(self, layer: int) -> bool:
        if self.spec.rotary is None:
            return False
        return bool(getattr(self.attn(layer), self.spec.use_rope_attr, 1)) if self.spec.use_rope_attr else True

    def apply_positional(self, q: Tensor, k: Tensor, positions: Tensor, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """Positional transform of queries/keys (B, H, T, dh) inside attention: RoPE (rotate-half or
        interleaved, on the first ``r`` dims for partial rotary) from the model's own rotary
        module; identity for families with absolute positions and for layers without RoPE."""
        if not self.uses_rope(0 if layer is None else layer):
            return q, k
        pos = positions if positions.dim() == 2 else positions[None]
        a, b = _get(self.model, self.spec.rotary)(q, pos)
        cos, sin = (a, b) if self.spec.rotary_order == "cos_sin" else (b, a)
        if self.spec.rotary_style == "interleaved":
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
            turn = lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)  # noqa: E731
        else:
            turn = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1)  # noqa: E731
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        r = cos.shape[-1]

        def rot(x: Tensor) -> Tensor:
            xr = x[..., :r] * cos + turn(x[..., :r]) * sin
            return xr if r == x.shape[-1] else torch.cat((xr, x[..., r:]), -1)
        return rot(q), rot(k)

    def qk_norms(self, layer: int) -> tuple[nn.Module | None, nn.Module | None]:
        a = self.attn(layer)
        return (None if self.spec.q_norm is None else _get(a, self.spec.q_norm),
                None if self.spec.k_norm is None else _get(a, self.spec.k_norm))

    # ----------------------------------------------------------------- hooks (spindiff.lm.hooks)
    @contextlib.contextmanager
    def capture_z(self, layers: Sequence[int] | None = None, last_only: bool = False) -> Iterator[dict[int, Tensor]]:
        """Record z, the input of each layer's output projection, as (B, T, H, dh)
        (or (B, H, dh) with ``last_only``). Yields {layer: z} filled during the forward pass."""
        store: dict[int, Tensor] = {}

        def grab(z: Tensor, point: Any) -> None:
            store[point.layer] = (z[:, -1] if last_only else z).detach()
        with hooks(self, {f"blocks.{l}.attn.z": grab for l in (range(self.n_layers) if layers is None else layers)}):
            yield store

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

        def edit(z: Tensor, point: Any) -> Tensor:
            idx = torch.tensor(by_layer[point.layer])
            z = z.clone()
            z[..., idx, :] = 0 if mode == "zero" else mean_z[point.layer][idx].to(z)
            return z
        with hooks(self, {f"blocks.{l}.attn.z": edit for l in by_layer}):
            yield

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
        """Per-head contributions to the output projection: z (..., H, dh) -> (..., H, D)."""
        W_O = self.layer_weights(layer).W_O
        return torch.einsum("...hk,hkd->...hd", z.to(W_O.dtype), W_O)

    # ----------------------------------------------------------------- norms, linearised
    def norm_scale(self, norm: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
        """Frozen linearisation of ``norm`` at its input x (..., D): it maps a small addition v to
        ``(v - mean(v) if center else v) * scale`` with the statistics (std or RMS) frozen at x."""
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        w = norm.weight + self.spec.norm_offset if self.spec.norm_offset else norm.weight
        if isinstance(norm, nn.LayerNorm):
            var = x.var(-1, keepdim=True, unbiased=False)
            return w / torch.sqrt(var + eps), True
        rms = x.pow(2).mean(-1, keepdim=True)
        return w / torch.sqrt(rms + eps), False

    def final_norm_scale(self, resid: Tensor) -> tuple[Tensor, bool]:
        """:meth:`norm_scale` of the final norm at the residual ``resid`` (..., D) (standard
        direct-logit-attribution practice)."""
        return self.norm_scale(self.final_norm(), resid)

    def post_attn_scale(self, layer: int, attn_out: Tensor) -> Tensor | None:
        """Sandwich-norm families (Gemma 2, OLMo2): the frozen scale (..., D) of the post-attention
        RMS norm at the attention output ``attn_out``, so that per-head outputs times it sum to
        what the branch adds to the residual; None for the others."""
        norm = self._block_part(layer, self.spec.post_attn_norm)
        return None if norm is None else self.norm_scale(norm, attn_out)[0]

    # ----------------------------------------------------------------- layer pieces
    def mlp_branch(self, layer: int, resid: Tensor) -> Tensor:
        """What layer ``layer``'s MLP branch adds to a residual ``resid`` (B, T, D) that it reads."""
        x = self.mlp_input_norm(layer)(resid)
        for m in self.mlp_modules(layer):
            x = m(x)
        x = x[0] if isinstance(x, tuple) else x
        norm = self._block_part(layer, self.spec.post_mlp_norm)
        return x if norm is None else norm(x)

    def after_attention(self, layer: int, resid_pre: Tensor, attn_out: Tensor, delta: Tensor,
                        resid_post: Tensor | None = None) -> Tensor:
        """Layer ``layer``'s output (K*B, T, D), variant-major, when its output projection's output
        ``attn_out`` (B, T, D) changes by ``delta`` (K, B, T, D) (K variants at once). Parallel-residual families
        need the layer's unmodified output ``resid_post`` (their MLP does not read the attention)."""
        norm = self._block_part(layer, self.spec.post_attn_norm)
        if self.parallel:
            change = delta if norm is None else norm(attn_out[None] + delta) - norm(attn_out)[None]
            return (resid_post[None] + change).flatten(0, 1)
        if norm is None:
            mid = (resid_pre + attn_out)[None] + delta  # the order of the original sums, bit for bit
        else:
            mid = resid_pre[None] + norm(attn_out[None] + delta)
        mid = mid.flatten(0, 1)
        return mid + self.mlp_branch(layer, mid)


def get_adapter(model: nn.Module, name: str | None = None) -> ArchitectureAdapter:
    """The adapter for ``model`` (its family by ``config.model_type``; an unsupported one raises
    :class:`spindiff.lm.families.UnsupportedFamily` naming it)."""
    fam = family_for(model.config)
    return ArchitectureAdapter(model, name or getattr(model.config, "_name_or_path", "") or fam.name, fam)


def manual_attention(adapter: ArchitectureAdapter, x: Tensor, layer: int, use_bias: bool = True,
                     positional: bool = True) -> tuple[Tensor, Tensor]:
    """Recompute one layer's causal attention on one unpadded batch (:func:`spindiff.lm.attention.attend`).

    Args:
        x: the attention module's input (B, T, D) (after the layer's input norm).
        use_bias / positional: drop biases / RoPE (the paper protocol uses neither).
    Returns:
        alpha (B, H, T, T) attention weights and z (B, T, H, dh).
    """
    B, T = x.shape[:2]
    mask = torch.ones(B, T, dtype=torch.long, device=x.device)
    pos = torch.arange(T, device=x.device)[None].expand(B, T)
    p = attend(adapter, layer, x, x, x, mask, pos, use_bias=use_bias, positional=positional, frozen=False)
    return p.alpha, p.z
