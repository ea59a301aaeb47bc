"""Interventions in the LM forward pass: per-head gains and activation addition.

Both act on the model's own forward (PyTorch hooks), so they apply to every sampler (``ar``'s
``generate``, the field provider of ``spin`` and ``euclid_ddpm``, scoring passes) while installed.
Each is an :class:`Intervention`: ``install()`` / ``remove()`` or a context manager
(``with HeadGains(adapter, {(29, 1): 0.5}): ...``); :class:`Interventions` composes several.

* **Head gains** (spec ``L29H1:0.5,L23H4:2``, or the top cooperative / antagonistic heads of an
  analysis report ``heads.csv``): z_h -> g_h z_h at the input of the layer's output projection,
  i.e. the head's context vector N0 and with it its field contribution N_proj = N0 W_O are scaled
  by g_h (the hook point of :meth:`ArchitectureAdapter.ablate`; g = 0 is zero-ablation, g = 1 the
  identity). In the spin picture this rescales one head's share of the context field N, so the
  good/bad boundary (the hyperplane normal to N) *rotates* by a context-dependent amount.
* **Activation addition** (Turner et al., "steering vectors"): h -> h + v added to the residual
  stream after decoder layer ``layer`` at every position (prompt and generated tokens). v is
  ``scale * ref_norm * unit(mean h(positive) - mean h(negative))`` from contrast prompts (or a
  vector file), with ``ref_norm`` the mean residual norm at that layer over the contrast prompts,
  so ``scale`` is a fraction of the typical residual norm.

Errors are :class:`InterventionError` (a :class:`spindiff.config.ConfigError`, i.e. a ValueError):
the CLIs print ``error: ...`` and exit 2.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import math
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spindiff.config import ConfigError, finite_number
from spindiff.lm.adapter import ArchitectureAdapter, HeadList, HeadSpecError, head_name, last_positions, parse_heads
from spindiff.lm.hooks import hooks, record

__all__ = ["InterventionError", "Intervention", "HeadGains", "ActivationAddition", "Interventions",
           "parse_head_gains", "heads_from_report", "residual_at", "contrast_vector", "load_vector",
           "interventions_from_config"]


class InterventionError(ConfigError):
    """An intervention that cannot be built (bad spec, head outside the model, zero direction ...)."""


_finite = functools.partial(finite_number, error=InterventionError)  # (x, what) -> float or InterventionError


# --------------------------------------------------------------------------- base
class Intervention:
    """A hook-based edit of the model forward. Install/remove explicitly or use ``with``."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    def _hooks(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """{hook point name: fn} (:mod:`spindiff.lm.hooks`)."""
        raise NotImplementedError

    @property
    def installed(self) -> bool:
        return self._stack is not None

    def install(self) -> "Intervention":
        if self._stack is None:
            stack = contextlib.ExitStack()
            stack.enter_context(hooks(self.adapter, self._hooks()))
            self._stack = stack
        return self

    def remove(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None

    def __enter__(self) -> "Intervention":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        return {"kind": type(self).__name__}


# --------------------------------------------------------------------------- head gains
_GAIN_RE = re.compile(r"^([^:]+):(.+)$")


def _heads(adapter: ArchitectureAdapter, spec: str, model_name: str = "") -> HeadList:
    return parse_heads(spec, adapter.n_layers, adapter.n_heads, model_name or adapter.name)


def parse_head_gains(spec: str, adapter: ArchitectureAdapter, model_name: str = "") -> dict[tuple[int, int], float]:
    """``"L29H1:0.5,L23H4:2"`` -> {(29, 1): 0.5, (23, 4): 2.0}. A head item may name a whole
    layer (``L3:0``) or ``all``; later items override earlier ones for the same head.

    Raises :class:`InterventionError` for a malformed item, a non-finite gain or a head outside
    the model (the message states the model's shape)."""
    items = [s for s in str(spec).replace(" ", "").split(",") if s]
    if not items:
        raise InterventionError("empty head-gain spec; write e.g. steer.head_gains=L29H1:0.5,L23H4:2")
    gains: dict[tuple[int, int], float] = {}
    for item in items:
        m = _GAIN_RE.match(item)
        if not m:
            raise InterventionError(f"head gain '{item}' is not HEAD:GAIN; write e.g. steer.head_gains=L29H1:0.5,L23H4:2")
        try:
            heads = _heads(adapter, m.group(1), model_name)
        except HeadSpecError as e:
            raise InterventionError(f"steer.head_gains: {e}") from None
        g = _finite(m.group(2), f"gain of {m.group(1)} in steer.head_gains")
        for lh in heads:
            gains[lh] = g
    return gains


def heads_from_report(path: str | Path, adapter: ArchitectureAdapter, role: str = "cooperative",
                      top: int = 5, model_name: str = "") -> HeadList:
    """The ``top`` heads of ``role`` from a ``heads.csv`` of ``python -m analysis all``.

    cooperative: largest r > 0 (the head's direct push tracks the model's good-vs-bad preference);
    antagonistic: most negative r. Heads outside this model are an error (the report was made on
    another model)."""
    p = Path(path)
    if role not in ("cooperative", "antagonistic"):
        raise InterventionError(f"steer.heads_role={role!r}: use cooperative or antagonistic")
    if top < 1:
        raise InterventionError(f"steer.heads_top={top}: give the number of heads to take (>= 1)")
    if not p.exists():
        raise InterventionError(f"steer.heads_report={path}: no such file; give the heads.csv written by "
                                "`python -m analysis all out=DIR` (DIR/heads.csv)")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"layer", "head", "r"} <= set(rows[0]):
        raise InterventionError(f"{path} has no layer/head/r columns; give the heads.csv of `python -m analysis all`")
    recs = [(int(r["layer"]), int(r["head"]), float(r["r"])) for r in rows if r["r"] not in ("", "nan")]
    recs = [x for x in recs if math.isfinite(x[2]) and (x[2] > 0 if role == "cooperative" else x[2] < 0)]
    recs.sort(key=lambda x: -abs(x[2]))
    heads = [(l, h) for l, h, _ in recs[:top]]
    if not heads:
        raise InterventionError(f"{path} lists no {role} head")
    try:
        _heads(adapter, ",".join(head_name(l, h) for l, h in heads), model_name)
    except HeadSpecError as e:
        raise InterventionError(f"steer.heads_report={path} does not fit this model: {e}") from None
    return heads


