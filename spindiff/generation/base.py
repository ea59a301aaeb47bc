"""The sampler interface, its registry, checkpoint discovery and ``build_sampler``.
"""
from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor

from spindiff.lm.field import FieldOutput
from spindiff.generation.session import DIAG_KEYS, GenerationBatch, GenerationSession, SampleError


class Sampler(ABC):
    """Produces next tokens for a batch of contexts.

    Subclasses set ``name``, ``uses_steps`` and ``needs_checkpoint`` ("required" | "optional" |
    "never") and ``objective`` (the training objective of a usable checkpoint).
    """

    name: ClassVar[str] = ""
    uses_steps: ClassVar[bool] = False
    needs_checkpoint: ClassVar[str] = "never"
    objective: ClassVar[Optional[str]] = None
    # steering modes (spindiff.generation.steering.MODES) this sampler applies; () = none
    steering_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, session: GenerationSession, cfg: Any, field_cfg: Any, module: Any = None,
                 ckpt_path: Optional[str] = None, steering: Any = None) -> None:
        self.session = session
        self.steering = steering  # spindiff.generation.steering.Steering or None
        self.cfg = cfg
        self.module = module
        self.ckpt_path = ckpt_path
        if module is not None:
            field_cfg = module.meta.get("field", field_cfg)
        self.field_cfg = field_cfg
        self.provider = session.provider(field_cfg)

    # -- description
    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise :class:`SampleError` for settings this sampler cannot run with."""

    @classmethod
    def check_module(cls, cfg: Any, module: Any) -> None:
        """Raise :class:`SampleError` when these settings cannot run with this (possibly absent) checkpoint."""

    @property
    def field_only(self) -> bool:
        return False

    @property
    def label(self) -> str:
        return self.name

    @property
    def sde_steps(self) -> int:
        """SDE steps per generated token (0 for ``ar``)."""
        return 0

    def describe(self) -> dict[str, Any]:
        out = {"sampler": self.name, "label": self.label, "field_only": self.field_only,
               "ckpt": self.ckpt_path, "sde_steps_per_token": self.sde_steps}
        if getattr(self, "steering", None) is not None:
            out["steering"] = self.steering.describe()
        return out

    # -- work
    def forward(self, ids: Tensor, mask: Tensor) -> FieldOutput:
        """One LM forward of the contexts with the field provider (KV cache kept)."""
        return self.provider(ids, mask, use_cache=True)

    @abstractmethod
    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator) -> Tensor:
        """n independent next-token draws per context of ``out``: (B, n) int64."""

    @abstractmethod
    def generate(self, ids: Tensor, mask: Tensor, max_new_tokens: int, generator: torch.Generator,
                 stop_at_eos: bool = True, on_token: Callable[[int, Tensor], None] | None = None) -> GenerationBatch:
        """Continue each row of ``ids`` (B, T) (left padded, ``mask``) by up to ``max_new_tokens``."""


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: make a :class:`Sampler` available as ``sampler.name=<name>``. A name taken
    by another class is refused (ValueError naming both), never silently overwritten."""

    def deco(cls: type[Sampler]) -> type[Sampler]:
        old = SAMPLERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"sampler name '{name}' is already registered by {old.__module__}.{old.__qualname__}; "
                             f"give {cls.__module__}.{cls.__qualname__} another name")
        cls.name = name
        SAMPLERS[name] = cls  # the same class again (its module re-imported) replaces itself
        return cls

    return deco


def get_sampler_class(name: str) -> type[Sampler]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SampleError(f"unknown sampler.name={name!r}; choose one of {', '.join(sorted(SAMPLERS))}") from None


