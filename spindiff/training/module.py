"""The LightningModule that fits a score model, and the objectives it can fit.

:class:`ScoreModule` is *given* its parts -- the score network (a pure ``nn.Module``), the
forward process (``sde``) and an :class:`Objective` (the loss and the validation metrics of one
training objective) -- and owns only the loss bookkeeping, logging and optimizers. Objectives are
chosen by name from :data:`OBJECTIVES`; networks are built by :func:`spindiff.score.build.build_parts`
(the same code that rebuilds them for sampling, without Lightning):

- ``posterior``: distillation of the LM's next-token distribution into the spin sampler's score
  model (:class:`spindiff.score.model.PosteriorScoreModel`): the loss is the KL divergence from the
  LM's distribution at each context (soft targets: its top-k probabilities and the rest mass,
  cached with the features) to the model's softmax(prior + r_theta). The model's logits do not
  depend on S_t or t (the exact posterior's do not), so the noised posterior at any t is exact
  exactly when this KL is 0, and no time sampling is needed. The KL is over the top-k tokens and
  one "rest" bin (a lower bound on the full KL that is tight when the rest mass is small).
- ``euclid_ddpm``: the Euclidean Gaussian DDPM baseline in embedding space
  (:mod:`spindiff.score.euclid`) on the same contexts.
- ``block``: the draft heads of the ``block`` sampler (:class:`spindiff.score.draft.DraftHeads`),
  distilled from the LM's teacher-forced future-token targets of the same cache
  (:mod:`spindiff.training.block`; its batches add ``future_ids`` / ``future_logp`` / ``future_valid``).

Batches are dicts from :class:`spindiff.training.data.PairDataset`: ``field``, ``hidden``, ``spin``
(B, D), ``token`` (B,) and, for ``posterior``, ``target_ids`` / ``target_logp`` (B, k).

Determinism. The noise of training step k is drawn from a generator seeded by (seed, k, rank)
(see :meth:`ScoreModule._generator` for accelerators), and validation noise from one seeded by
the batch index, so a run resumed from a checkpoint draws exactly the noise of an uninterrupted
run, and ``val/loss`` is comparable across validations.

Logged (posterior): ``train/loss`` and ``val/loss`` (the grouped KL, nats), ``val/kl_prior`` (the
same for the prior alone: where the run started), ``val/tv`` (total variation to the LM's
distribution, grouped the same way), ``val/top1`` (argmax agreement with the LM), ``val/nll``
(cross-entropy of the sequence's actual next token). euclid_ddpm: ``val/loss``, ``val/acc@t``,
``val/acc_sample``, ``val/norm_drift``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from spindiff.checkpoint import FORMAT, FORMAT_VERSION
from spindiff.score.build import build_parts as build_networks
from spindiff.score.features import context_dim, context_features
from spindiff.score.losses import grouped_kl
from spindiff.sphere.geometry import nearest_token
from spindiff.training.block import BlockObjective

Batch = Mapping[str, Tensor]


# --------------------------------------------------------------------------- objectives
class Objective(Protocol):
    """A training objective: the loss of a batch and its validation metrics (name -> scalar)."""

    name: str

    def loss(self, module: "ScoreModule", batch: Batch, generator: torch.Generator | None) -> Tensor: ...

    def metrics(self, module: "ScoreModule", batch: Batch, batch_idx: int) -> dict[str, Tensor]: ...


@dataclass
class PosteriorObjective:
    """Distil the LM's next-token distribution into softmax(prior + r_theta) (module docstring)."""

    name: str = "posterior"

    @staticmethod
    def logits(module: "ScoreModule", batch: Batch, net: nn.Module | None = None) -> Tensor:
        net = module.score_net if net is None else net
        return net(batch["field"], batch["hidden"], None, module.token_table.to(batch["field"].dtype))

    def loss(self, module, batch, generator):
        if "target_ids" not in batch:
            raise ValueError("objective=posterior needs the LM's soft targets in the features (data.targets_k > 0, "
                             "field.protocol=in_situ)")
        return grouped_kl(self.logits(module, batch), batch["target_ids"], batch["target_logp"])[0].mean()

    def metrics(self, module, batch, batch_idx):
        logits = self.logits(module, batch)
        kl, tv, _ = grouped_kl(logits, batch["target_ids"], batch["target_logp"])
        prior = module.score_net.prior_logits(batch["field"], None, module.token_table.to(logits.dtype))
        kl0 = grouped_kl(prior, batch["target_ids"], batch["target_logp"])[0]
        top1 = (logits.argmax(-1) == batch["target_ids"][:, 0].long()).float()
        nll = -torch.log_softmax(logits.float(), -1).gather(1, batch["token"][:, None]).squeeze(1)
        return {"val/loss": kl.mean(), "val/kl_prior": kl0.mean(), "val/tv": tv.mean(), "val/top1": top1.mean(),
                "val/nll": nll.mean()}


