"""FastNet (to be folded into the score network).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FastNet:
    """``net(x, t, context)`` of a :class:`spindiff.score.net.ResidualScoreNet` with the parts that
    do not change inside one token's integration hoisted out of the step loop.

    Per token, the context's share of the input layer, ``context @ W_ctx^T + b`` (B, H), is
    computed once; per time value (the same grid every token), the time embedding, the time MLP
    and every block's conditioning ``cond_l(temb)`` (1, H) are computed once and cached on the
    sampler (``time_cache``). A step then costs the input projection of the spin, the blocks and
    the output layer. Same arithmetic as ``net.forward`` (the input matmul split in two);
    :func:`FastNet.matches` checks it against the network and callers fall back to the plain
    path when it does not match (a changed network class).
    """

    def __init__(self, net: Any, context: Tensor | None, time_cache: dict[float, list[Tensor]]) -> None:
        self.net = net
        d = net.dim
        W = net.inp.weight  # (H, d + c)
        self.W_x = W[:, :d]  # (H, d)
        bias = net.inp.bias  # (H,)
        self.base = bias if context is None or net.context_dim == 0 else \
            torch.addmm(bias, context.to(W.dtype), W[:, d:].T)  # (B, H)
        self.time_cache = time_cache

    def conds(self, t: Tensor) -> list[Tensor]:
        """[cond_l(time_mlp(time_embed(t)))] for the (shared) time of t (B,), each (1, H)."""
        key = float(t[0])
        hit = self.time_cache.get(key)
        if hit is None:
            net = self.net
            temb = net.time_mlp(net.time_embed(t[:1]).to(self.W_x.dtype))  # (1, H)
            hit = [c(temb) for c in net.cond]
            self.time_cache[key] = hit
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

    @staticmethod
    def matches(net: Any, dtype: torch.dtype = torch.float32) -> bool:
        """True when the hoisted computation equals ``net.forward`` on random inputs."""
        try:
            g = torch.Generator().manual_seed(0)
            dev = next(net.parameters()).device
            x = torch.randn(3, net.dim, generator=g, dtype=dtype).to(dev)
            x = x / x.norm(dim=-1, keepdim=True)
            ctx = torch.randn(3, net.context_dim, generator=g, dtype=dtype).to(dev) if net.context_dim else None
            t = torch.full((3,), 0.37, dtype=dtype, device=dev)
            with torch.no_grad():
                ref = net(x, t, ctx)
                got = FastNet(net, ctx, {})(x, t)
            return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6))
        except Exception:  # a network of another shape: use the plain path
            return False
