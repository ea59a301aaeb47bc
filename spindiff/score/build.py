"""Building score models from a checkpoint's self-description, without Lightning.

A checkpoint (:mod:`spindiff.checkpoint`) stores ``hyper_parameters = {config, meta}`` and the
network's weights under ``score_net.*``. :func:`build_parts` turns (config, meta) into the network
and its forward process, by objective (:data:`BUILDERS`); :func:`load_score` reads and validates a
file and returns a :class:`ScoreCheckpoint` -- what a sampler needs. Training
(:mod:`spindiff.training.module`) builds its parts with the same :func:`build_parts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from spindiff.checkpoint import CheckpointError, load_checkpoint

__all__ = ["BUILDERS", "register_builder", "build_parts", "ScoreCheckpoint", "load_score"]

Builder = Callable[[DictConfig, Mapping[str, Any]], tuple[nn.Module, Any]]


def _posterior(config: DictConfig, meta: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    from spindiff.score.model import PosteriorScoreModel
    from spindiff.sphere.sde import BrownianSphereSDE

    return PosteriorScoreModel(**meta["score_net"]), BrownianSphereSDE.from_config(config.sde, int(meta["dim"]))


def _euclid_ddpm(config: DictConfig, meta: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    from spindiff.score.euclid import VPSDE
    from spindiff.score.net import ResidualScoreNet

    return ResidualScoreNet(**{**meta["score_net"], "tangent": False, "eta_train": 0.0}), VPSDE.from_config(config.sde)


def _block(config: DictConfig, meta: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    from spindiff.score.draft import DraftHeads

    return DraftHeads(**meta["score_net"]), None  # the block sampler's draft heads: no forward process


BUILDERS: dict[str, Builder] = {"posterior": _posterior, "euclid_ddpm": _euclid_ddpm, "block": _block}


def register_builder(name: str, builder: Builder) -> None:
    """Add an objective's ``(config, meta) -> (score_net, sde)`` builder."""
    BUILDERS[name] = builder


def build_parts(config: DictConfig, meta: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """(score_net, sde) for ``meta["objective"]`` (or ``config.objective``); ``config`` is a train
    config (``config.sde`` builds the forward process)."""
    name = str(meta.get("objective", config.objective))
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"objective={name!r}: choose one of {sorted(BUILDERS)}") from None
    return builder(config, meta)


@dataclass
class ScoreCheckpoint:
    """A trained score model rebuilt from its file: network (eval mode), forward process, self-description."""

    score_net: nn.Module
    sde: Any
    meta: dict[str, Any]
    config: dict[str, Any]
    path: str
    step: int = 0  # optimizer steps it was trained for (Lightning's global_step)

    @property
    def objective(self) -> str:
        return str(self.meta["objective"])

    def to(self, **kw: Any) -> "ScoreCheckpoint":
        self.score_net = self.score_net.to(**kw)
        return self

    def eval(self) -> "ScoreCheckpoint":
        self.score_net.eval()
        return self


def load_score(path: str, expect_model: str | None = None, expect_dim: int | None = None,
               map_location: Any = "cpu") -> ScoreCheckpoint:
    """Read, validate and rebuild a checkpoint (raises :class:`spindiff.checkpoint.CheckpointError`)."""
    ckpt = load_checkpoint(path, expect_model=expect_model, expect_dim=expect_dim, map_location=map_location)
    hp = ckpt["hyper_parameters"]
    state = {k[len("score_net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("score_net.")}
    try:
        # the stored config is read as written (a plain dict), not merged into today's schema: a key
        # a later version dropped must not make an older checkpoint unreadable
        net, sde = build_parts(OmegaConf.create(hp["config"]), hp["meta"])
        net.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its weights do not fit the network its hyper_parameters describe ({first}); "
                              "it was edited or written by an incompatible version. Retrain with "
                              "`python train.py out=DIR`.") from None
    return ScoreCheckpoint(net.eval(), sde, dict(hp["meta"]), dict(hp["config"]), str(path),
                           int(ckpt.get("global_step", 0)))