class HeadGains(Intervention):
    """z_h -> gain_h * z_h at the input of each layer's output projection (every position).

    Args:
        adapter: the model's adapter.
        gains: {(layer, head): gain}; heads not listed keep gain 1.
    """

    def __init__(self, adapter: ArchitectureAdapter, gains: dict[tuple[int, int], float]) -> None:
        super().__init__()
        self.adapter = adapter
        self.gains = {(int(l), int(h)): _finite(g, f"gain of {head_name(l, h)}") for (l, h), g in gains.items()}
        for l, h in self.gains:
            if not (0 <= l < adapter.n_layers and 0 <= h < adapter.n_heads):
                raise InterventionError(f"head {head_name(l, h)} is outside {adapter.name} "
                                        f"({adapter.n_layers} layers x {adapter.n_heads} heads)")
        self._vec: dict[int, Tensor] = {}
        for (l, h), g in self.gains.items():
            v = self._vec.setdefault(l, torch.ones(adapter.n_heads, 1, dtype=torch.float64))
            v[h, 0] = g

    def _hooks(self) -> dict[str, Any]:
        cache: dict[tuple, Tensor] = {}

        def gain(z: Tensor, point: Any) -> Tensor:  # z (..., H, dh) * (H, 1)
            key = (point.layer, z.dtype, z.device)
            g = cache.get(key)
            if g is None:
                g = cache[key] = self._vec[point.layer].to(dtype=z.dtype, device=z.device)
            return z * g
        return {f"blocks.{l}.attn.z": gain for l in self._vec}

    def describe(self) -> dict[str, Any]:
        return {"kind": "head_gains", "gains": {head_name(l, h): g for (l, h), g in self.gains.items()}}


# --------------------------------------------------------------------------- activation addition
def _check_layer(adapter: ArchitectureAdapter, layer: int, model_name: str = "") -> int:
    L = adapter.n_layers
    given = int(layer)
    layer = given + L if given < 0 else given
    if not 0 <= layer < L:
        raise InterventionError(f"steer.actadd.layer={given} is outside {model_name or adapter.name} (layers 0 .. "
                                f"{L - 1}; negative counts from the end)")
    return layer


@torch.no_grad()
def residual_at(model: nn.Module, adapter: ArchitectureAdapter, tokenizer: Any, texts: Sequence[str],
                layer: int, batch_size: int = 32) -> Tensor:
    """Residual stream after decoder layer ``layer`` at the last token of each text: (n, D)."""
    layer = _check_layer(adapter, layer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InterventionError(f"contrast prompt {t!r} tokenises to nothing; give visible text")
        seqs.append(ids)
    device = next(model.parameters()).device
    out: list[Tensor] = []
    with record(adapter, [f"blocks.{layer}.resid_post"], last_only=True) as acts:
        for i in range(0, len(seqs), batch_size):
            part = seqs[i:i + batch_size]
            T = max(len(s) for s in part)
            ids = torch.full((len(part), T), int(pad), dtype=torch.long)
            mask = torch.zeros((len(part), T), dtype=torch.long)
            for j, s in enumerate(part):
                ids[j, T - len(s):] = torch.tensor(s)
                mask[j, T - len(s):] = 1
            ids, mask = ids.to(device), mask.to(device)
            model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1)
            out.append(acts[f"blocks.{layer}.resid_post"])
    return torch.cat(out)


