"""The ``spin`` sampler: per token, a unit spin relaxes from uniform noise under the reverse SDE on
S^{d-1} whose score is built on the posterior over the vocabulary.

Per token (one LM forward through the KV cache gives the field N, the hidden state h and the LM's
logits of the last position):

1. logits over the vocabulary: the score model's prior + learned correction
   (:class:`spindiff.score.model.PosteriorScoreModel`; ``prior=lm`` is the LM itself: the oracle),
   plus the steering bias when ``steer`` is on; candidates = the top ``sampler.top_k`` tokens
   (the prior mass left out is reported per token as ``dropped_mass``; ``top_k=0``: all V); with
   ``sampler.tail=direct`` (default) each token is, with probability ``dropped_mass``, drawn directly
   from the renormalised rest of the vocabulary instead (no SDE): p = (1 - m) p_top + m p_tail, so the
   cut costs no exactness (:meth:`spindiff.score.posterior.CandidatePosterior.mix_tail`);
2. the reverse SDE over tau = T - t on the grid ``sampler.grid`` (:mod:`spindiff.sphere.grids`),
   integrated by ``sampler.method`` (:data:`spindiff.sphere.integrators.INTEGRATORS`; Heun takes
   an Euler last step, as EDM does: its corrector would evaluate the drift at t_eps, where kappa
   is ~1e6), with drift

       beta(t) kappa(t) P_S sum_v pi_t(v | S) e_v                   exact score of the prior
     + gamma * w_t(S)                                                marginal-preserving precession
     + eta P_S N + (eta/lam) Prec(S, N)                              the paper's LLG field drift

   where w_t = sum_v pi_t(v|S) A_v S has div(p_t w_t) = 0 (it rotates about the posterior's
   effective field without changing p_t: ``sampler.precession`` = gamma), while the paper's LLG
   drift (``sampler.eta``, ``sampler.lam``) changes the distribution sampled (kept as a knob);
3. decoding (``sampler.decode``): ``posterior`` draws v ~ pi_{t_end}(v | S) at the end of the path
   (exact decoding; at t_eps the posterior is one-hot for all practical purposes, its mean
   probability of the drawn token is logged as ``post_p``); ``nearest`` takes the token of largest
   cosine over the whole vocabulary (or a draw from softmax(kappa cos) with ``sampler.kappa``).
   ``sampler.exit_kappa`` ends the grid early, where kappa(t) = exit_kappa (all ``sampler.steps``
   are spent before it), and draws from the posterior there: exact whenever the spin's law there
   is p_t, and the steps past it (the collapse onto the chosen token) are saved.

Without a checkpoint (``ckpt=none``) the logits are ``sampler.prior`` alone: ``lm`` (oracle),
``field`` (eta_train N . e_v with ``sampler.eta_train``) or ``none`` (uniform over the vocabulary).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from spindiff.generation.base import StepSampler, _check_steps, _fmt, _select, register_sampler
from spindiff.generation.decoding import decode_spins
from spindiff.generation.session import SampleError, small_op_threads
from spindiff.lm.field import FieldOutput
from spindiff.score.model import PRIORS, PosteriorScoreModel
from spindiff.score.posterior import CandidatePosterior
from spindiff.sphere.grids import GRIDS, reverse_grid
from spindiff.sphere.integrators import INTEGRATORS, get_integrator
from spindiff.sphere.sde import BrownianSphereSDE, llg_field_drift
from spindiff.score.reverse import PosteriorReverseSDE, coefficients, integrate_posterior

DECODERS = ("posterior", "nearest")
TAILS = ("direct", "drop")


@register_sampler("spin")
class SpinSampler(StepSampler):
    """Posterior-score reverse SDE on S^{d-1} per token (see the module docstring)."""

    uses_steps = True
    needs_checkpoint = "optional"
    objective = "posterior"
    steering_modes = ("prior", "dynamics", "both")
    brownian = "increments"  # the per-token loop's torchsde Brownian object (spindiff.score.reverse.BROWNIAN)

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None, **kw: Any) -> None:
        super().__init__(session, cfg, field_cfg, module, ckpt_path, **kw)
        if module is not None:
            self.sde, self.model = module.sde, module.score_net
            if str(cfg.prior) not in ("auto", self.model.prior):
                raise SampleError(f"sampler.prior={cfg.prior} but the checkpoint was trained with prior="
                                  f"{self.model.prior}; use sampler.prior=auto (or ckpt=none for a prior alone)")
        else:
            self.sde = BrownianSphereSDE.from_config(sde_cfg, session.dim)
            prior = "field" if str(cfg.prior) == "auto" else str(cfg.prior)
            self.model = PosteriorScoreModel(session.dim, session.token_table.shape[0], features="none", prior=prior,
                                             eta_train=float(cfg.eta_train), learned=False)
        self.model = self.model.to(device=session.device, dtype=session.dtype).eval()
        self.eta, self.lam, self.steps = float(cfg.eta), float(cfg.lam), int(cfg.steps)
        self.precession = float(cfg.precession)
        self.top_k = int(cfg.top_k) or None
        self.tail = str(cfg.tail)
        self.decode, self.kappa = str(cfg.decode), None if cfg.kappa is None else float(cfg.kappa)
        get_integrator(str(cfg.method))  # validated
        self.exit_kappa = None if cfg.exit_kappa is None else float(cfg.exit_kappa)
        try:  # tau_0 = 0 .. tau_n = T - t_end: every step before the exit (t_end = t_eps without one)
            self.grid = reverse_grid(self.sde, self.steps, str(cfg.grid), end_kappa=self.exit_kappa)
        except ValueError as e:
            raise SampleError(f"sampler.exit_kappa={cfg.exit_kappa}: {e}; use a larger exit_kappa (or null)") from None
        self._coef: dict[float, tuple[float, float]] = {}
        self.exit = len(self.grid) - 1

    # ------------------------------------------------------------------ description
    @classmethod
    def validate(cls, cfg: Any) -> None:
        _check_steps(cfg)
        if cfg.eta < 0 or not math.isfinite(cfg.eta):
            raise SampleError(f"sampler.eta={cfg.eta}: the LLG field drift strength must be finite and >= 0 "
                              "(0 = off, the default); e.g. sampler.eta=1")
        if not cfg.lam > 0:
            raise SampleError(f"sampler.lam={cfg.lam}: the Gilbert damping must be > 0 "
                              "(sampler.lam=inf switches precession off); e.g. sampler.lam=1")
        if not math.isfinite(cfg.precession):
            raise SampleError(f"sampler.precession={cfg.precession}: must be finite (0 = off)")
        if cfg.kappa is not None and not cfg.kappa > 0:
            raise SampleError(f"sampler.kappa={cfg.kappa}: must be > 0 (or null for nearest-token decoding)")
        if cfg.exit_kappa is not None and not cfg.exit_kappa > 0:
            raise SampleError(f"sampler.exit_kappa={cfg.exit_kappa}: must be > 0 (or null: decode at t_eps)")
        if int(cfg.top_k) < 0:
            raise SampleError(f"sampler.top_k={cfg.top_k}: must be >= 0 (0 = the whole vocabulary)")
        for key, choices in (("decode", DECODERS), ("tail", TAILS), ("grid", tuple(GRIDS)), ("method", tuple(INTEGRATORS)),
                             ("prior", ("auto", *PRIORS))):
            if str(cfg[key]) not in choices:
                raise SampleError(f"sampler.{key}={cfg[key]!r}: choose one of {', '.join(choices)}")

    @property
    def field_only(self) -> bool:
        return not self.model.learned

    @property
    def label(self) -> str:
        kind = f"learned:{self.model.prior}" if self.model.learned else f"prior:{self.model.prior}"
        if self.model.prior == "field":
            kind += f"@{_fmt(self.model.eta_train)}"
        extra = "" if self.eta == 0 else f",eta={_fmt(self.eta)},lam={_fmt(self.lam)}"
        extra += "" if not self.precession else f",prec={_fmt(self.precession)}"
        extra += "" if self.exit_kappa is None else f",exit@kappa={_fmt(self.exit_kappa)}"
        extra += "" if self.decode == "posterior" else ",nearest"
        extra += "" if self.tail == "direct" or self.top_k is None else ",tail=drop"
        return f"spin[{kind}]({self.cfg.method.replace('geodesic_', '')},{self.cfg.grid},steps={self.steps}{extra})"

    @property
    def sde_steps(self) -> int:
        return self.exit

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **{k: self.cfg[k] for k in (
            "eta", "lam", "steps", "method", "grid", "top_k", "tail", "decode", "exit_kappa", "precession")},
            "prior": self.model.prior, "eta_train": self.model.eta_train, "learned": self.model.learned,
            "context_features": self.model.features}

    # ------------------------------------------------------------------ work
    def coefficients(self, t: float) -> tuple[float, float]:
        """(kappa(t), beta(t)) of the forward family, cached per grid time."""
        return coefficients(self.sde, t, self._coef)

    def logits(self, out: FieldOutput) -> Tensor:
        """Logits over the vocabulary for the contexts of ``out``: model + steering. (B, V)."""
        table = self.session.token_table
        logits = self.model(out.field, out.hidden, out.logits, table)
        if self.steering is not None and getattr(self.steering, "mode", "prior") in ("prior", "both"):
            logits = logits + self.steering.logit_bias(table)
        return logits

    def posterior(self, out: FieldOutput) -> CandidatePosterior:
        return CandidatePosterior.from_logits(self.logits(out), self.session.token_table, self.top_k)

    def extra_drift(self, field: Tensor, n: int) -> Callable[[Tensor, float], Tensor] | None:
        """The drifts that change the target: the paper's LLG field term and the steering field."""
        steer = self.steering if self.steering is not None and \
            getattr(self.steering, "mode", "prior") in ("dynamics", "both") else None
        if self.eta == 0 and steer is None:
            return None
        rows = field.repeat_interleave(n, 0) if self.eta > 0 else None  # (B n, d)

        def drift(spin: Tensor, t: float) -> Tensor:
            out = torch.zeros_like(spin)
            if rows is not None:
                out = out + llg_field_drift(spin, rows, self.eta, self.lam, self.sde.geometry)
            return out if steer is None else out + steer.drift(spin, t)

        return drift

    def integrate(self, post: CandidatePosterior, field: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """n spins per context from uniform noise to the exit point of the grid. (B, n, d)."""
        rev = PosteriorReverseSDE(self.sde, post, n, self.precession, self.extra_drift(field, n), cache=self._coef)
        with small_op_threads(field.shape[0] * n):
            return integrate_posterior(rev, self.grid, str(self.cfg.method), generator, self.exit, self.brownian)

    def _decode(self, post: CandidatePosterior, spin: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Tokens (B, n) and diagnostics for final spins (B, n, d); with ``tail=direct`` a share
        ``dropped_mass`` of the tokens is a direct draw from the non-candidates (``post_p`` NaN there)."""
        B, n, d = spin.shape
        if self.decode == "posterior":
            kappa, _ = self.coefficients(self.sde.T - self.grid[self.exit])
            ids, p = post.draw(spin, kappa, generator)  # (B, n)
            res = {"post_p": p}
        else:
            ids, cos, margin = decode_spins(spin.reshape(B * n, d), self.session.token_table, self.kappa, generator,
                                            coarse=self.session.coarse_table)
            ids, res = ids.view(B, n), {"margin": margin.view(B, n)}
        if self.tail == "direct":
            ids, tail = post.mix_tail(ids, generator)
            res = {k: v.masked_fill(tail, float("nan")) for k, v in res.items()}
        res["token"] = ids
        res["cos"] = torch.einsum("bnd,bnd->bn", spin, self.session.token_table[ids])
        return res

    @torch.no_grad()
    def propose(self, out: FieldOutput, generator: torch.Generator) -> dict[str, Tensor]:
        post = self.posterior(out)
        res = self._decode(post, self.integrate(post, out.field, 1, generator), generator)
        res = {k: v[:, 0] for k, v in res.items()}
        res["dropped_mass"] = post.dropped_mass
        return res

    @torch.no_grad()
    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator, chunk: int = 2048) -> Tensor:
        """n draws per context, n spins sharing each context's candidates. (B, n)."""
        rows = max(1, chunk // max(n, 1))
        parts = []
        for start in range(0, out.field.shape[0], rows):
            sub = _select(out, torch.arange(start, min(out.field.shape[0], start + rows), device=out.field.device))
            post = self.posterior(sub)
            parts.append(self._decode(post, self.integrate(post, sub.field, n, generator), generator)["token"])
        return torch.cat(parts)
