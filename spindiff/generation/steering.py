"""The steering field B: an external field added to the spin picture of next-token choice.

A unit direction B in the embedding space R^d with a strength g (and an optional time profile
for the dynamics) enters the generation in two equivalent places:

* **prior form** -- the next-token logits are tilted by the external field:
  ``logits_v -> logits_v + g B . e_v`` with e_v the unit unembedding row of token v
  (:meth:`Steering.logit_bias`, the same for every context). The tilted distribution
  p_g(v) ∝ p(v) exp(g B . e_v) is the Boltzmann ensemble of the token spins in the context field
  plus an external field g B. For the ``ar`` sampler this is weighted decoding through a
  ``transformers`` :class:`~transformers.LogitsProcessor` (:class:`SteeringLogitsProcessor`);
  the posterior-over-vocabulary spin sampler adds it to its prior logits.
* **dynamics form** -- the spin S on S^{d-1} feels the external field in the reverse LLG SDE:
  ``drift += g w(t) [P_S B + (1/lam) Prec(S, B)]`` (:meth:`Steering.drift`): damping towards B,
  which is the Riemannian score of the vMF tilt exp(g S . B) (so at S = e_v it is the same tilt as
  the prior form), plus the LLG precession about B (the exact -S x B for d = 3, the complex-structure
  generalisation of :func:`spindiff.sphere.geometry.precession` for d > 3; lam = inf: none).

Geometrically a constant external field *translates* the decision landscape: the logit gap between
two candidates changes by g B . (e_good - e_bad), the same for every context, so the boundary
between "good" and "bad" contexts moves without turning. Head gains (:mod:`spindiff.lm.interventions`)
change the context field N itself and so rotate the boundary (Huo & Johnson).

B is built from (a) a word set: the normalised mean of the words' unit unembedding rows minus the
mean unit row of the vocabulary (each word must be one token, as ``" " + word``; centred because
token embeddings are anisotropic, see :func:`word_direction`); (b) two contrast prompts: ``N(positive) - N(negative)``,
the difference of their raw context fields (:class:`spindiff.lm.field.ContextFieldProvider`,
``final_norm=True``, so in logit units), normalised; (c) a vector file (``.npy`` without pickle,
``.pt`` through ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from spindiff.config import finite_number
from spindiff.generation.session import SampleError
from spindiff.sphere.geometry import SphereGeometry, precession

__all__ = ["Steering", "SteeringLogitsProcessor", "MODES", "PROFILES", "check_steer_config", "word_direction",
           "contrast_direction", "vector_direction", "build_steering", "steering_words", "has_field_source"]

MODES = ("prior", "dynamics", "both")
PROFILES = ("constant", "late", "early")


def _get(o: Any, k: str, d: Any = None) -> Any:
    if o is None:
        return d
    return o.get(k, d) if hasattr(o, "get") else getattr(o, k, d)


_finite = functools.partial(finite_number, error=SampleError)  # (x, what, fix) -> float or SampleError


class Steering:
    """An external field g B for the spin sampler (dynamics, prior logits) and ``ar`` (logit bias).

    Args:
        direction: (d,) the field direction (normalised here; a zero vector is an error).
        strength: g (finite; negative steers away from B).
        mode: ``prior`` (logit bias only), ``dynamics`` (SDE drift only) or ``both``.
        profile: time profile w(t) of the dynamics form, t the forward (physical) time in [0, T]
            (t = T pure noise, t -> 0 data): ``constant`` (1), ``late`` (1 - t/T: acts near the
            data end of the reverse process) or ``early`` (t/T).
        lam: Gilbert damping of the dynamics form: precession (g/lam) Prec(S, B); inf = none.
        T: end time of the forward SDE (for the profile).
        source: a description of where B came from (recorded in run outputs).

    :meth:`logit_bias` is zero unless the mode includes ``prior`` and :meth:`drift` is zero
    unless it includes ``dynamics``, so a sampler may add both unconditionally.
    """

    def __init__(self, direction: Tensor, strength: float, mode: str = "prior", profile: str = "constant",
                 lam: float = math.inf, T: float = 1.0, source: str = "", words: Sequence[str] = (),
                 geometry: Optional[SphereGeometry] = None) -> None:
        if mode not in MODES:
            raise SampleError(f"steer.mode={mode!r}: use one of {', '.join(MODES)}")
        if profile not in PROFILES:
            raise SampleError(f"steer.profile={profile!r}: use one of {', '.join(PROFILES)}")
        self.strength = _finite(strength, "steer.strength", "e.g. steer.strength=4 (0 = off)")
        lam = float(lam)
        if not lam > 0:
            raise SampleError(f"steer.lam={lam}: the Gilbert damping of the steering field must be > 0 "
                              "(steer.lam=inf: no precession)")
        direction = torch.as_tensor(direction).detach().reshape(-1)
        if not bool(torch.isfinite(direction).all()):
            raise SampleError(f"the steering field from {source or 'the given vector'} has NaN/inf entries")
        norm = float(direction.double().norm())
        if not norm > 1e-12:
            raise SampleError(f"the steering field from {source or 'the given vector'} has zero norm; "
                              "use contrast prompts that differ, words with distinct embeddings, or a nonzero vector")
        self.direction = (direction.double() / norm).to(direction.dtype if direction.is_floating_point() else torch.float32)
        self.raw_norm = norm
        self.mode, self.profile, self.lam, self.T = mode, profile, lam, float(T)
        self.source, self.words = source, tuple(words)
        self.geometry = geometry or SphereGeometry()
        self._bias: Optional[tuple[tuple, Tensor]] = None

    @property
    def dim(self) -> int:
        return int(self.direction.shape[0])

    @property
    def prior(self) -> bool:
        return self.mode in ("prior", "both")

    @property
    def dynamics(self) -> bool:
        return self.mode in ("dynamics", "both")

    def describe(self) -> dict[str, Any]:
        return {"strength": self.strength, "mode": self.mode, "profile": self.profile,
                "lam": "inf" if math.isinf(self.lam) else self.lam, "source": self.source,
                "words": list(self.words), "raw_norm": self.raw_norm}

    # ------------------------------------------------------------------ prior form
    def field_logits(self, token_table: Tensor) -> Tensor:
        """B . e_v for every row of ``token_table`` (V, d): (V,) (no strength, no mode)."""
        if token_table.shape[-1] != self.dim:
            raise SampleError(f"the steering field has d={self.dim} but the token table has d={token_table.shape[-1]}; "
                              "build the field on the same model")
        return token_table @ self.direction.to(dtype=token_table.dtype, device=token_table.device)

    def logit_bias(self, token_table: Tensor) -> Tensor:
        """g B . e_v (V,) to add to next-token (prior) logits; zeros when the mode is ``dynamics``.
        Cached for the table (rebuilt if the table is replaced or edited in place)."""
        key = (token_table.data_ptr(), tuple(token_table.shape), token_table.dtype, token_table.device,
               token_table._version)
        if self._bias is not None and self._bias[0] == key:
            return self._bias[1]
        with torch.no_grad():
            bias = self.strength * self.field_logits(token_table) if self.prior else \
                torch.zeros(token_table.shape[0], dtype=token_table.dtype, device=token_table.device)
        self._bias = (key, bias)
        return bias

    def processor(self, token_table: Tensor) -> "SteeringLogitsProcessor":
        """The prior form as a ``transformers`` LogitsProcessor (weighted decoding for ``generate``)."""
        return SteeringLogitsProcessor(self.logit_bias(token_table))

    # ------------------------------------------------------------------ dynamics form
    def weight(self, t: float | Tensor, like: Tensor) -> Tensor:
        """g w(t) as (B,) for spins ``like`` (B, d); t: float, 0-d or (B,) forward time."""
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        t = t.expand(like.shape[0]) if t.dim() == 0 else t.reshape(-1)
        if self.profile == "constant":
            w = torch.ones_like(t)
        elif self.profile == "late":
            w = (1.0 - t / self.T).clamp(0.0, 1.0)
        else:
            w = (t / self.T).clamp(0.0, 1.0)
        return self.strength * w

    def drift(self, spin: Tensor, t: float | Tensor) -> Tensor:
        """g w(t) [P_S B + (1/lam) Prec(S, B)] (B, d), tangent at ``spin`` (B, d); zeros when the
        mode is ``prior``. Linear in B, so negative g is damping towards -B."""
        if not self.dynamics or self.strength == 0:
            return torch.zeros_like(spin)
        B = self.direction.to(dtype=spin.dtype, device=spin.device).expand_as(spin)
        out = self.geometry.proju(spin, B)  # (B, d) P_S B
        if math.isfinite(self.lam):
            out = out + precession(spin, B, self.geometry) / self.lam
        return self.weight(t, spin)[:, None] * out


class SteeringLogitsProcessor(LogitsProcessor):
    """``scores + bias`` for ``model.generate`` (a ``transformers`` LogitsProcessor).

    In transformers >= 5 user processors run before the temperature / top-p warpers, so the LM's
    distribution is tilted first and then warped, as in :meth:`ARSampler.draw_from`."""

    def __init__(self, bias: Tensor) -> None:
        self.bias = bias  # (V,)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        b = self.bias
        if b.dtype != scores.dtype or b.device != scores.device:
            b = self.bias = b.to(dtype=scores.dtype, device=scores.device)
        return scores + b


# --------------------------------------------------------------------------- building B
def steering_words(spec: Any) -> list[str]:
    """``"football, soccer"`` or a list -> ["football", "soccer"] (blank entries dropped)."""
    if spec is None:
        return []
    items = str(spec).split(",") if isinstance(spec, str) else list(spec)
    return [str(w).strip() for w in items if str(w).strip()]


def word_ids(tokenizer: Any, words: Sequence[str], model_name: str = "the model") -> list[int]:
    """One token id per word (``" " + word``, as mid-sentence); SampleError for a word that is
    several tokens or unknown to the vocabulary."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for w in words:
        toks = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1 or (unk is not None and toks[0] == unk and w != tokenizer.unk_token):
            pieces = [tokenizer.decode([t]) for t in toks]
            raise SampleError(f"steering word {w!r} is not a single token for {model_name} (' {w}' -> {pieces}); "
                              "use words that are one token with a leading space, or build the field with "
                              "steer.positive/steer.negative prompts or steer.vector=FILE")
        ids.append(int(toks[0]))
    return ids