def contrast_vector(model: nn.Module, adapter: ArchitectureAdapter, tokenizer: Any, positive: Sequence[str],
                    negative: Sequence[str], layer: int, scale: float) -> tuple[Tensor, dict[str, float]]:
    """``scale * ref_norm * unit(mean h(positive) - mean h(negative))`` at layer ``layer``.

    Returns (v (D,), info) with info = {ref_norm, diff_norm}. A zero difference is an error."""
    if not positive or not negative:
        raise InterventionError("activation addition needs positive and negative contrast prompts "
                                "(steer.actadd.positive=... steer.actadd.negative=...) or steer.actadd.vector=FILE")
    hp = residual_at(model, adapter, tokenizer, positive, layer)
    hn = residual_at(model, adapter, tokenizer, negative, layer)
    diff = hp.double().mean(0) - hn.double().mean(0)
    ref = float(torch.cat([hp, hn]).double().norm(dim=-1).mean())
    dn = float(diff.norm())
    if not dn > 1e-9 * max(ref, 1e-30):
        raise InterventionError("the activation-addition direction is zero: the positive and negative contrast "
                                "prompts give the same residual stream; use prompts that differ")
    v = (scale * ref / dn) * diff
    return v.to(hp.dtype), {"ref_norm": ref, "diff_norm": dn}


def load_vector(path: str | Path, dim: int, what: str = "vector") -> Tensor:
    """A (dim,) vector from ``.npy`` (no pickle) or ``.pt`` (``torch.load(weights_only=True)``:
    a tensor, or a dict holding exactly one tensor or one under ``direction``/``vector``)."""
    p = Path(path)
    if not p.exists():
        raise InterventionError(f"{what}={path}: no such file; give a .npy or .pt file holding a ({dim},) vector")
    try:
        if p.suffix == ".npy":
            arr = torch.from_numpy(np.load(p, allow_pickle=False).astype(np.float64))
        elif p.suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
                pick = next((tensors[k] for k in ("direction", "vector") if k in tensors), None)
                if pick is None and len(tensors) == 1:
                    pick = next(iter(tensors.values()))
                if pick is None:
                    raise InterventionError(f"{what}={path} holds a dict with keys {sorted(obj)}; save one tensor "
                                            "(or a dict with key 'direction')")
                obj = pick
            if not isinstance(obj, Tensor):
                raise InterventionError(f"{what}={path} holds a {type(obj).__name__}, not a tensor")
            arr = obj.detach().double()
        else:
            raise InterventionError(f"{what}={path}: use a .npy or .pt file")
    except InterventionError:
        raise
    except Exception as e:  # unreadable / pickled content refused by weights_only
        raise InterventionError(f"{what}={path} cannot be read safely ({type(e).__name__}: {str(e)[:120]}); "
                                "save it with numpy.save or torch.save(tensor)") from None
    arr = arr.reshape(-1) if arr.dim() == 2 and 1 in arr.shape else arr
    if tuple(arr.shape) != (dim,):
        raise InterventionError(f"{what}={path} has shape {tuple(arr.shape)}; this model needs a ({dim},) vector")
    if not bool(torch.isfinite(arr).all()):
        raise InterventionError(f"{what}={path} contains NaN or inf entries")
    return arr


