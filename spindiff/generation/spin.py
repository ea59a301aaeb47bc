"""The ``spin`` sampler: reverse LLG SDE on S^{d-1} per token.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from spindiff.generation.base import StepSampler, _check_steps, _fmt, register_sampler
from spindiff.generation.decoding import decode_spins
from spindiff.generation.fastnet import FastNet
from spindiff.generation.session import SampleError, small_op_threads


@register_sampler("spin")
class SpinSampler(StepSampler):
    """Reverse LLG SDE on S^{d-1} per token (see the module docstring).

    With a checkpoint the score is the learned total score of the network (field and context
    features as in training); without one (``ckpt=none``) the only drift is the LLG field term
    eta P_S N + (eta/lam) Prec(S, N): the *field-only* sampler.
    """

    uses_steps = True
    needs_checkpoint = "optional"
    objective = "spin"

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None) -> None:
        super().__init__(session, cfg, field_cfg, module, ckpt_path)
        from spindiff.sphere.integrators import get_sampler as get_step
        from spindiff.sphere.sde import BrownianSphereSDE

        if module is not None:
            self.sde = module.sde
            self.net = module.score_net
            self.features = str(module.hparams.meta["context_features"])
        else:
            self.sde = BrownianSphereSDE.from_config(sde_cfg, session.dim)
            self.net, self.features = None, "none"
        self.fast = self.net is not None and FastNet.matches(self.net, session.dtype)
        self._time_cache: dict[float, list[Tensor]] = {}
        self._scale_cache: dict[float, Tensor] = {}
        try:
            self.step_fn = get_step(cfg.method)
        except ValueError as e:
            raise SampleError(f"sampler.method: {e}") from None
        self.eta, self.lam, self.steps = float(cfg.eta), float(cfg.lam), int(cfg.steps)
        self.kappa = None if cfg.kappa is None else float(cfg.kappa)
        tau_end = float(self.sde.T - self.sde.t_eps)
        self.grid = [tau_end * k / self.steps for k in range(self.steps + 1)]  # reverse time tau
        self.sqrt_h = [math.sqrt(b - a) for a, b in zip(self.grid[:-1], self.grid[1:])]

    @classmethod
    def validate(cls, cfg: Any) -> None:
        _check_steps(cfg)
        if cfg.eta < 0 or not math.isfinite(cfg.eta):
            raise SampleError(f"sampler.eta={cfg.eta}: the field strength must be finite and >= 0 "
                              "(0 = learned score only); e.g. sampler.eta=1")
        if not cfg.lam > 0:
            raise SampleError(f"sampler.lam={cfg.lam}: the Gilbert damping must be > 0 "
                              "(sampler.lam=inf switches precession off); e.g. sampler.lam=1")
        if cfg.kappa is not None and not cfg.kappa > 0:
            raise SampleError(f"sampler.kappa={cfg.kappa}: must be > 0 (or null for nearest-token decoding)")

    @classmethod
    def check_module(cls, cfg: Any, module: Any) -> None:
        if module is None and float(cfg.eta) == 0:
            raise SampleError("sampler.eta=0 with no checkpoint leaves no drift at all (the spin stays uniform "
                              "noise); use sampler.eta>0 for the field-only sampler or give a trained checkpoint "
                              "(ckpt=PATH)")

    @property
    def field_only(self) -> bool:
        return self.net is None

    @property
    def label(self) -> str:
        kind = "field-only" if self.field_only else "learned"
        dec = "" if self.kappa is None else f",kappa={_fmt(self.kappa)}"
        return f"spin[{kind}](eta={_fmt(self.eta)},lam={_fmt(self.lam)},steps={self.steps}{dec})"

    @property
    def sde_steps(self) -> int:
        return self.steps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eta": self.eta, "lam": self.lam, "steps": self.steps,
                "method": self.cfg.method, "kappa": self.kappa, "context_features": self.features}

    def integrate(self, field: Tensor, hidden: Tensor, generator: torch.Generator) -> Tensor:
        """S_0 for contexts with field N (B, d), hidden h (B, d): uniform S_T, ``steps`` geodesic steps. (B, d)."""
        score_fn = None
        if self.net is not None:
            from spindiff.score.features import context_features
            from spindiff.score.net import make_score_fn

            context = context_features(field, hidden, self.features)
            score_fn = self._fast_score_fn(field, context) if self.fast else \
                make_score_fn(self.net, self.sde, field=field, context=context)
        rev = self.sde.reverse(score_fn, field=field, eta=self.eta, lam=self.lam)
        B, d = field.shape
        with small_op_threads(B):
            spin = rev.prior_sampling(B, dtype=field.dtype, device=field.device, generator=generator)  # (B, d)
            for k in range(self.steps):
                dw = torch.randn(B, d, dtype=field.dtype, device=field.device, generator=generator) * self.sqrt_h[k]
                spin = self.step_fn(rev, self.grid[k], self.grid[k + 1], spin, dw)  # (B, d) geodesic step
        return spin

    def _fast_score_fn(self, field: Tensor, context: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        """The network's total score eta_train m(t) P_S N + score_scale(t) net(S, t, context)
        (:meth:`ResidualScoreNet.total_score`) through :class:`FastNet`, score_scale cached per t."""
        fast, net, sde = FastNet(self.net, context, self._time_cache), self.net, self.sde

        def score_fn(spin: Tensor, t: Tensor) -> Tensor:
            key = float(t[0])
            scale = self._scale_cache.get(key)
            if scale is None:
                scale = self._scale_cache[key] = sde.score_scale(t[:1]).to(spin.dtype)  # (1,)
            out = scale[:, None] * fast(spin, t)  # (B, d)
            if net.eta_train != 0.0:
                out = out + net.analytic_term(spin, t, sde, field)
            return out

        return score_fn

    @torch.no_grad()
    def propose_from(self, field, hidden, generator):
        spin = self.integrate(field, hidden, generator)
        return decode_spins(spin, self.session.token_table, self.kappa, generator, coarse=self.session.coarse_table)
