"""The LightningModule that fits the residual score, and the objectives it can fit.

:class:`ScoreModule` is *given* its parts -- the score network (a pure ``nn.Module``), the
forward process (``sde``) and an :class:`Objective` (the loss function and the evaluation
operations of one training objective) -- and owns only the loss bookkeeping, logging,
evaluation and optimizers. Objectives are chosen by name from :data:`OBJECTIVES`:

- ``spin``: denoising score matching on S^{d-1} (:func:`spindiff.score.losses.dsm_loss`, exact vMF
  conditional score) of the total score eta_train m(t) P_S N + score_scale(t) net(S_t, t, context);
- ``euclid_ddpm``: the Euclidean Gaussian DDPM baseline in embedding space
  (:mod:`spindiff.score.euclid`) with the same network size and context features.

Batches are dicts from :class:`spindiff.training.data.PairDataset`: ``field``, ``hidden``, ``spin``
(B, D) and ``token`` (B,).

Determinism. The noise of training step k is drawn from a generator seeded by (seed, k, rank)
(see :meth:`ScoreModule._generator` for accelerators), and validation noise from one seeded by
the batch index, so a run resumed from a checkpoint
draws exactly the noise of an uninterrupted run, and ``val/loss`` is comparable across
validations.

Logged: ``train/loss`` (``lr-AdamW`` comes from the LearningRateMonitor); ``val/loss``;
``val/acc@t`` (nearest-token accuracy of the one-step denoised spin S0_hat at each t of
``eval_t``: S0_hat from the score, then argmax of cosine against the unit token table, one
matmul) with ``val/acc_noisy@t`` (the same for the
noised S_t itself, the no-network floor); ``val/acc_field`` (nearest token to the context field
N alone); ``val/acc_sample`` (a full reverse integration of ``eval_sample_steps`` geodesic steps
per context, decoded) and ``val/norm_drift`` (max | |S| - 1 | over those samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from spindiff.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint
from spindiff.score.features import context_dim, context_features
from spindiff.sphere.geometry import nearest_token

Batch = Mapping[str, Tensor]


# --------------------------------------------------------------------------- objectives
class Objective(Protocol):
    """A training objective: how to compute the loss and the evaluation quantities.

    ``context`` is the score network's context input (B, c) or ``None``; ``generator`` drives
    every random draw.
    """

    name: str

    def loss(self, net: nn.Module, sde: Any, batch: Batch, context: Tensor | None,
             generator: torch.Generator | None) -> Tensor:
        """Scalar training loss of a batch."""

    def denoise(self, net: nn.Module, sde: Any, batch: Batch, context: Tensor | None, t: float,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Noise the batch's targets to time t and denoise in one step: (x_t, x0_hat), (B, D) each."""

    def sample(self, net: nn.Module, sde: Any, batch: Batch, context: Tensor | None, steps: int,
               seed: int) -> Tensor:
        """Full reverse sampling for the batch's contexts: (B, D) final states."""


