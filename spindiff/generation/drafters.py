"""Drafters of the ``block`` sampler: who proposes the K tokens the LM then verifies.

A drafter sees what the last verification forward computed at the last accepted position (final
hidden state h, context field N) and the pending token z after it (an exact draw from the LM),
and returns K drafts with the distributions they were drawn from:

    drafts (B, K) int64,  r (B, K, V)  with  drafts[:, k] ~ r[:, k]  given drafts[:, :k]

Verification (:mod:`spindiff.generation.verify`) makes the output exactly the LM's for any
drafter; a better drafter only raises acceptance. :data:`DRAFTERS` names the drafters that
``sampler.drafter`` can pick (built from a checkpoint's draft heads); :class:`FixedDrafter` is a
context-free drafter for tests (a deliberately bad one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from spindiff.generation.verify import target_probs

__all__ = ["DraftContext", "Drafter", "HeadsDrafter", "FixedDrafter", "DRAFTERS", "register_drafter"]


@dataclass
class DraftContext:
    """What a drafter may condition on, per row: hidden (B, d) and field (B, d) | None of the last
    accepted position, token (B,) the pending token z that follows it."""

    hidden: Tensor
    field: Tensor | None
    token: Tensor


class Drafter(Protocol):
    needs_field: bool
    name: str

    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(drafts (B, k) int64, r (B, k, V)): drafts[:, j] ~ r[:, j] given drafts[:, :j]."""


def _draw(r: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of r (..., V) -> (...) int64."""
    flat = r.reshape(-1, r.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(r.shape[:-1])


class HeadsDrafter:
    """Drafter (a): the K independent draft heads of a checkpoint (:class:`spindiff.score.draft.DraftHeads`),
    each offset drawn from softmax(logits_k / T) (T = the sampler's temperature; T = 0: argmax)."""

    name = "heads"

    def __init__(self, heads: torch.nn.Module, table: Tensor, temperature: float = 1.0) -> None:
        self.heads, self.table, self.temperature = heads, table, float(temperature)
        self.needs_field = "field" in heads.features.split("+")

    def logits(self, ctx: DraftContext, k: int) -> Tensor:
        return self.heads(ctx.field, ctx.hidden, self.table[ctx.token], self.table, k)  # (B, k, V)

    @torch.no_grad()
    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        r = target_probs(self.logits(ctx, k).to(ctx.hidden.dtype), self.temperature)  # (B, k, V)
        return _draw(r, generator), r


class FixedDrafter:
    """A context-free drafter: every offset drawn from the same distribution r (V,), or from
    ``r_fn(j)`` (V,) for offset j. For tests (e.g. a deliberately bad drafter)."""

    name = "fixed"
    needs_field = False

    def __init__(self, r: Tensor | None = None, r_fn: Callable[[int], Tensor] | None = None) -> None:
        self.r, self.r_fn = r, r_fn

    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        B = ctx.token.shape[0]
        rows = [(self.r if self.r_fn is None else self.r_fn(j)) for j in range(k)]
        r = torch.stack(rows).to(ctx.hidden.dtype)[None].expand(B, k, -1).contiguous()  # (B, k, V)
        return _draw(r, generator), r


DrafterFactory = Callable[..., Drafter]
DRAFTERS: dict[str, DrafterFactory] = {
    "heads": lambda heads, table, temperature, **kw: HeadsDrafter(heads, table, temperature),
}


def register_drafter(name: str, factory: DrafterFactory) -> None:
    """Make a drafter available as ``sampler.drafter=<name>``: ``factory(heads, table, temperature,
    **kw) -> Drafter`` (heads: the checkpoint's :class:`~spindiff.score.draft.DraftHeads`)."""
    DRAFTERS[name] = factory