def word_direction(token_table: Tensor, tokenizer: Any, words: Sequence[str], model_name: str = "the model",
                   center: bool = True) -> Tensor:
    """Mean of the words' unit rows of ``token_table`` (V, d), minus (``center``) the mean unit row
    of the whole vocabulary: (d,), not normalised.

    Why centred: unit token embeddings are strongly anisotropic (SmolLM2-135M: the mean unit row
    has norm 0.67, and the raw mean of six sports words has cosine 0.80 with it), so the raw mean
    mostly points along the vocabulary's common direction: B . e_v > 0.3 for 47k of 49k tokens and
    a logit bias g B . e_v flattens the distribution instead of favouring the topic. Centred, the
    same six words give B . e_v > 0.3 for 23 tokens, all of them sports words (docs/steering.md)."""
    if not words:
        raise SampleError("steer.words is empty; give comma-separated single-token words, e.g. steer.words=football,soccer")
    ids = word_ids(tokenizer, words, model_name)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mean = unit(token_table[torch.tensor(ids, device=token_table.device)]).mean(0)
    if center:
        mean = mean - unit(token_table).mean(0)
    return mean


@torch.no_grad()
def contrast_direction(session: Any, positive: Sequence[str], negative: Sequence[str], heads: str = "all") -> Tensor:
    """mean N(positive) - mean N(negative) (d,): raw (unnormalised) context fields of the given
    heads at the last position of each prompt, through the frozen final-norm scale."""
    from spindiff.lm.field import ContextFieldProvider

    if not positive or not negative:
        raise SampleError("a contrast field needs both prompts: steer.positive=\"...\" steer.negative=\"...\" "
                          "(| separates several prompts)")
    try:
        prov = ContextFieldProvider(session.model, heads, "in_situ", normalize=False, final_norm=True,
                                    adapter=session.adapter)
    except ValueError as e:
        raise SampleError(f"field.heads={heads!r}: {e}") from None

    def mean_field(prompts: Sequence[str]) -> Tensor:
        ids, mask = session.batch(session.encode(list(prompts)))
        return prov(ids, mask).field.double().mean(0)
    return (mean_field(positive) - mean_field(negative)).to(session.dtype)


