"""The ``euclid_ddpm`` baseline sampler: Gaussian DDPM in embedding space (:mod:`spindiff.score.euclid`).

x_T ~ N(0, I), ``sampler.steps`` Euler-Maruyama steps of the reverse VP-SDE with the trained noise
predictor (:func:`spindiff.score.euclid.sample_ddpm`, the same integration as the training-time
validation), nearest-embedding rounding of x_0 against the clean points sqrt(d) e_v it was trained on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spindiff.generation.base import StepSampler, _check_steps, register_sampler
from spindiff.generation.session import SampleError, small_op_threads
from spindiff.lm.field import FieldOutput
from spindiff.score.euclid import sample_ddpm, token_points
from spindiff.score.features import context_features


@register_sampler("euclid_ddpm")
class EuclidDDPMSampler(StepSampler):
    """Euclidean Gaussian DDPM in embedding space (see the module docstring)."""

    uses_steps = True
    needs_checkpoint = "required"
    objective = "euclid_ddpm"

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None, **kw: Any) -> None:
        if module is None:
            raise SampleError("sampler.name=euclid_ddpm needs a checkpoint trained with "
                              "`python train.py objective=euclid_ddpm` (then ckpt=PATH or ckpt=auto)")
        super().__init__(session, cfg, field_cfg, module, ckpt_path, **kw)
        self.sde, self.net = module.sde, module.score_net
        self.features = str(module.meta["context_features"])
        self.steps = int(cfg.steps)
        self.kappa = None if cfg.kappa is None else float(cfg.kappa)
        self.embed = token_points(session.token_table)  # (V, d) x_0 of every token, as in training
        self.embed_sq = 0.5 * self.embed.square().sum(-1)  # (V,)
        self._time_cache: dict[float, list[Tensor]] = {}

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

    @torch.no_grad()
    def propose(self, out: FieldOutput, generator: torch.Generator) -> dict[str, Tensor]:
        B, d = out.field.shape
        eps_fn = self.net.bind(context_features(out.field, out.hidden, self.features), self._time_cache)
        with small_op_threads(B):
            x = sample_ddpm(self.sde, eps_fn, B, d, steps=self.steps, dtype=out.field.dtype, device=out.field.device,
                            generator=generator)  # (B, d)
        scores = x @ self.embed.T - self.embed_sq[None, :]  # (B, V) = -|x - e|^2/2 + const
        unit = torch.nn.functional.normalize(x, dim=-1)
        cosines = unit @ self.session.token_table.T  # (B, V): diagnostics in the sphere samplers' units
        if self.kappa is None:
            ids = scores.argmax(-1)
        else:
            ids = torch.multinomial(torch.softmax(self.kappa * cosines, -1), 1, generator=generator).squeeze(-1)
        c = cosines.gather(1, ids[:, None]).squeeze(-1)
        top2 = scores.topk(2, dim=-1)
        other = torch.where(ids == top2.indices[:, 0], top2.indices[:, 1], top2.indices[:, 0])
        return {"token": ids, "cos": c, "margin": c - cosines.gather(1, other[:, None]).squeeze(-1)}