class StepSampler(Sampler):
    """A sampler that proposes one token per context from a :class:`FieldOutput`; generation is
    the shared token-by-token loop (LM once per token via the KV cache)."""

    @abstractmethod
    def propose(self, out: FieldOutput, generator: torch.Generator) -> dict[str, Tensor]:
        """One next token per context of ``out`` (field N, hidden h, logits of the last position):
        ``{"token": (B,) int64, <diagnostic>: (B,) float ...}`` with diagnostics named in DIAG_KEYS."""

    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator, chunk: int = 2048) -> Tensor:
        """n draws per context: ``propose`` on the contexts repeated n times, in chunks. (B, n)."""
        B = out.field.shape[0]
        rows = torch.arange(B, device=out.field.device).repeat_interleave(n)  # (B n,)
        ids = [self.propose(_select(out, part), generator)["token"] for part in rows.split(chunk)]
        return torch.cat(ids).view(B, n)

    @torch.no_grad()
    def generate(self, ids, mask, max_new_tokens, generator, stop_at_eos=True, on_token=None):
        sess = self.session
        B = ids.shape[0]
        eos = sess.eos_id if stop_at_eos else None
        t0 = time.perf_counter()
        out = self.forward(ids, mask)
        tokens = torch.full((B, max_new_tokens), sess.pad_id, dtype=torch.long, device=ids.device)
        valid = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=ids.device)
        diag = {k: torch.full((B, max_new_tokens), float("nan")) for k in DIAG_KEYS}
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        prev_field: Tensor | None = None
        n = 0
        for i in range(max_new_tokens):
            proposal = self.propose(out, generator)
            tok = proposal.pop("token")  # (B,)
            tok = torch.where(done, torch.full_like(tok, sess.pad_id), tok)
            live = ~done
            tokens[:, i], valid[:, i] = tok, live
            logp = torch.log_softmax(out.logits.float(), -1).gather(1, tok[:, None]).squeeze(1)  # (B,)
            vals = {**proposal, "field_norm": out.field_norm, "lm_logprob": logp}
            if prev_field is not None:
                vals["field_cos_prev"] = (out.field * prev_field).sum(-1) / (
                    out.field.norm(dim=-1) * prev_field.norm(dim=-1)).clamp_min(1e-12)
            for k, v in vals.items():
                diag[k][:, i] = torch.where(live.cpu(), v.detach().float().cpu(), torch.tensor(float("nan")))
            if on_token is not None:
                on_token(i, tok)
            n = i + 1
            if eos is not None:
                done = done | (tok == eos)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            prev_field = out.field
            out = self.provider.step(tok, out)
        seconds = time.perf_counter() - t0
        tokens, valid = tokens[:, :n], valid[:, :n]
        diag = {k: v[:, :n] for k, v in diag.items()}
        stop = ["eos" if (eos is not None and bool((tokens[b][valid[b]] == eos).any())) else "max_tokens"
                for b in range(B)]
        return GenerationBatch(tokens.cpu(), valid.cpu(), diag, seconds, stop, self.sde_steps)


def _select(out: FieldOutput, rows: Tensor) -> FieldOutput:
    """The last-position features of ``out`` for the context rows ``rows`` (no KV cache)."""
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return FieldOutput(per_head=out.per_head[rows] if out.per_head.numel() else out.per_head,
                       field=out.field[rows], field_norm=out.field_norm[rows],
                       hidden=pick(out.hidden), logits=pick(out.logits))


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def _check_steps(cfg: Any) -> None:
    if int(cfg.steps) < 1:
        raise SampleError(f"sampler.steps={cfg.steps}: the reverse SDE needs at least 1 step per token; "
                          "e.g. sampler.steps=20")


# --------------------------------------------------------------------------- checkpoints
# where ``ckpt=auto`` looks (relative to the working directory): train.py's default
# runs/train/<time>/ and the quick start's layout runs/<name>/train/
AUTO_CKPT_PATTERNS = ("runs/train/*/checkpoints/last.ckpt", "runs/*/train/checkpoints/last.ckpt")


def find_checkpoint(session: GenerationSession, objective: str,
                    root: str | Path | None = None) -> tuple[Optional[str], list[str]]:
    """Newest usable ``last.ckpt`` for ``session``'s model and ``objective``: under ``root``
    (``<root>/*/checkpoints/last.ckpt``), or by default everywhere :data:`AUTO_CKPT_PATTERNS`
    point (``runs/train/*/`` and ``runs/*/train/``).

    Returns (path or None, notes on checkpoints skipped and why).
    """
    from spindiff.checkpoint import CheckpointError, load_checkpoint

    notes: list[str] = []
    found = (Path(root).glob("*/checkpoints/last.ckpt") if root is not None
             else (p for pat in AUTO_CKPT_PATTERNS for p in Path(".").glob(pat)))
    cands = sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in cands:
        try:
            ck = load_checkpoint(p, expect_model=session.name, expect_dim=session.dim)
        except CheckpointError as e:
            notes.append(f"skipped {p}: {str(e).split(';')[0]}")
            continue
        obj = ck["hyper_parameters"]["meta"]["objective"]
        if obj != objective:
            notes.append(f"skipped {p}: objective {obj}, need {objective}")
            continue
        return str(p), notes
    return None, notes


