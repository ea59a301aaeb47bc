"""One layer's attention recomputed from the adapter's weights: re-exported from the core
(:mod:`spindiff.lm.attention`, the one recomputation every family goes through).

Used by the query/key/value split of the head paths (:func:`analysis.paths.qkv_split`) and by
the attention-saturation correction of attribution patching (:mod:`analysis.attribution`).
"""
from __future__ import annotations

from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.attention import AttnParts, allowed_keys, attend, attention_from_resid, project, transpose_positional

__all__ = ["AttnParts", "allowed_keys", "attend", "attention_from_resid", "project", "transpose_positional",
           "check_supported"]


def check_supported(ad: ArchitectureAdapter) -> None:
    """The recomputation covers every family entry; GPT-2's optional inverse-layer-index scaling and
    reordered upcast attention are not expressed and are refused."""
    c = ad.model.config
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
        raise NotImplementedError("attention recomputation: GPT-2's scale_attn_by_inverse_layer_idx / "
                                  "reorder_and_upcast_attn are not supported")
