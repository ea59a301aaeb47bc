"""The ``euclid_ddpm`` baseline sampler: Gaussian DDPM in embedding space.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from spindiff.generation.base import StepSampler, _check_steps, register_sampler
from spindiff.generation.fastnet import FastNet
from spindiff.generation.session import GenerationSession, SampleError, small_op_threads


@register_sampler("euclid_ddpm")
class EuclidDDPMSampler(StepSampler):
    """Euclidean Gaussian DDPM in embedding space (:mod:`spindiff.score.euclid`): x_T ~ N(0, I),
    ``steps`` Euler-Maruyama steps of the reverse VP-SDE with the trained noise predictor,
    nearest-embedding rounding (Euclidean distance to the training embedding table)."""

    uses_steps = True
    needs_checkpoint = "required"
    objective = "euclid_ddpm"

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None) -> None:
        if module is None:
            raise SampleError("sampler.name=euclid_ddpm needs a checkpoint trained with "
                              "`python train.py objective=euclid_ddpm` (then ckpt=PATH or ckpt=auto)")
        super().__init__(session, cfg, field_cfg, module, ckpt_path)
        self.sde = module.sde
        self.net = module.score_net
        self.features = str(module.hparams.meta["context_features"])
        self.steps = int(cfg.steps)
        self.kappa = None if cfg.kappa is None else float(cfg.kappa)
        self.embed = _euclid_table(session, module)  # (V, d) x_0 of every token, as in training
        self.embed_sq = 0.5 * self.embed.square().sum(-1)  # (V,)
        self.fast = FastNet.matches(self.net, session.dtype)
        self._time_cache: dict[float, list[Tensor]] = {}
        tau_end = float(self.sde.T - self.sde.t_eps)
        self.grid = [tau_end * k / self.steps for k in range(self.steps + 1)]

    @classmethod
    def validate(cls, cfg: Any) -> None:
        _check_steps(cfg)
        if cfg.kappa is not None and not cfg.kappa > 0:
            raise SampleError(f"sampler.kappa={cfg.kappa}: must be > 0 (or null for nearest-embedding rounding)")

    @property
    def label(self) -> str:
        return f"euclid_ddpm(steps={self.steps})"

    @property
    def sde_steps(self) -> int:
        return self.steps

    def integrate(self, field: Tensor, hidden: Tensor, generator: torch.Generator) -> Tensor:
        """x_0 (B, d) by Ito Euler-Maruyama on the reverse VP-SDE (tau = T - t)."""
        from spindiff.score.features import context_features
        from spindiff.score.euclid import make_eps_fn

        context = context_features(field, hidden, self.features)
        eps_fn = FastNet(self.net, context, self._time_cache) if self.fast else make_eps_fn(self.net, context)
        rev = self.sde.reverse(eps_fn)
        B, d = field.shape
        x = torch.randn(B, d, dtype=field.dtype, device=field.device, generator=generator)
        with small_op_threads(B):
            for a, b in zip(self.grid[:-1], self.grid[1:]):
                tau = torch.full((B,), a, dtype=x.dtype, device=x.device)
                dw = torch.randn(B, d, dtype=x.dtype, device=x.device, generator=generator) * math.sqrt(b - a)
                x = x + rev.f(tau, x) * (b - a) + rev.g(tau, x) * dw  # (B, d)
        return x

    @torch.no_grad()
    def propose_from(self, field, hidden, generator):
        x = self.integrate(field, hidden, generator)  # (B, d)
        scores = x @ self.embed.T - self.embed_sq[None, :]  # (B, V) = -|x - e|^2/2 + const
        if self.kappa is None:
            ids = scores.argmax(-1)
        else:
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ids = torch.multinomial(torch.softmax(self.kappa * unit @ self.session.token_table.T, -1), 1,
                                    generator=generator).squeeze(-1)
        # diagnostics in the same units as the sphere samplers: cosine to the unit token rows
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosines = unit @ self.session.token_table.T  # (B, V)
        c = cosines.gather(1, ids[:, None]).squeeze(-1)
        top2 = scores.topk(2, dim=-1)
        other = torch.where(ids == top2.indices[:, 0], top2.indices[:, 1], top2.indices[:, 0])
        margin = c - cosines.gather(1, other[:, None]).squeeze(-1)
        return ids, c, margin


def _euclid_table(session: GenerationSession, module: Any) -> Tensor:
    """The clean points x_0 of every token, as the Euclidean DDPM was trained on them: the
    objective's map from unit spins to x_0 (``sqrt(d) S_0`` for
    :class:`spindiff.training.module.EuclidDDPMObjective`), applied to the unit token rows. (V, d)."""
    to_x0 = getattr(module.objective, "_x0", None)
    if to_x0 is None:  # fall back to the documented convention
        return session.token_table * math.sqrt(session.dim)
    return to_x0({"spin": session.token_table}).detach()
