"""Residual score network on S^{d-1} (a pure ``nn.Module``; training lives elsewhere).

Total score used by the reverse SDE (:func:`make_score_fn`):

    score(S, t) = eta_train m(t) P_S N  +  score_scale(t) * net(S, t, context),

where eta_train m(t) P_S N is the analytic field term and the network learns the residual around
it (eta_train = 0: the pure learned-score baseline). At t = 0 the term is the Riemannian score of
vMF(N, eta_train) (N the unit field); m(t) = E[S_t . S_0] carries it through the noising: the
forward kernel is zonal, so by Funk-Hecke it multiplies the degree-1 harmonic N . S of
p_0 ~ 1 + eta_train N . S by m(t), and the score of p_t is eta_train m(t) P_S N + O(eta_train^2).
The term therefore vanishes at t = T, where p_T is uniform (a fixed eta_train P_S N would force
the network to cancel it there; tests/test_score_losses.py checks the m(t) law by Monte Carlo).
``score_scale(t)`` comes from the SDE (``sqrt(kappa(t) m(t))`` for the vMF noising family), so the
network's output has unit scale per tangent direction at every t. The output is projected onto
the tangent space at S (``tangent=True``); with ``tangent=False`` the same class is the
Euclidean noise predictor of the ``euclid_ddpm`` baseline (:mod:`spindiff.score.euclid`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from spindiff.sphere.geometry import SphereGeometry

__all__ = ["SinusoidalTimeEmbedding", "ResidualBlock", "ResidualScoreNet", "BoundScoreNet", "make_score_fn"]


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style embedding of t (B,) -> (B, dim): [sin(w_k c t), cos(w_k c t)].

    w_k = max_period^(-k/(dim/2)); c = ``scale`` (1000: t in [0, 1] spans the DDPM step range).
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("time embedding dim must be even")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:
        arg = self.scale * t[:, None].to(self.freqs.dtype) * self.freqs[None, :]  # (B, dim/2)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)  # (B, dim)


class ResidualBlock(nn.Module):
    """h + W2 SiLU(W1 LN(h) + cond): pre-norm MLP block with additive conditioning. (B, H)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        return h + self.lin2(self.act(self.lin1(self.norm(h)) + cond))  # (B, H)