@dataclass
class EuclidDDPMObjective:
    """The Euclidean Gaussian DDPM baseline (:mod:`spindiff.score.euclid`) on the same targets.

    The clean point is x_0 = sqrt(d) S_0 (:func:`spindiff.score.euclid.token_points`) in R^d, with
    no sphere constraint. One-step denoising: x0_hat = (x_t - sigma(t) eps_hat) / alpha(t).
    """

    name: str = "euclid_ddpm"

    @staticmethod
    def _x0(batch: Batch) -> Tensor:
        from spindiff.score.euclid import token_points

        return token_points(batch["spin"])  # (B, D)

    def loss(self, module, batch, generator):
        from spindiff.score.euclid import ddpm_loss, make_eps_fn

        return ddpm_loss(module.sde, make_eps_fn(module.score_net, module.context(batch)), {"x0": self._x0(batch)},
                         generator=generator)

    def metrics(self, module, batch, batch_idx):
        from spindiff.score.euclid import make_eps_fn, sample_ddpm

        sde, ctx = module.sde, module.context(batch)
        out = {"val/loss": self.loss(module, batch, module._generator(1, batch_idx))}
        if module.token_table is None:
            return out
        tokens, table = batch["token"], module.token_table.to(batch["spin"].dtype)
        x0 = self._x0(batch)
        scale = math.sqrt(x0.shape[-1])
        eps_fn = make_eps_fn(module.score_net, ctx)
        for k, t in enumerate(module.eval_t):
            tt = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)
            x_t, _ = sde.marginal_sample(x0, tt, generator=module._generator(2, batch_idx, k))
            alpha, sigma = sde.alpha_sigma(tt)
            x0_hat = (x_t - sigma.to(x0)[:, None] * eps_fn(x_t, tt)) / alpha.to(x0)[:, None]
            out[f"val/acc@{t:g}"] = (nearest_token(x0_hat / scale, table) == tokens).float().mean()
        if batch_idx == 0 and module.eval_sample_steps > 0:
            n = min(x0.shape[0], module.eval_sample_size)
            sub_eps = make_eps_fn(module.score_net, None if ctx is None else ctx[:n])
            x = sample_ddpm(sde, sub_eps, n, x0.shape[-1], steps=module.eval_sample_steps, dtype=x0.dtype,
                            device=x0.device, seed=module.seed) / scale
            out["val/acc_sample"] = (nearest_token(x, table) == tokens[:n]).float().mean()
            out["val/norm_drift"] = (x.norm(dim=-1) - 1).abs().max()
        return out


OBJECTIVES: dict[str, Objective] = {"posterior": PosteriorObjective(), "euclid_ddpm": EuclidDDPMObjective(),
                                    "block": BlockObjective()}


