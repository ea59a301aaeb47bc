"""The score network's input contract: which LM features form the context vector, and how.

The sampler and the training data build the context with the same :func:`context_features`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONTEXT_FEATURES = ("none", "field", "hidden", "field+hidden")


def context_dim(features: str, dim: int) -> int:
    """Size c of the context vector for ``score_net.features`` (see :func:`context_features`)."""
    if features not in CONTEXT_FEATURES:
        raise ValueError(f"score_net.features={features!r}: use one of {', '.join(CONTEXT_FEATURES)}")
    return {"none": 0, "field": dim, "hidden": dim, "field+hidden": 2 * dim}[features]


def context_features(field: Tensor, hidden: Tensor | None, features: str, raw_hidden: bool = False) -> Tensor | None:
    """The score network's context input from the provider's features.

    field: (B, D) context field N (as stored: unit when ``field.normalize``);
    hidden: (B, D) final hidden state h (the final norm's output, the LM head's input), used as
    its direction h/|h| (keeps every input of the tangent network O(1)) or, with ``raw_hidden``,
    as it is (the posterior model, whose linear read-out can then reproduce the LM's logits W_U h).
    Returns (B, c) with c = :func:`context_dim`, or ``None`` for ``none``. The sampler must build
    its context with this same function.
    """
    context_dim(features, field.shape[-1])  # validates the name
    parts: list[Tensor] = []
    if "field" in features.split("+"):
        parts.append(field)
    if "hidden" in features.split("+"):
        if hidden is None:
            raise ValueError(f"score_net.features={features} needs the LM's hidden state (field.protocol=in_situ)")
        parts.append(hidden if raw_hidden else F.normalize(hidden, dim=-1))
    return torch.cat(parts, dim=-1) if parts else None