class ResidualScoreNet(nn.Module):
    """MLP with residual blocks: (S_t (B, d), t (B,), context (B, c)) -> (B, d).

    Args:
        dim: d.
        context_dim: c (0: no context input).
        hidden: width H.
        layers: number of residual blocks.
        time_dim: sinusoidal time embedding size.
        eta_train: analytic field strength of the residual decomposition (0: pure learned score).
        tangent: project the output onto T_S (sphere); False for the Euclidean baseline.
    """

    def __init__(self, dim: int, context_dim: int = 0, hidden: int = 512, layers: int = 4,
                 time_dim: int = 64, eta_train: float = 0.0, tangent: bool = True) -> None:
        super().__init__()
        if int(hidden) < 1:
            raise ValueError(f"ResidualScoreNet: hidden={hidden}; the MLP needs a width >= 1 (e.g. 512)")
        self.dim, self.context_dim = int(dim), int(context_dim)
        self.eta_train = float(eta_train)
        self.tangent = bool(tangent)
        self.geometry = SphereGeometry()
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim + context_dim, hidden)
        self.blocks = nn.ModuleList([ResidualBlock(hidden) for _ in range(layers)])
        self.cond = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    @classmethod
    def from_config(cls, cfg: Any, dim: int, context_dim: int = 0, tangent: bool = True) -> "ResidualScoreNet":
        """From a ``ScoreNetConfig`` (hidden, layers, time_dim, eta_train); c from the caller."""
        return cls(dim, context_dim, hidden=cfg.hidden, layers=cfg.layers, time_dim=cfg.time_dim,
                   eta_train=cfg.eta_train, tangent=tangent)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (for self-describing checkpoints)."""
        return {"dim": self.dim, "context_dim": self.context_dim, "hidden": self.inp.out_features,
                "layers": len(self.blocks), "time_dim": self.time_embed.freqs.numel() * 2,
                "eta_train": self.eta_train, "tangent": self.tangent}

    def forward(self, spin: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """Raw network output, tangent at ``spin`` when ``tangent``. (B, d)."""
        if t.dim() == 0:
            t = t.expand(spin.shape[0])
        if self.context_dim and context is None:
            raise ValueError(f"this network expects a context of size {self.context_dim}")
        x = spin if self.context_dim == 0 else torch.cat([spin, context.to(spin.dtype)], dim=-1)  # (B, d+c)
        temb = self.time_mlp(self.time_embed(t).to(spin.dtype))  # (B, H)
        h = self.inp(x)  # (B, H)
        for block, cond in zip(self.blocks, self.cond):
            h = block(h, cond(temb))  # (B, H)
        out = self.out(self.out_norm(h))  # (B, d)
        return self.geometry.proju(spin, out) if self.tangent else out

    def bind(self, context: Tensor | None, time_cache: dict[float, list[Tensor]] | None = None) -> BoundScoreNet:
        """(x, t) -> self(x, t, context) for repeated calls with one context (see :class:`BoundScoreNet`)."""
        return BoundScoreNet(self, context, {} if time_cache is None else time_cache)

    def total_score(self, spin: Tensor, t: Tensor, sde: Any, field: Tensor | None = None,
                    context: Tensor | None = None) -> Tensor:
        """eta_train m(t) P_S N + sde.score_scale(t) * net(S, t, context). (B, d), tangent at S.

        ``sde`` provides ``score_scale(t)`` (B,) (:class:`spindiff.sphere.sde.BrownianSphereSDE`).
        """
        if t.dim() == 0:
            t = t.expand(spin.shape[0])
        out = sde.score_scale(t).to(spin.dtype)[:, None] * self(spin, t, context)  # (B, d)
        if field is not None and self.eta_train != 0.0:
            out = out + self.analytic_term(spin, t, sde, field)
        return out

    def analytic_term(self, spin: Tensor, t: Tensor, sde: Any, field: Tensor) -> Tensor:
        """eta_train m(t) P_S N with m(t) = sde.mean_cosine(t). spin (B, d), t (B,), field (B|1, d)."""
        m = sde.mean_cosine(t).to(spin.dtype)  # (B,)
        return (self.eta_train * m)[:, None] * self.geometry.proju(spin, field.expand_as(spin))


class BoundScoreNet:
    """``net(x, t, context)`` with one context bound and the parts that do not change within one
    token's integration hoisted out of the step loop (:meth:`ResidualScoreNet.bind`).

    The context's share of the input layer, ``context @ W_ctx^T + b`` (B, H), is computed once;
    per time value the time embedding, the time MLP and every block's conditioning (1, H) are
    computed once and cached in ``time_cache`` (shared across tokens: the grid is the same). A step
    then costs the input projection of x, the blocks and the output layer. Same arithmetic as
    ``net.forward`` with the input matmul split in two (tests/test_score_losses.py).
    """

    def __init__(self, net: "ResidualScoreNet", context: Tensor | None, time_cache: dict[float, list[Tensor]]) -> None:
        self.net = net
        W = net.inp.weight  # (H, d + c)
        self.W_x = W[:, :net.dim]  # (H, d)
        self.base = net.inp.bias if context is None or net.context_dim == 0 else \
            torch.addmm(net.inp.bias, context.to(W.dtype), W[:, net.dim:].T)  # (B, H)
        self.time_cache = time_cache

    def conds(self, t: Tensor) -> list[Tensor]:
        """[cond_l(time_mlp(time_embed(t)))] for the (shared) time of t (B,), each (1, H)."""
        key = float(t[0])
        hit = self.time_cache.get(key)
        if hit is None:
            net = self.net
            temb = net.time_mlp(net.time_embed(t[:1]).to(self.W_x.dtype))  # (1, H)
            hit = self.time_cache[key] = [c(temb) for c in net.cond]
        return hit

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """net(x, t, context). x: (B, d), t: (B,) with one shared value -> (B, d)."""
        net = self.net
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = torch.addmm(self.base, x, self.W_x.T)  # (B, H) = inp([x, context])
        for block, c in zip(net.blocks, self.conds(t)):
            h = block(h, c)  # (B, H)
        out = net.out(net.out_norm(h))  # (B, d)
        return net.geometry.proju(x, out) if net.tangent else out


def make_score_fn(net: ResidualScoreNet, sde: Any, field: Tensor | None = None,
                  context: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The total score (S (B, d), t (B,)) -> (B, d) with field N (B, d) and context (B, c) bound.

    Pass the result to ``sde.reverse(score_fn, ...)`` or to :func:`spindiff.score.losses.dsm_loss`.
    """

    def score_fn(spin: Tensor, t: Tensor) -> Tensor:
        return net.total_score(spin, t, sde, field=field, context=context)

    return score_fn