def build_sampler(cfg: Any, session: GenerationSession, ckpt: Optional[str] = None,
                  ckpt_root: str | Path | None = None) -> Sampler:
    """The sampler ``cfg.sampler.name`` for a SampleConfig ``cfg`` (validated; ``SampleError``).

    ``ckpt`` overrides ``cfg.ckpt``: ``auto`` (newest compatible checkpoint, see
    :func:`find_checkpoint`; a ``note:`` on stderr says which one was picked, or that none was
    and the field-only sampler runs), ``none`` or a path (validated against the session's model
    and d). Notices go through :func:`spindiff.runtime.notice` (stderr, never into the text).
    """
    from spindiff.checkpoint import CheckpointError
    from spindiff.runtime import notice

    scfg = cfg.sampler
    cls = get_sampler_class(scfg.name)
    cls.validate(scfg)
    spec = str(cfg.ckpt if ckpt is None else ckpt)
    module, path = None, None
    if cls.needs_checkpoint != "never":
        if spec == "auto":
            where = (f"{ckpt_root}/*/checkpoints/last.ckpt" if ckpt_root is not None
                     else " or ".join(AUTO_CKPT_PATTERNS))
            key = (cls.objective or "", str(Path(ckpt_root or ".").resolve()))
            if key not in session.auto_ckpt:  # resolved once per session (sweeps build many samplers)
                path, notes = find_checkpoint(session, cls.objective or "", ckpt_root)
                session.auto_ckpt[key] = path
                skipped = f" (skipped {len(notes)}: {'; '.join(n.removeprefix('skipped ') for n in notes[:3])}" \
                          f"{' ...' if len(notes) > 3 else ''})" if notes else ""
                if path is not None:
                    notice(f"ckpt=auto picked {path}, the newest {cls.objective} checkpoint for {session.name}"
                           f"{skipped}; pass ckpt=PATH to choose another", kind="note")
                elif cls.needs_checkpoint != "required":
                    notice(f"ckpt=auto found no {cls.objective} checkpoint for {session.name} in {where}{skipped}; "
                           "running the field-only sampler (no learned residual)", kind="note")
            path = session.auto_ckpt[key]
            if path is None and cls.needs_checkpoint == "required":
                raise SampleError(f"sampler.name={scfg.name} needs a checkpoint (objective={cls.objective}, model "
                                  f"{session.name}) and none was found in {where}; "
                                  f"train one with `python train.py objective={cls.objective} "
                                  f"model.name={session.name}` or pass ckpt=PATH")
        elif spec not in ("none", "", "null"):
            path = spec
        elif cls.needs_checkpoint == "required":
            raise SampleError(f"sampler.name={scfg.name} needs a checkpoint; ckpt=none is not possible. Train one "
                              f"with `python train.py objective={cls.objective}` and pass ckpt=PATH or ckpt=auto")
        if path is not None:
            try:
                module = session.score_module(path)
            except CheckpointError as e:
                raise SampleError(f"ckpt={path}: {e}") from None
            obj = module.meta["objective"]
            if obj != cls.objective:
                raise SampleError(f"ckpt={path} was trained with objective={obj} but sampler.name={scfg.name} needs "
                                  f"objective={cls.objective}; use sampler.name="
                                  f"{'euclid_ddpm' if obj == 'euclid_ddpm' else 'spin'} or a matching checkpoint")
    cls.check_module(scfg, module)
    kwargs = {"sde_cfg": cfg.sde} if cls.uses_steps else {}
    steering = _build_steering(cfg, session, cls, module)
    if steering is not None and "steering" in inspect.signature(cls.__init__).parameters:
        kwargs["steering"] = steering
    sampler = cls(session, scfg, cfg.field, module=module, ckpt_path=path, **kwargs)
    sampler.steering = steering
    return sampler


def _build_steering(cfg: Any, session: GenerationSession, cls: type[Sampler], module: Any) -> Any:
    """The steering field of ``cfg.steer`` (None when off), checked against what ``cls`` applies."""
    steer = cfg.get("steer") if hasattr(cfg, "get") else getattr(cfg, "steer", None)
    if steer is None:
        return None
    from spindiff.generation.steering import build_steering

    lam = float(getattr(cfg.sampler, "lam", math.inf) or math.inf)
    sde = module.sde if module is not None else None
    T = float(getattr(sde, "T", None) or cfg.sde.T)
    fheads = module.meta.get("field", cfg.field).get("heads", "all") if module is not None else cfg.field.heads
    steering = build_steering(steer, session, lam=lam, T=T, field_heads=str(fheads))
    if steering is not None and steering.mode not in cls.steering_modes:
        can = ", ".join(cls.steering_modes) if cls.steering_modes else "none"
        raise SampleError(f"sampler.name={cls.name} does not apply steer.mode={steering.mode} (it applies: {can}); "
                          + ("use steer.mode=prior (the logit bias)" if cls.steering_modes else
                             "use sampler.name=ar (logit bias), or LM interventions (steer.head_gains, steer.actadd.*)"))
    return steering
