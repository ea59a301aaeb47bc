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

from spindiff.generation.verify import sample_categorical, target_probs

__all__ = ["DraftContext", "Drafter", "DraftVocab", "HeadsDrafter", "PottsDrafter", "SpinDrafter", "FixedDrafter", "DRAFTERS", "register_drafter"]


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
    return sample_categorical(r, generator)


class DraftVocab:
    """The vocabulary a drafter reads out and draws from: the heads' ``n`` most frequent tokens
    (:meth:`spindiff.score.draft.DraftHeads.draft_vocab`, ``sampler.draft_vocab``) or all V.

    Reading out N of V tokens divides the drafter's one table product by V / N (at N = 8192 of
    49152, 6x); r is zero outside the set, which leaves verification exact (a rejection draws from
    max(0, p - r), i.e. p itself outside the set) and costs acceptance only the LM's mass outside it."""

    def __init__(self, heads: torch.nn.Module, table: Tensor, n: int = 0) -> None:
        fn = getattr(heads, "draft_vocab", None)
        self.cols = fn(int(n)) if fn is not None else None
        self.V = table.shape[0]
        self.size = self.V if self.cols is None else int(self.cols.numel())
        pick = (lambda x: x) if self.cols is None else (lambda x: x[self.cols.to(x.device)])
        self.table = pick(table).contiguous()
        self.scale = pick(heads.scale.detach()).to(table.dtype)
        self.bias = pick(heads.bias.detach()).to(table.dtype)

    def logits(self, u: Tensor) -> Tensor:
        """Read-out logits of u (..., d) over the set: (..., N), one product."""
        return ((u.reshape(-1, u.shape[-1]).to(self.table.dtype) @ self.table.T) * self.scale + self.bias).view(
            *u.shape[:-1], -1)

    def tokens(self, idx: Tensor) -> Tensor:
        """Token ids of set positions ``idx``."""
        return idx if self.cols is None else self.cols.to(idx.device)[idx]

    def full(self, r: Tensor) -> Tensor:
        """r over the set (..., N) -> over the vocabulary (..., V), zero outside the set."""
        if self.cols is None:
            return r
        out = r.new_zeros(*r.shape[:-1], self.V)
        return out.index_copy_(out.dim() - 1, self.cols.to(r.device), r)


class HeadsDrafter:
    """Drafter (a): the K independent draft heads of a checkpoint (:class:`spindiff.score.draft.DraftHeads`),
    each offset drawn from softmax(logits_k / T) (T = the sampler's temperature; T = 0: argmax) over
    the drafter's vocabulary (:class:`DraftVocab`: ``vocab`` most frequent tokens, 0 = all)."""

    name = "heads"

    def __init__(self, heads: torch.nn.Module, table: Tensor, temperature: float = 1.0, vocab: int = 0) -> None:
        self.heads, self.table, self.temperature = heads, table, float(temperature)
        self.needs_field = "field" in heads.features.split("+")
        self.vocab = DraftVocab(heads, table, vocab)

    @torch.no_grad()
    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        u = self.heads.directions(ctx.field, ctx.hidden, self.table[ctx.token], k)  # (B, k, d)
        r = target_probs(self.vocab.logits(u).to(ctx.hidden.dtype), self.temperature)  # (B, k, N)
        return self.vocab.tokens(_draw(r, generator)), self.vocab.full(r)


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


