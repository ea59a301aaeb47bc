"""The score model of the spin sampler: a distribution over the vocabulary per context.

    logits_v(ctx) = prior_v(ctx) + r_theta(ctx)_v                 (B, V)
    score(S, t)   = kappa(t) P_S sum_v softmax(logits + kappa(t) S . E)_v e_v

(:mod:`spindiff.score.posterior`). For one token the exact posterior's logits do not depend on
S_t or t, so the network is a function of the context alone and the score it defines is exact
whenever its logits are; nothing is regressed in the 576-dimensional tangent space.

Priors (``score_net.prior``), chosen by name from :data:`PRIORS`:

=========  ========================================================================================
``field``  eta_train N . e_v: the context field's token prior (N the unit in-situ field of the
           selected heads). Its noised score is exact at every t: the paper's analytic drift made
           exact for a finite vocabulary (the old eta_train m(t) P_S N is its first harmonic).
``none``   0: the network alone.
``lm``     the LM's own logits (no network): the oracle / limit arm.
=========  ========================================================================================

The residual r_theta(ctx)_v = s_v (u(ctx) . e_v) + b_v reads a d-vector u out through the unit
token table with a per-token scale s_v (initialised to |W_U[v]|, the unembedding row norms) and
bias b_v; u = g * h + A LN(x) + MLP(LN(x)) with x the context features
(:func:`spindiff.score.features.context_features` with the raw hidden state h), g a per-dimension
gate on h (only when the features include h), LN a LayerNorm. g, A and the MLP's last layer start
at zero, so an untrained network gives the prior exactly; g = 1 gives the LM's logits W_U h exactly
(s_v e_v . h = W_U[v] . h), a point Adam reaches in a few hundred steps, where a d x d map from
zero needs thousands. With ``prior_weight`` the prior is multiplied by a learned c (starting at 1):
the correction's form cannot cancel eta N . e_v, so without c the LM head is out of reach under the
field prior. :meth:`PosteriorScoreModel.param_groups` gives g and c their own (faster) learning rate.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spindiff.score.features import context_dim, context_features

__all__ = ["PRIORS", "register_prior", "PosteriorScoreModel"]

PriorFn = Callable[[float, Tensor, Tensor | None, Tensor], Tensor]  # (eta, field, lm_logits, table) -> (B, V)


def _field_prior(eta: float, field: Tensor, lm_logits: Tensor | None, table: Tensor) -> Tensor:
    return eta * (F.normalize(field, dim=-1) @ table.T)  # (B, V)


def _no_prior(eta: float, field: Tensor, lm_logits: Tensor | None, table: Tensor) -> Tensor:
    return field.new_zeros(field.shape[0], table.shape[0])


def _lm_prior(eta: float, field: Tensor, lm_logits: Tensor | None, table: Tensor) -> Tensor:
    if lm_logits is None:
        raise ValueError("prior=lm needs the LM's logits of the context")
    return lm_logits.to(table.dtype)


PRIORS: dict[str, PriorFn] = {"field": _field_prior, "none": _no_prior, "lm": _lm_prior}


def register_prior(name: str, fn: PriorFn) -> None:
    """Add a prior ``fn(eta_train, field (B, d), lm_logits (B, V) | None, table (V, d)) -> (B, V)``."""
    PRIORS[name] = fn


class PosteriorScoreModel(nn.Module):
    """prior + learned logit correction over the vocabulary (see the module docstring).

    Args:
        dim: d. vocab: V.
        features: context features of the network (``none`` | ``field`` | ``hidden`` | ``field+hidden``).
        prior: name in :data:`PRIORS`. eta_train: strength of the ``field`` prior.
        hidden: MLP width (0: linear read-out only). layers: hidden layers of the MLP.
        row_norms: (V,) initial per-token scales (|W_U[v]|); ones if None.
        learned: False for a prior-only model (no parameters besides nothing: ``prior=lm`` oracle,
            or the field prior alone).
        prior_weight: learn the weight c of the prior (False in checkpoints written before it existed).
    """

    def __init__(self, dim: int, vocab: int, features: str = "field+hidden", prior: str = "field",
                 eta_train: float = 0.0, hidden: int = 512, layers: int = 1, row_norms: Tensor | None = None,
                 learned: bool = True, prior_weight: bool = False) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"score_net.prior={prior!r}: choose one of {sorted(PRIORS)}")
        self.dim, self.vocab, self.features, self.prior = int(dim), int(vocab), str(features), str(prior)
        self.eta_train = float(eta_train)
        self.learned = bool(learned) and context_dim(features, dim) > 0
        c = context_dim(features, dim)
        self.hidden, self.layers = int(hidden), int(layers)
        # a learned weight c on the prior (starts at 1): c = 0 lets g = 1 reach the LM's logits exactly
        # even with the field prior, which the correction's form s_v (u . e_v) cannot cancel
        self.has_prior_weight = bool(prior_weight) and self.learned and self.prior != "none"
        if self.has_prior_weight:
            self.prior_weight = nn.Parameter(torch.ones(()))
        if self.learned:
            self.gate = nn.Parameter(torch.zeros(dim)) if "hidden" in features.split("+") else None
            self.norm = nn.LayerNorm(c)
            self.readout = nn.Linear(c, dim, bias=False)
            nn.init.zeros_(self.readout.weight)
            mlp: list[nn.Module] = []
            if hidden > 0 and layers > 0:
                width = c
                for _ in range(layers):
                    mlp += [nn.Linear(width, hidden), nn.SiLU()]
                    width = hidden
                last = nn.Linear(width, dim)
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
                mlp.append(last)
            self.mlp = nn.Sequential(*mlp) if mlp else None
            norms = torch.ones(vocab) if row_norms is None else row_norms.detach().float().clone()
            self.scale = nn.Parameter(norms)
            self.bias = nn.Parameter(torch.zeros(vocab))

    def param_groups(self, lr: float, gate_lr: float = 0.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups: the LM-head path (gate g, prior weight c) at ``gate_lr`` (``optim.gate_lr``;
        0 = ``lr``), the read-out / MLP matrices with ``weight_decay``, scales, biases and norms at
        ``lr`` without decay. The fast path matters: with one learning rate the read-out and MLP fit
        the training contexts before g reaches the LM head (measured in docs/training.md)."""
        fast = [p for p in (getattr(self, "gate", None), getattr(self, "prior_weight", None)) if p is not None]
        fast_ids = {id(p) for p in fast}
        decay, plain = [], []
        for n, p in self.named_parameters():
            if id(p) in fast_ids:
                continue
            is_matrix = n.endswith("weight") and n.split(".")[0] in ("readout", "mlp")
            (decay if is_matrix else plain).append(p)
        groups = [{"name": "matrices", "params": decay, "weight_decay": float(weight_decay), "lr": float(lr)},
                  {"name": "scales", "params": plain, "weight_decay": 0.0, "lr": float(lr)},
                  {"name": "lm_head_path", "params": fast, "weight_decay": 0.0,
                   "lr": float(gate_lr) if gate_lr > 0 else float(lr)}]
        return [g for g in groups if g["params"]]

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (for self-describing checkpoints; ``row_norms`` are in the weights)."""
        return {"dim": self.dim, "vocab": self.vocab, "features": self.features, "prior": self.prior,
                "eta_train": self.eta_train, "hidden": self.hidden, "layers": self.layers, "learned": self.learned,
                "prior_weight": self.has_prior_weight}

    def context(self, field: Tensor, hidden: Tensor | None) -> Tensor | None:
        """The network's input x (B, c): unit field and/or the raw final hidden state."""
        return context_features(field, hidden, self.features, raw_hidden=True)

    def direction(self, x: Tensor) -> Tensor:
        """u(x) (B, d): the correction's direction in token space, r_v = s_v (u . e_v) + b_v."""
        x = x.to(self.readout.weight.dtype)
        z = self.norm(x)
        u = self.readout(z)  # (B, d)
        if self.mlp is not None:
            u = u + self.mlp(z)
        if self.gate is not None:
            u = u + self.gate * x[:, -self.dim:]  # the raw hidden state is the last d features
        return u

    def correction(self, x: Tensor | None, table: Tensor) -> Tensor | None:
        """r_theta(x)_v = s_v (u . e_v) + b_v, (B, V); None for a prior-only model."""
        if not self.learned or x is None:
            return None
        return (self.direction(x) @ table.T) * self.scale + self.bias  # (B, V)

    def prior_logits(self, field: Tensor, lm_logits: Tensor | None, table: Tensor) -> Tensor:
        """prior_v(ctx) alone (what an untrained network gives). (B, V)."""
        return PRIORS[self.prior](self.eta_train, field.to(table.dtype), lm_logits, table)

    def forward(self, field: Tensor, hidden: Tensor | None, lm_logits: Tensor | None, table: Tensor) -> Tensor:
        """logits_v(ctx) = prior + correction. field (B, d), hidden (B, d), lm_logits (B, V) | None,
        table (V, d) unit token rows -> (B, V)."""
        x = self.context(field, hidden)
        if (self.prior == "field" and self.learned and x is not None and PRIORS["field"] is _field_prior
                and not torch.is_grad_enabled()):
            # sampling: both terms are (B, d) @ (d, V) products with the same table, so one pass over it
            # (for a few contexts the product is memory-bound on the 49152 x 576 table: this halves the
            # per-token cost; tested equal). Not in training: there the batch is large (compute-bound)
            # and autograd would also differentiate the field rows of the stacked product.
            B, u = field.shape[0], self.direction(x).to(table.dtype)
            both = torch.cat([F.normalize(field.to(table.dtype), dim=-1), u]) @ table.T  # (2B, V)
            prior = self.eta_train * both[:B]
            if self.has_prior_weight:
                prior = prior * self.prior_weight.to(prior.dtype)
            return prior + both[B:] * self.scale + self.bias
        logits = self.prior_logits(field, lm_logits, table)
        if self.has_prior_weight:
            logits = logits * self.prior_weight.to(logits.dtype)
        r = self.correction(x, table)
        return logits if r is None else logits + r