@dataclass
class SpinObjective:
    """Denoising score matching on the sphere (vMF noising family, :mod:`spindiff.score.losses`).

    One-step denoising uses the exact identity for the vMF family: the score of p_t is
    kappa(t) P_{S_t} E[S_0 | S_t], so E[S_0 | S_t] = m(t) S_t + score / kappa(t) with
    m(t) = E[S_t . S_0] (the radial part concentrates at m(t) for large d);
    S0_hat = E[S_0 | S_t] / |E[S_0 | S_t]|.
    """

    weighting: str = "normalized"
    name: str = "spin"

    def score_fn(self, net: nn.Module, sde: Any, batch: Batch, context: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        from spindiff.score.net import make_score_fn

        return make_score_fn(net, sde, field=batch["field"], context=context)

    def loss(self, net, sde, batch, context, generator):
        from spindiff.score.losses import dsm_loss

        return dsm_loss(sde, self.score_fn(net, sde, batch, context), batch, weighting=self.weighting,
                        generator=generator)

    def denoise(self, net, sde, batch, context, t, generator):
        spin0 = batch["spin"]
        tt = torch.full((spin0.shape[0],), float(t), dtype=spin0.dtype, device=spin0.device)  # (B,)
        spin_t = sde.marginal_sample(spin0, tt, generator=generator)  # (B, D)
        score = self.score_fn(net, sde, batch, context)(spin_t, tt)  # (B, D) tangent at S_t
        mean = sde.mean_cosine(tt).to(spin0)[:, None] * spin_t + score / sde.kappa(tt).to(spin0)[:, None]
        return spin_t, sde.geometry.projx(mean)

    def sample(self, net, sde, batch, context, steps, seed):
        from spindiff.sphere.integrators import sample as integrate_reverse

        spin0 = batch["spin"]
        rev = sde.reverse(self.score_fn(net, sde, batch, context))
        return integrate_reverse(rev, spin0.shape[0], steps=steps, dtype=spin0.dtype, device=spin0.device, seed=seed)


def build_spin(config: Any, meta: Mapping[str, Any]) -> tuple[nn.Module, Any, Objective]:
    """Score network, BrownianSphereSDE and :class:`SpinObjective` for ``config``/``meta``."""
    from spindiff.score.net import ResidualScoreNet
    from spindiff.sphere.sde import BrownianSphereSDE

    net = ResidualScoreNet(**{**meta["score_net"], "tangent": True})
    sde = BrownianSphereSDE.from_config(config.sde, int(meta["dim"]))
    return net, sde, SpinObjective(weighting=config.get("weighting", "normalized"))


@dataclass
class EuclidDDPMObjective:
    """The Euclidean Gaussian DDPM baseline (:mod:`spindiff.score.euclid`) on the same targets.

    The clean point is x_0 = sqrt(d) S_0 (the target token's unit unembedding row scaled to unit
    variance per coordinate, the scale the VP-SDE assumes) in R^d, with no sphere constraint.
    Every token row has the same norm sqrt(d), so nearest-embedding rounding (Euclidean) is the
    same argmax as nearest cosine; states are returned divided by sqrt(d) (spin units), so
    ``val/norm_drift`` shows how far the Euclidean samples land from the sphere.
    One-step denoising: x0_hat = (x_t - sigma(t) eps_hat) / alpha(t).
    """

    name: str = "euclid_ddpm"

    @staticmethod
    def _x0(batch: Batch) -> Tensor:
        spin = batch["spin"]
        return spin * math.sqrt(spin.shape[-1])  # (B, D)

    def loss(self, net, sde, batch, context, generator):
        from spindiff.score.euclid import ddpm_loss, make_eps_fn

        return ddpm_loss(sde, make_eps_fn(net, context), {"x0": self._x0(batch)}, generator=generator)

    def denoise(self, net, sde, batch, context, t, generator):
        from spindiff.score.euclid import make_eps_fn

        x0 = self._x0(batch)
        tt = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)  # (B,)
        x_t, _ = sde.marginal_sample(x0, tt, generator=generator)  # (B, D)
        alpha, sigma = sde.alpha_sigma(tt)
        x0_hat = (x_t - sigma.to(x0)[:, None] * make_eps_fn(net, context)(x_t, tt)) / alpha.to(x0)[:, None]
        scale = math.sqrt(x0.shape[-1])
        return x_t / scale, x0_hat / scale

    def sample(self, net, sde, batch, context, steps, seed):
        from spindiff.score.euclid import make_eps_fn, sample_ddpm

        spin0 = batch["spin"]
        n, d = spin0.shape
        x = sample_ddpm(sde, make_eps_fn(net, context), n, d, steps=steps, dtype=spin0.dtype, device=spin0.device,
                        seed=seed)
        return x / math.sqrt(d)


def build_euclid_ddpm(config: Any, meta: Mapping[str, Any]) -> tuple[nn.Module, Any, Objective]:
    """Noise-prediction network (same size/context, ``tangent=False``), VPSDE and objective."""
    from spindiff.score.euclid import VPSDE
    from spindiff.score.net import ResidualScoreNet

    net = ResidualScoreNet(**{**meta["score_net"], "tangent": False, "eta_train": 0.0})
    return net, VPSDE.from_config(config.sde), EuclidDDPMObjective()


OBJECTIVES: dict[str, Callable[[Any, Mapping[str, Any]], tuple[nn.Module, Any, Objective]]] = {
    "spin": build_spin,
    "euclid_ddpm": build_euclid_ddpm,
}


def register_objective(name: str, builder: Callable[[Any, Mapping[str, Any]], tuple[nn.Module, Any, Objective]]) -> None:
    """Add an objective builder ``(config, meta) -> (score_net, sde, objective)``."""
    OBJECTIVES[name] = builder


def score_net_hparams(config: Any, dim: int) -> dict[str, Any]:
    """Constructor arguments of the score network for ``config`` (stored in checkpoints)."""
    c = context_dim(config.score_net.features, dim)
    tangent = config.objective == "spin"
    return {"dim": int(dim), "context_dim": c, "hidden": int(config.score_net.hidden),
            "layers": int(config.score_net.layers), "time_dim": int(config.score_net.time_dim),
            "eta_train": float(config.score_net.eta_train) if tangent else 0.0, "tangent": tangent}


def build_parts(config: Any, meta: Mapping[str, Any]) -> tuple[nn.Module, Any, Objective]:
    """(score_net, sde, objective) for ``config.objective`` from the registry."""
    config = config if isinstance(config, DictConfig) else OmegaConf.create(config)
    try:
        builder = OBJECTIVES[config.objective]
    except KeyError:
        raise ValueError(f"objective={config.objective!r}: choose one of {sorted(OBJECTIVES)}") from None
    return builder(config, meta)