class PottsDrafter:
    """Drafter (b): a Potts block over the K positions, drawn position by position from its
    conditionals r_k(v | x_<k) ∝ exp(h_k(v) + sum_{j<k} J_kj(v, x_j)), with the fields h_k the draft
    heads' logits (one table product for all K) and the coupling term added on each position's
    top-``candidates`` tokens of h_k (the rest keep h_k; r_k is exactly what is drawn from, so
    verification stays exact). Couplings (``coupling``):

    * ``lowrank``: the checkpoint's learned J_kj(v, w) = s_v e_v . P_k Q_j^T e_w (``score_net.rank`` > 0,
      trained with teacher forcing together with the heads);
    * ``qk``: derived from the LM's first-layer query-key interaction, J(v, w) = x_v W_eff x_w^T with
      W_eff = mean over heads of W_Q^h W_K^h^T / sqrt(d_head) (the paper's H = -S_j W_eff S_i at the
      embedding level; x_v = the normed embedding of v, as the layer sees it, positions left out):
      the attention logit of a query v on a key w, heads weighted equally.
    """

    def __init__(self, heads: torch.nn.Module, table: Tensor, temperature: float, coupling: str,
                 session: object = None, candidates: int = 64, vocab: int = 0) -> None:
        self.heads, self.table, self.temperature = heads, table, float(temperature)
        self.vocab = DraftVocab(heads, table, vocab)
        self.coupling, self.candidates = coupling, int(candidates)
        self.needs_field = "field" in heads.features.split("+")
        self.name = f"potts_{coupling}"
        if coupling == "qk":
            ad = session.adapter  # type: ignore[attr-defined]
            w = ad.frozen_weights(0)
            dh = w.W_Q.shape[-1]
            self.W_eff = (torch.einsum("hdc,hec->de", w.W_Q, w.W_K) / (w.W_Q.shape[0] * dh ** 0.5)).to(table.dtype)
            g = getattr(ad.attn_input_norm(0), "weight", None)
            self.x_scale = (table.shape[1] ** 0.5) * (g.detach().to(table.dtype) if g is not None else 1.0)

    def _field(self, prev: Tensor, j: int) -> tuple[Tensor, Tensor | None]:
        """(c (B, d), per-token weights or None): the coupling term of position j is w_v (e_v . c)."""
        if self.coupling == "lowrank":
            return self.heads.coupling_field(prev[:, :j + 1])[:, j], self.heads.scale
        xs = self.table[prev[:, :j]] * self.x_scale  # (B, j, d) the keys x_w of the earlier drafts
        return (xs.sum(1) @ self.W_eff.T) * self.x_scale, None  # x_v W_eff x_w^T = e_v . (x_scale * W_eff x_w)

    @torch.no_grad()
    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        h = self.heads
        u = h.directions(ctx.field, ctx.hidden, self.table[ctx.token], k)  # (B, k, d)
        base = self.vocab.logits(u).to(ctx.hidden.dtype)  # (B, k, N): one table product over the draft vocabulary
        drafts, rs = [], []
        prev = torch.zeros(u.shape[0], k, dtype=torch.long, device=u.device)
        for j in range(k):
            logit = base[:, j]
            if j > 0:
                if self.coupling == "lowrank":
                    vecs = self.table[prev]  # (B, k, d); only the first j enter c_j
                    c, wv = self._field(vecs, j)
                else:
                    c, wv = self._field(prev, j)
                top = logit.topk(min(self.candidates, logit.shape[-1]), -1).indices  # (B, M) set positions
                tok = self.vocab.tokens(top)
                corr = torch.einsum("bmd,bd->bm", self.table[tok], c.to(self.table.dtype)).to(logit.dtype)
                if wv is not None:
                    corr = corr * wv[tok].to(logit.dtype)
                logit = logit.scatter_add(1, top, corr)
            r = target_probs(logit, self.temperature)
            d = self.vocab.tokens(sample_categorical(r, generator))
            prev[:, j] = d
            drafts.append(d)
            rs.append(r)
        return torch.stack(drafts, 1), self.vocab.full(torch.stack(rs, 1))