def vector_direction(path: str, dim: int) -> Tensor:
    from spindiff.lm.interventions import InterventionError, load_vector

    try:
        return load_vector(path, dim, "steer.vector")
    except InterventionError as e:
        raise SampleError(str(e)) from None


def _prompts(s: Any) -> list[str]:
    return [p for p in (x.strip() for x in str(s or "").split("|")) if p]


def has_field_source(steer: Any) -> bool:
    return bool(steering_words(_get(steer, "words", "")) or _get(steer, "positive", "") or _get(steer, "negative", "")
                or _get(steer, "vector", ""))


def check_steer_config(steer: Any) -> None:
    """Checks of a ``steer`` section that need no model (SampleError naming the fix)."""
    if steer is None:
        return
    g = _finite(_get(steer, "strength", 0.0), "steer.strength", "e.g. steer.strength=4 (0 = off)")
    mode, profile = str(_get(steer, "mode", "prior")), str(_get(steer, "profile", "constant"))
    if mode not in MODES:
        raise SampleError(f"steer.mode={mode!r}: use one of {', '.join(MODES)}")
    if profile not in PROFILES:
        raise SampleError(f"steer.profile={profile!r}: use one of {', '.join(PROFILES)}")
    lam = _get(steer, "lam", None)
    if lam is not None and not float(lam) > 0:
        raise SampleError(f"steer.lam={lam}: must be > 0 (inf = no precession; null = the sampler's lam)")
    sources = [k for k, on in (("steer.words", bool(steering_words(_get(steer, "words", "")))),
                               ("steer.positive/negative", bool(_get(steer, "positive", "") or _get(steer, "negative", ""))),
                               ("steer.vector", bool(_get(steer, "vector", "")))) if on]
    if len(sources) > 1:
        raise SampleError(f"the steering field has several sources ({', '.join(sources)}); give exactly one")
    if g != 0 and not sources:
        raise SampleError(f"steer.strength={g:g} needs a steering field: steer.words=w1,w2 (single-token words), "
                          "steer.positive=\"...\" steer.negative=\"...\" (contrast prompts) or steer.vector=FILE")
    if bool(_get(steer, "positive", "")) != bool(_get(steer, "negative", "")):
        raise SampleError("a contrast field needs both steer.positive=\"...\" and steer.negative=\"...\"")
    for k in ("heads_gain",):
        _finite(_get(steer, k, 0.0), f"steer.{k}")
    act = _get(steer, "actadd", None)
    if act is not None:
        _finite(_get(act, "scale", 0.0), "steer.actadd.scale", "e.g. steer.actadd.scale=0.5 (0 = off)")


