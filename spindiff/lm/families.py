"""Declarative model families: everything the adapter, the hooks and the attention recomputation
know about an architecture is one :class:`Family` entry in :data:`FAMILIES`.

Module paths are dotted attribute paths (``layers`` and ``embed`` from the ``*ForCausalLM``
model, ``attn``/``ln1``/``ln2``/``mlp``/post norms from a decoder layer, ``o_proj``/``q_norm``/
``k_norm`` and the QKV names from the attention module). Weight layouts (``qkv``):

- ``separate``: three ``nn.Linear`` ([out, in]) named by ``qkv_names``; q rows are head-major
  ``(H, dh)``, k/v rows ``(H_kv, dh)``.
- ``fused_conv1d`` (GPT-2): one ``Conv1D`` ([in, out]) with column blocks Q | K | V, each ``(H, dh)``.
- ``fused_blocks`` (Phi-3): one ``nn.Linear`` with row blocks Q (H dh) | K (H_kv dh) | V (H_kv dh).
- ``fused_per_head`` (GPT-NeoX): one ``nn.Linear`` with rows ``(H, 3, dh)``: each head's q, k, v.

``o_layout`` is ``linear`` (``o_proj.weight`` (D, H dh): head h = columns) or ``conv1d`` (rows).

Flags: ``parallel`` (attention and MLP read the same residual; a config attribute name or True),
``norm`` (``layer`` | ``rms``) with ``norm_offset`` (Gemma applies ``1 + w``), ``qk_norm``
(``head``: per-head q/k norms (Qwen3), ``full``: one norm over all heads' q / k (OLMo2)),
``rotary`` (path of the model's rotary-embedding module, whose ``(x, position_ids)`` call gives the
cos/sin tables; ``rotary_style`` ``half`` (rotate-half, partial rotary = the tables' width) or
``interleaved`` (GPT-J, rotate-every-two); ``rotary_order`` the order the module returns them in),
``sliding_window`` (``module``: the attention module's ``sliding_window`` attribute per layer,
``config``: ``config.sliding_window`` for every layer), ``use_rope_attr`` (SmolLM3's layers without
RoPE: the attention module's ``use_rope``), ``softcap`` (attention-score soft-capping: the attention
module's attribute), ``final_softcap`` (logit soft-capping: a config attribute). The attention
scale is always the module's own ``scaling`` (Gemma 2's ``query_pre_attn_scalar``). The embedding
scale (Gemma's sqrt(D)) stays inside the model's embedding module.

Adding a family: one entry here (``refuse`` for configurations the entry cannot express) and one
line in ``tests/test_families.py``'s list; README "Model families" lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Family", "FAMILIES", "UnsupportedFamily", "family_for"]


class UnsupportedFamily(ValueError):
    """A model whose architecture no family entry describes (never mapped to another family)."""


@dataclass(frozen=True)
class Family:
    """One architecture, declaratively (module docstring)."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    attn: str = "self_attn"
    o_proj: str = "o_proj"
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    mlp: tuple[str, ...] = ("mlp",)  # one module, or the modules an MLP spread over the layer runs in order
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    qkv: str = "separate"
    qkv_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o_layout: str = "linear"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm: str = "head"
    parallel: bool | str = False
    norm: str = "rms"
    norm_offset: float = 0.0
    rotary: str | None = None
    rotary_style: str = "half"
    rotary_order: str = "cos_sin"
    sliding_window: str = "module"
    use_rope_attr: str | None = None
    softcap: str | None = None
    final_softcap: str | None = None
    refuse: Callable[[Any], str | None] | None = None  # config -> reason the entry cannot express it

    def is_parallel(self, config: Any) -> bool:
        return bool(getattr(config, self.parallel, False)) if isinstance(self.parallel, str) else self.parallel


_LLAMA_PATHS = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                    rotary="model.rotary_emb")


def _opt_refuse(c: Any) -> str | None:
    if not getattr(c, "do_layer_norm_before", True):
        return "post-LayerNorm OPT (do_layer_norm_before=False, e.g. opt-350m)"
    if getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size:
        return "OPT with an embedding projection (word_embed_proj_dim != hidden_size)"
    return None


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("gpt2", ("gpt2",), layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
           attn="attn", o_proj="c_proj", ln1="ln_1", ln2="ln_2", qkv="fused_conv1d", qkv_names=("c_attn",),
           o_layout="conv1d", norm="layer"),
    Family("llama", ("llama",), **_LLAMA_PATHS),
    Family("smollm3", ("smollm3",), **_LLAMA_PATHS, use_rope_attr="use_rope"),
    Family("mistral", ("mistral",), **_LLAMA_PATHS, sliding_window="config"),
    Family("mixtral", ("mixtral",), **_LLAMA_PATHS, sliding_window="config"),
    Family("qwen2", ("qwen2",), **_LLAMA_PATHS),
    Family("qwen3", ("qwen3",), **_LLAMA_PATHS, q_norm="q_norm", k_norm="k_norm"),
    Family("gemma", ("gemma",), **_LLAMA_PATHS, norm_offset=1.0),
    Family("gemma2", ("gemma2",), **_LLAMA_PATHS, ln2="pre_feedforward_layernorm",
           post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
           norm_offset=1.0, softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping"),
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
           final_norm="gpt_neox.final_layer_norm", rotary="gpt_neox.rotary_emb", attn="attention", o_proj="dense",
           qkv="fused_per_head", qkv_names=("query_key_value",), parallel="use_parallel_residual", norm="layer"),
    Family("gptj", ("gptj",), layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
           rotary="transformer.rotary_emb", attn="attn", o_proj="out_proj", ln1="ln_1", ln2=None, parallel=True,
           norm="layer", rotary_style="interleaved", rotary_order="sin_cos"),
    Family("phi3", ("phi3",), **_LLAMA_PATHS, qkv="fused_blocks", qkv_names=("qkv_proj",), sliding_window="config"),
    Family("opt", ("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
           final_norm="model.decoder.final_layer_norm", ln1="self_attn_layer_norm", ln2="final_layer_norm",
           o_proj="out_proj", mlp=("fc1", "activation_fn", "fc2"), norm="layer", refuse=_opt_refuse),
    Family("olmo2", ("olmo2",), **_LLAMA_PATHS, ln1=None, ln2=None, post_attn_norm="post_attention_layernorm",
           post_mlp_norm="post_feedforward_layernorm", q_norm="q_norm", k_norm="k_norm", qk_norm="full"),
]}

_BY_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def family_for(config: Any) -> Family:
    """The family entry of a transformers config (by ``model_type``).

    Raises:
        UnsupportedFamily: no entry has this model_type, or the entry refuses this configuration.
    """
    mt = getattr(config, "model_type", "") or "?"
    fam = _BY_TYPE.get(mt)
    if fam is None:
        raise UnsupportedFamily(
            f"model_type '{mt}' has no model family; supported: {', '.join(sorted(_BY_TYPE))} "
            "(README 'Model families' says how to add one)")
    why = fam.refuse(config) if fam.refuse else None
    if why:
        raise UnsupportedFamily(f"model_type '{mt}': the '{fam.name}' family cannot express {why}")
    return fam