def score_net_hparams(config: Any, dim: int, vocab: int) -> dict[str, Any]:
    """Constructor arguments of the score network for ``config`` (stored in checkpoints)."""
    sn = config.score_net
    if config.objective == "block":
        return {"dim": int(dim), "vocab": int(vocab), "block": int(sn.block), "features": str(sn.features),
                "rank": int(sn.rank), "ranked": True, "hidden": int(sn.hidden)}
    if config.objective == "posterior":
        return {"dim": int(dim), "vocab": int(vocab), "features": str(sn.features), "prior": str(sn.prior),
                "eta_train": float(sn.eta_train), "hidden": int(sn.hidden), "layers": int(sn.layers),
                "learned": str(sn.prior) != "lm", "prior_weight": bool(sn.prior_weight)}
    return {"dim": int(dim), "context_dim": context_dim(sn.features, dim), "hidden": int(sn.hidden),
            "layers": int(sn.layers), "time_dim": int(sn.time_dim), "eta_train": 0.0, "tangent": False}


def build_parts(config: DictConfig, meta: Mapping[str, Any],
                token_norms: Any = None) -> tuple[nn.Module, Any, Objective]:
    """(score_net, sde, objective) for ``config.objective`` (a composed train config). ``token_norms`` (V,)
    initialises the posterior model's per-token scales (|W_U[v]|) for a new run (a loaded run has them in
    its weights)."""
    try:
        objective = OBJECTIVES[str(config.objective)]
    except KeyError:
        raise ValueError(f"objective={config.objective!r}: choose one of {sorted(OBJECTIVES)}") from None
    net, sde = build_networks(config, meta)
    if token_norms is not None and getattr(net, "learned", False) and hasattr(net, "scale"):
        with torch.no_grad():
            net.scale.copy_(torch.tensor(np.array(token_norms), dtype=net.scale.dtype))
    return net, sde, objective