def build_steering(steer: Any, session: Any, lam: float = math.inf, T: float = 1.0,
                   field_heads: str = "all") -> Optional[Steering]:
    """The :class:`Steering` of a ``steer`` config section on ``session``'s model, or None when
    the strength is 0 (with or without a field source)."""
    if steer is None:
        return None
    check_steer_config(steer)
    g = float(_get(steer, "strength", 0.0))
    words = steering_words(_get(steer, "words", ""))
    if words:
        direction = word_direction(session.token_table, session.tokenizer, words, session.name)
        source = "words:" + ",".join(words)
    elif _get(steer, "positive", ""):
        pos, neg = _prompts(_get(steer, "positive", "")), _prompts(_get(steer, "negative", ""))
        direction = contrast_direction(session, pos, neg, field_heads)
        source = f"contrast:{'|'.join(pos)} - {'|'.join(neg)}"
    elif _get(steer, "vector", ""):
        direction = vector_direction(str(_get(steer, "vector", "")), session.dim)
        source = f"vector:{_get(steer, 'vector', '')}"
    else:
        return None
    slam = _get(steer, "lam", None)
    s = Steering(direction.to(session.device), g, str(_get(steer, "mode", "prior")),
                 str(_get(steer, "profile", "constant")), float(lam if slam is None else slam), T, source, words)
    return s if g != 0 else None  # a field with strength 0 is validated, then off