def make_meta(config: Any, store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The self-description stored in checkpoints (see :mod:`spindiff.checkpoint`)."""
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
        "field": OmegaConf.to_container(config.field, resolve=True) if isinstance(config.field, DictConfig) else dict(config.field),
        "score_net": score_net_hparams(config, dim),
        "n_pairs": int(store_meta["n_pairs"]), "n_sequences": int(store_meta["n_sequences"]),
        "feature_key": store_meta.get("key"),
    }


# --------------------------------------------------------------------------- the module
class ScoreModule(L.LightningModule):
    """Fits a score network; owns loss, logging, evaluation and optimizers.

    Args:
        score_net: the network (pure ``nn.Module``), e.g. :class:`spindiff.score.net.ResidualScoreNet`.
        sde: the forward process (:class:`spindiff.sphere.sde.BrownianSphereSDE` or the Euclidean one).
        objective: loss and evaluation operations (:data:`OBJECTIVES`).
        config: the resolved TrainConfig as a plain dict (saved as a hyperparameter).
        meta: the checkpoint self-description (:func:`make_meta`; saved as a hyperparameter).
        token_table: (V, D) unit token rows for nearest-token accuracy (not saved).
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

    # ------------------------------------------------------------------ helpers
    def context(self, batch: Batch) -> Tensor | None:
        """The network's context input (B, c) (:func:`spindiff.training.data.context_features`)."""
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
        return self.objective.loss(self.score_net, self.sde, batch, self.context(batch), generator)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        gen = self._generator(0, self.global_step, self.global_rank)
        loss = self(batch, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). Lower optim.lr, keep optim.grad_clip > 0, or resume from "
                f"checkpoints/best.ckpt; the last finite state is in checkpoints/last.ckpt.")
        bs = batch["spin"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        bs = batch["spin"].shape[0]
        ctx = self.context(batch)
        loss = self.objective.loss(self.score_net, self.sde, batch, ctx, self._generator(1, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        if self.token_table is None:
            return
        tokens = batch["token"]
        table = self.token_table.to(batch["spin"].dtype)
        acc_field = (nearest_token(batch["field"], table) == tokens).float().mean()
        self.log("val/acc_field", acc_field, sync_dist=True, batch_size=bs)
        for k, t in enumerate(self.eval_t):
            x_t, x0_hat = self.objective.denoise(self.score_net, self.sde, batch, ctx, t, self._generator(2, batch_idx, k))
            self.log(f"val/acc@{t:g}", (nearest_token(x0_hat, table) == tokens).float().mean(), sync_dist=True,
                     batch_size=bs)
            self.log(f"val/acc_noisy@{t:g}", (nearest_token(x_t, table) == tokens).float().mean(), sync_dist=True,
                     batch_size=bs)
        if batch_idx == 0 and self.eval_sample_steps > 0:
            n = min(bs, self.eval_sample_size)
            sub = {k: v[:n] for k, v in batch.items()}
            x0 = self.objective.sample(self.score_net, self.sde, sub, None if ctx is None else ctx[:n],
                                       self.eval_sample_steps, seed=self.seed)
            self.log("val/acc_sample", (nearest_token(x0, table) == sub["token"]).float().mean(), sync_dist=True,
                     batch_size=n)
            self.log("val/norm_drift", (x0.norm(dim=-1) - 1).abs().max(), sync_dist=True, reduce_fx="max",
                     batch_size=n)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        opt = torch.optim.AdamW(self.score_net.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay),
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

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------- rebuild from a file
def load_score_module(path: str, expect_model: str | None = None, expect_dim: int | None = None,
                      map_location: Any = "cpu", token_table: Tensor | None = None) -> ScoreModule:
    """Rebuild a trained :class:`ScoreModule` from a checkpoint alone (validated by
    :func:`spindiff.checkpoint.load_checkpoint`; raises :class:`CheckpointError`). Returned in
    eval mode; ``module.score_net``, ``module.sde``, ``module.hparams.meta`` (model name, d,
    vocab, context features) and ``module.context(batch)`` are what a sampler needs."""
    ckpt = load_checkpoint(path, expect_model=expect_model, expect_dim=expect_dim, map_location=map_location)
    hp = ckpt["hyper_parameters"]
    try:
        net, sde, objective = build_parts(hp["config"], hp["meta"])
        module = ScoreModule(net, sde, objective, config=hp["config"], meta=hp["meta"], token_table=token_table)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its weights do not fit the network its hyper_parameters describe ({first}); "
                              "it was edited or written by an incompatible version. Retrain with "
                              "`python train.py out=DIR`.") from None
    return module.eval()