class SpinDrafter:
    """Drafter (c), the spin form of (b): K unit spins on (S^{d-1})^K relaxed JOINTLY by the posterior
    reverse SDE (:mod:`spindiff.score.reverse`, read-only), spin k under the discrete prior of head k's
    top-``candidates`` logits, with the learned coupling energy E = sum_{j<k} s S_k . P_k Q_j^T S_j in
    the drift (beta(t) s P_S grad E, s the mean token scale: the coupling's logit units); every spin
    stops at the first grid time where kappa >= ``exit_kappa`` and its draft is drawn from its own
    posterior there, r_k = pi_t(. | S_k) (the path-conditional distribution the verifier needs).
    Without learned couplings (``score_net.rank`` = 0) the spins relax independently."""

    name = "spin"

    def __init__(self, heads: torch.nn.Module, table: Tensor, temperature: float, steps: int = 8,
                 exit_kappa: float = 10.0, candidates: int = 64) -> None:
        from spindiff.config_schema import SDEConfig
        from spindiff.sphere.grids import reverse_grid
        from spindiff.sphere.sde import BrownianSphereSDE

        self.heads, self.table, self.temperature = heads, table, float(temperature)
        self.needs_field = "field" in heads.features.split("+")
        self.candidates = int(candidates)
        self.sde = BrownianSphereSDE.from_config(SDEConfig(), table.shape[1])
        self.grid = reverse_grid(self.sde, int(steps), "uniform", end_kappa=float(exit_kappa))
        self._coef: dict[float, tuple[float, float]] = {}
        self.s_mean = float(heads.scale.detach().mean())

    def _coupling_drift(self, B: int, k: int) -> Callable[[Tensor, float], Tensor] | None:
        if getattr(self.heads, "rank", 0) <= 0 or k < 2:
            return None
        from spindiff.score.reverse import coefficients

        P, Q = (x.to(self.table.dtype) for x in self.heads.coupling_factors(k))  # (k, d, r)

        def drift(spin: Tensor, t: float) -> Tensor:
            S = spin.view(B, k, -1)
            a = torch.einsum("bjd,jdr->bjr", S, Q)  # S_j Q_j
            b = torch.einsum("bkd,kdr->bkr", S, P)  # S_k P_k
            fwd = torch.einsum("bkr,kdr->bkd", torch.cumsum(a, 1) - a, P)  # sum_{j<k} P_k Q_j^T S_j
            back = torch.flip(torch.cumsum(torch.flip(b, [1]), 1), [1]) - b  # sum_{l>k} S_l P_l
            grad = (fwd + torch.einsum("bkr,kdr->bkd", back, Q)).reshape(spin.shape)
            beta = coefficients(self.sde, t, self._coef)[1]
            return beta * self.s_mean * self.sde.geometry.proju(spin, grad)

        return drift

    @torch.no_grad()
    def draft(self, ctx: DraftContext, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        from spindiff.score.posterior import CandidatePosterior
        from spindiff.score.reverse import PosteriorReverseSDE, coefficients, integrate_posterior

        h = self.heads
        logits = h(ctx.field, ctx.hidden, self.table[ctx.token], self.table, k)  # (B, k, V)
        B, _, V = logits.shape
        if self.temperature > 0:
            logits = logits / self.temperature
        post = CandidatePosterior.from_logits(logits.reshape(B * k, V).to(self.table.dtype), self.table,
                                              self.candidates)
        rev = PosteriorReverseSDE(self.sde, post, 1, 0.0, self._coupling_drift(B, k), cache=self._coef)
        spin = integrate_posterior(rev, self.grid, "geodesic_midpoint", generator)  # (B k, 1, d)
        kappa = coefficients(self.sde, self.sde.T - self.grid[-1], self._coef)[0]
        w = post.weights(spin[:, 0], kappa)  # (B k, M): r_k over the candidates, 0 elsewhere
        if self.temperature <= 0:
            w = torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
        r = torch.zeros(B * k, V, dtype=ctx.hidden.dtype, device=w.device).scatter_(1, post.ids, w.to(ctx.hidden.dtype))
        d = sample_categorical(r, generator)
        return d.view(B, k), r.view(B, k, V)


DrafterFactory = Callable[..., Drafter]
DRAFTERS: dict[str, DrafterFactory] = {
    "heads": lambda heads, table, temperature, vocab=0, **kw: HeadsDrafter(heads, table, temperature, vocab),
    "potts_qk": lambda heads, table, temperature, session=None, vocab=0, **kw: PottsDrafter(
        heads, table, temperature, "qk", session, vocab=vocab),
    "potts_lowrank": lambda heads, table, temperature, vocab=0, **kw: PottsDrafter(heads, table, temperature, "lowrank",
                                                                                   vocab=vocab),
    "spin": lambda heads, table, temperature, **kw: SpinDrafter(heads, table, temperature),
}


def register_drafter(name: str, factory: DrafterFactory) -> None:
    """Make a drafter available as ``sampler.drafter=<name>``: ``factory(heads, table, temperature,
    **kw) -> Drafter`` (heads: the checkpoint's :class:`~spindiff.score.draft.DraftHeads`)."""
    DRAFTERS[name] = factory