def make_meta(config: DictConfig, store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The self-description stored in checkpoints (see :mod:`spindiff.checkpoint`) of a run of ``config``
    (a composed train config)."""
    dim = int(store_meta["dim"])
    model = store_meta.get("model", {})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "objective": str(config.objective),
        "model_name": str(store_meta.get("model_name", model.get("used"))),
        "model_requested": str(model.get("requested", config.model.name)),
        "model_family": model.get("family"), "dim": dim, "vocab_size": int(store_meta["vocab_size"]),
        "n_layers": model.get("n_layers"), "n_heads": model.get("n_heads"),
        "context_features": str(config.score_net.features),
        "context_dim": context_dim(config.score_net.features, dim),
        "field": OmegaConf.to_container(config.field, resolve=True),
        "score_net": score_net_hparams(config, dim, int(store_meta["vocab_size"])),
        "n_pairs": int(store_meta["n_pairs"]), "n_sequences": int(store_meta["n_sequences"]),
        "feature_key": store_meta.get("key"),
    }


# --------------------------------------------------------------------------- the module
class ScoreModule(L.LightningModule):
    """Fits a score network; owns loss, logging and optimizers.

    Args:
        score_net: the network (pure ``nn.Module``).
        sde: the forward process (:class:`spindiff.sphere.sde.BrownianSphereSDE` or the Euclidean one).
        objective: loss and validation metrics (:data:`OBJECTIVES`).
        config: the resolved TrainConfig as a plain dict (saved as a hyperparameter).
        meta: the checkpoint self-description (:func:`make_meta`; saved as a hyperparameter).
        token_table: (V, D) unit token rows (the posterior's points; not saved).
    """

    def __init__(self, score_net: nn.Module, sde: Any, objective: Objective, config: dict[str, Any],
                 meta: dict[str, Any], token_table: Tensor | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["score_net", "sde", "objective", "token_table"])
        self.score_net = score_net
        self.sde = sde
        self.objective = objective
        cfg = OmegaConf.create(config)
        self.features = str(cfg.score_net.features)
        self.seed = int(cfg.seed)
        self.optim_cfg = cfg.optim
        self.eval_t = [float(t) for t in cfg.get("eval_t", [])]
        self.eval_sample_steps = int(cfg.get("eval_sample_steps", 0))
        self.eval_sample_size = int(cfg.get("eval_sample_size", 64))
        # a plain attribute, not a buffer: never saved, never broadcast by DDP (every rank has it)
        self._token_table = token_table
        self._token_table_dev: Tensor | None = None

    @property
    def token_table(self) -> Tensor | None:
        """(V, D) unit token rows on this module's device (``None`` without one)."""
        if self._token_table is None:
            return None
        if self._token_table_dev is None or self._token_table_dev.device != self.device:
            self._token_table_dev = self._token_table.to(self.device)
        return self._token_table_dev

    def context(self, batch: Batch) -> Tensor | None:
        """The Euclidean network's context input (B, c) (:func:`spindiff.score.features.context_features`)."""
        return context_features(batch["field"], batch["hidden"], self.features)

    def _generator(self, *key: int) -> torch.Generator | None:
        """The noise source for ``key`` (e.g. (0, step, rank)): a CPU generator seeded by
        (seed, *key). On an accelerator the noising code draws on both the CPU (times) and the
        device (samples), which one generator cannot serve; there the default generators of all
        devices are seeded with the same value instead and ``None`` is returned."""
        seed = self.seed
        for k in key:
            seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
        if self.device.type == "cpu":
            return torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        return None

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Loss of a batch (scalar)."""
        return self.objective.loss(self, batch, generator)

    def setup(self, stage: str) -> None:
        """Let the objective adapt the data module's batches (``block``: future-token targets)."""
        prepare = getattr(self.objective, "prepare_datamodule", None)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if prepare is not None and dm is not None:
            prepare(self, dm)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        gen = self._generator(0, self.global_step, self.global_rank)
        loss = self(batch, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). Lower optim.lr, keep optim.grad_clip > 0, or resume from "
                f"checkpoints/best.ckpt; the last finite state is in checkpoints/last.ckpt.")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["token"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        bs = batch["token"].shape[0]
        for name, value in self.objective.metrics(self, batch, batch_idx).items():
            self.log(name, value, prog_bar=name == "val/loss", sync_dist=True, batch_size=bs,
                     reduce_fx="max" if name == "val/norm_drift" else "mean")

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        groups_fn = getattr(self.score_net, "param_groups", None)
        params = groups_fn(float(o.lr), float(o.gate_lr), float(o.weight_decay)) if groups_fn \
            else self.score_net.parameters()
        opt = torch.optim.AdamW(params, lr=float(o.lr), weight_decay=float(o.weight_decay),
                                betas=tuple(float(b) for b in o.betas))
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else int(self.trainer.estimated_stepping_batches)
        warm, floor, kind = int(o.warmup_steps), float(o.min_lr_ratio), str(o.scheduler)
        if kind not in ("cosine", "constant"):
            raise ValueError(f"optim.scheduler={kind!r}: use cosine or constant")

        def factor(step: int) -> float:
            if warm > 0 and step < warm:
                return (step + 1) / warm
            if kind == "constant":
                return 1.0
            frac = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

        # one multiplicative factor for every group (the groups' learning rates differ; torch's
        # CosineAnnealingLR takes one absolute eta_min, which would not keep their ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_score_module(path: str, expect_model: str | None = None, expect_dim: int | None = None,
                      token_table: Tensor | None = None) -> ScoreModule:
    """A trained :class:`ScoreModule` rebuilt from a checkpoint alone (for inspection and
    evaluation on training batches; sampling uses :func:`spindiff.score.build.load_score`)."""
    from spindiff.score.build import load_score

    sc = load_score(path, expect_model=expect_model, expect_dim=expect_dim)
    return ScoreModule(sc.score_net, sc.sde, OBJECTIVES[sc.objective], config=sc.config, meta=sc.meta,
                       token_table=token_table).eval()