class ActivationAddition(Intervention):
    """h -> h + vector in the residual stream after decoder layer ``layer`` (every position).

    Args:
        adapter: the model's adapter.
        layer: decoder layer (negative counts from the end).
        vector: (D,) the addition (already scaled; see :func:`contrast_vector`).
    """

    def __init__(self, adapter: ArchitectureAdapter, layer: int, vector: Tensor, info: Optional[dict] = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.layer = _check_layer(adapter, layer)
        vector = torch.as_tensor(vector)
        if tuple(vector.shape) != (adapter.d_model,):
            raise InterventionError(f"activation-addition vector has shape {tuple(vector.shape)}; "
                                    f"{adapter.name} needs ({adapter.d_model},)")
        if not bool(torch.isfinite(vector).all()):
            raise InterventionError("activation-addition vector is not finite")
        self.vector = vector.detach()
        self.info = dict(info or {})

    def _hooks(self) -> dict[str, Any]:
        cache: dict[tuple, Tensor] = {}

        def add(h: Tensor, point: Any) -> Tensor:
            key = (h.dtype, h.device)
            v = cache.get(key)
            if v is None:
                v = cache[key] = self.vector.to(dtype=h.dtype, device=h.device)
            return h + v
        return {f"blocks.{self.layer}.resid_post": add}

    def describe(self) -> dict[str, Any]:
        return {"kind": "activation_addition", "layer": self.layer, "norm": float(self.vector.norm()), **self.info}


# --------------------------------------------------------------------------- composition
class Interventions(Intervention):
    """Several interventions installed and removed together (in order)."""

    def __init__(self, items: Iterable[Intervention] = ()) -> None:
        super().__init__()
        self.items = list(items)

    def install(self) -> "Interventions":
        for it in self.items:
            it.install()
        return self

    def remove(self) -> None:
        for it in reversed(self.items):
            it.remove()

    @property
    def installed(self) -> bool:
        return any(it.installed for it in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def describe(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [it.describe() for it in self.items]


def _split_prompts(s: str) -> list[str]:
    return [p for p in (x.strip() for x in str(s or "").split("|")) if p]


ACTADD_TEMPLATE = "This is about {}"
ACTADD_NEUTRAL = ("it", "that", "this", "things", "something", "everything")


def interventions_from_config(steer: Any, model: nn.Module, adapter: ArchitectureAdapter, tokenizer: Any,
                              words: Sequence[str] = (), model_name: str = "") -> Interventions:
    """The LM interventions a ``steer`` config section asks for (empty when none).

    ``steer.head_gains`` (spec) and ``steer.heads_report`` + ``heads_role`` + ``heads_top`` +
    ``heads_gain`` (heads from an analysis report; explicit gains win for the same head);
    ``steer.actadd.{layer,scale,positive,negative,vector}``: with no contrast prompts and a word
    set (``words``), positive = ``"This is about <word>"`` per word, negative the same template
    with neutral fillers."""
    get = (lambda o, k, d=None: o.get(k, d)) if hasattr(steer, "get") else (lambda o, k, d=None: getattr(o, k, d))
    items: list[Intervention] = []
    gains: dict[tuple[int, int], float] = {}
    report = str(get(steer, "heads_report", "") or "")
    if report:
        g = _finite(get(steer, "heads_gain", 0.0), "steer.heads_gain")
        for lh in heads_from_report(report, adapter, str(get(steer, "heads_role", "cooperative")),
                                    int(get(steer, "heads_top", 5) or 5), model_name):
            gains[lh] = g
    spec = str(get(steer, "head_gains", "") or "")
    if spec:
        gains.update(parse_head_gains(spec, adapter, model_name))
    if gains:
        items.append(HeadGains(adapter, gains))
    act = get(steer, "actadd", None)
    if act is not None:
        scale = _finite(get(act, "scale", 0.0), "steer.actadd.scale")
        vec_file = str(get(act, "vector", "") or "")
        if scale != 0:
            layer = _check_layer(adapter, int(get(act, "layer", -1)), model_name)
            if vec_file:
                v = load_vector(vec_file, adapter.d_model, "steer.actadd.vector")
                if not float(v.norm()) > 0:
                    raise InterventionError(f"steer.actadd.vector={vec_file} is the zero vector; give a nonzero direction")
                p = next(model.parameters())
                items.append(ActivationAddition(adapter, layer, (scale * v).to(p.dtype), {"source": vec_file}))
            else:
                pos, neg = _split_prompts(get(act, "positive", "")), _split_prompts(get(act, "negative", ""))
                if not pos and words:
                    pos = [ACTADD_TEMPLATE.format(w) for w in words]
                    neg = neg or [ACTADD_TEMPLATE.format(w) for w in ACTADD_NEUTRAL]
                if not pos or not neg:
                    raise InterventionError("steer.actadd.scale != 0 needs a direction: steer.actadd.positive=\"...\" "
                                            "and steer.actadd.negative=\"...\" (| separates several prompts), "
                                            "steer.words=... or steer.actadd.vector=FILE")
                v, info = contrast_vector(model, adapter, tokenizer, pos, neg, layer, scale)
                items.append(ActivationAddition(adapter, layer, v, {"scale": scale, **info}))
    return Interventions(items)


@contextlib.contextmanager
def installed(iv: Optional[Intervention]) -> Iterator[None]:
    """``with installed(iv):`` for an optional intervention (None: no-op)."""
    if iv is None:
        yield
        return
    with iv:
        yield
