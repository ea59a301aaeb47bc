"""The one hook API: named points of a model's forward pass, read, replaced or differentiated
inside a context manager (hooks are always removed in ``finally``).

Point names (``{l}`` a layer index; ``*`` in a name means every layer)::

    blocks.{l}.resid_pre       (B, T, D)     input of decoder layer l (the residual stream)
    blocks.{l}.resid_post      (B, T, D)     output of decoder layer l
    blocks.{l}.call            (args, kwargs) the decoder layer's call (read only)
    blocks.{l}.ln1.in / .out   (B, T, D)     the attention input norm's input / output
    blocks.{l}.attn.in         (B, T, D)     the attention module's input (normalised for pre-norm families)
    blocks.{l}.attn.resid_in   (B, T, D)     the residual as the attention branch reads it (ln1.in, or
                                             attn.in where the family has no input norm, e.g. OLMo2)
    blocks.{l}.attn.z          (B, T, H, dh) head outputs: the output projection's input, head-major
    blocks.{l}.attn.out        (B, T, D)     the output projection's output (bias included, before any
                                             post-attention norm)
    blocks.{l}.attn.resid_out  (B, T, D)     what the attention branch adds to the residual
                                             (post-attention norm's output for sandwich-norm families)
    blocks.{l}.ln2.in / .out   (B, T, D)     the MLP input norm's input / output
    blocks.{l}.mlp.in / .out   (B, T, D)     the MLP's input / output
    blocks.{l}.mlp.resid_in    (B, T, D)     the residual as the MLP branch reads it
    ln_final.in / .out         (B, T, D)     the final norm's input / output
    logits                     (B, T, V)     the unembedding's output (before any logit soft-capping)

A hook is ``fn(activation, point) -> Tensor | None``: returning a tensor (same shape) replaces the
activation in the forward pass; ``None`` leaves it. ``point`` is the :class:`Point` (its ``name``
and ``layer``). A name the family lacks (``blocks.0.ln1.in`` on OLMo2, which has no input norm)
raises :class:`HookPointError` naming the family.

Example (zero-ablate head 2 of layer 3 and record the final residual)::

    from spindiff.lm.hooks import hooks, record

    def ablate(z, point):
        z = z.clone(); z[..., 2, :] = 0; return z

    with hooks(adapter, {"blocks.3.attn.z": ablate}), record(adapter, ["ln_final.in"]) as acts:
        logits = model(input_ids=ids).logits
    acts["ln_final.in"]  # (B, T, D)

Gradients: ``record(adapter, names, grad=True)`` substitutes a fresh autograd node (a view) for
each activation, so ``torch.autograd.grad(out, acts[name])`` is the gradient that reaches that
point alone (for a branch input: the gradient through that branch only); names in ``leaf`` are
detached there instead (nothing before them is differentiated).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

__all__ = ["HookPointError", "Point", "hooks", "module_hooks", "record", "point_names", "expand", "resolve", "layer_values"]

Hook = Callable[[Any, "Point"], Any]


class HookPointError(KeyError):
    """A hook point name that does not parse or that the model's family does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


# point suffix -> (role of the module in the decoder layer, where: in | out | call)
_BLOCK_POINTS: dict[str, tuple[str, str]] = {
    "resid_pre": ("block", "in"), "resid_post": ("block", "out"), "call": ("block", "call"),
    "ln1.in": ("ln1", "in"), "ln1.out": ("ln1", "out"),
    "attn.in": ("attn", "in"), "attn.z": ("o_proj", "in"), "attn.out": ("o_proj", "out"),
    "ln2.in": ("ln2", "in"), "ln2.out": ("ln2", "out"),
    "mlp.in": ("mlp_in", "in"), "mlp.out": ("mlp_out", "out"),
    "attn.resid_in": ("attn_resid_in", "in"), "attn.resid_out": ("attn_resid_out", "out"),
    "mlp.resid_in": ("mlp_resid_in", "in"), "mlp.resid_out": ("mlp_resid_out", "out"),
}
_GLOBAL_POINTS: dict[str, tuple[str, str]] = {
    "ln_final.in": ("ln_final", "in"), "ln_final.out": ("ln_final", "out"), "logits": ("unembed", "out")}
_NAME_RE = re.compile(r"^blocks\.(\d+|\*)\.(.+)$")


@dataclass(frozen=True)
class Point:
    """A resolved hook point: its full name, layer (None for global points), module and side."""

    name: str
    layer: int | None
    module: nn.Module
    where: str  # "in" (forward pre-hook) | "out" (forward hook) | "call"
    heads: bool = False  # the activation is presented as (..., H, dh)


def point_names(adapter: Any) -> list[str]:
    """Every point name the adapter's model has (layer 0 shown as ``{l}``)."""
    out = [f"blocks.{{l}}.{suffix}" for suffix, (role, _) in _BLOCK_POINTS.items()
           if adapter.role_module(0, role) is not None]
    return out + list(_GLOBAL_POINTS)


def expand(adapter: Any, name: str) -> list[str]:
    """``blocks.*.x`` -> ``blocks.0.x`` .. ``blocks.{L-1}.x``; other names unchanged."""
    m = _NAME_RE.match(name)
    if m and m.group(1) == "*":
        return [f"blocks.{l}.{m.group(2)}" for l in range(adapter.n_layers)]
    return [name]


def _unknown(adapter: Any, name: str, why: str) -> HookPointError:
    fam = getattr(adapter, "family", "?")
    return HookPointError(f"hook point '{name}' {why} (family {fam}); points: {', '.join(point_names(adapter))}")


def resolve(adapter: Any, name: str) -> Point:
    """The :class:`Point` for a full name (no wildcard)."""
    if name in _GLOBAL_POINTS:
        role, where = _GLOBAL_POINTS[name]
        return Point(name, None, adapter.role_module(None, role), where)
    m = _NAME_RE.match(name)
    if not m or m.group(1) == "*":
        raise _unknown(adapter, name, "does not parse")
    layer, suffix = int(m.group(1)), m.group(2)
    if not 0 <= layer < adapter.n_layers:
        raise _unknown(adapter, name, f"is outside the model's {adapter.n_layers} layers")
    if suffix not in _BLOCK_POINTS:
        raise _unknown(adapter, name, "is not a point name")
    role, where = _BLOCK_POINTS[suffix]
    mod = adapter.role_module(layer, role)
    if mod is None:
        raise _unknown(adapter, name, "does not exist in this family")
    return Point(name, layer, mod, where, heads=suffix == "attn.z")


def _input(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The hidden-states input of a module call and a function that puts a replacement back."""
    if args:
        return args[0], lambda x: ((x,) + tuple(args[1:]), kwargs)
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if isinstance(v, Tensor))
    return kwargs[key], lambda x: (args, {**kwargs, key: x})


def _install(adapter: Any, p: Point, fn: Hook) -> Any:
    H, dh = adapter.n_heads, adapter.d_head
    if p.where == "call":
        def call_hook(mod, args, kwargs):
            fn((args, kwargs), p)
        return p.module.register_forward_pre_hook(call_hook, with_kwargs=True)
    if p.where == "in":
        def pre(mod, args, kwargs):
            x, put = _input(args, kwargs)
            act = x.view(*x.shape[:-1], H, dh) if p.heads else x
            new = fn(act, p)
            if new is None:
                return None
            return put(new.reshape(x.shape) if p.heads else new)
        return p.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        new = fn(x, p)
        if new is None:
            return None
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    return p.module.register_forward_hook(post)


@contextlib.contextmanager
def hooks(adapter: Any, fns: Mapping[str, Hook] | Iterable[tuple[str, Hook]]) -> Iterator[None]:
    """Install ``{point name: fn}`` (or ``[(name, fn), ...]``, order kept) for the duration of the
    block. Several hooks on one point run in the order given; every hook is removed on exit."""
    items = list(fns.items()) if isinstance(fns, Mapping) else list(fns)
    handles = []
    try:
        for name, fn in items:
            for full in expand(adapter, name):
                handles.append(_install(adapter, resolve(adapter, full), fn))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


@contextlib.contextmanager
def module_hooks(adapter: Any, items: Iterable[tuple[Point, Hook]]) -> Iterator[None]:
    """Install hooks on sub-modules that have no named point (e.g. an MLP's activation for a
    relevance rule): ``[(Point(name, layer, module, "in" | "out"), fn), ...]`` with the same
    ``fn(activation, point)`` contract as :func:`hooks`; every hook is removed on exit."""
    handles = []
    try:
        for p, fn in items:
            handles.append(_install(adapter, p, fn))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


@contextlib.contextmanager
def record(adapter: Any, names: Sequence[str], last_only: bool = False, grad: bool = False,
           leaf: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Record activations at ``names`` (wildcards allowed) into the yielded dict {full name: tensor}.

    Args:
        last_only: keep only the last position (``x[:, -1]``; not with ``grad``).
        grad: substitute each activation by a view of itself (its own autograd node) and keep it
            undetached, for ``torch.autograd.grad`` (module docstring).
        leaf: names (full, after expansion) whose activation is detached and made a leaf that
            requires grad (implies ``grad`` for them).
    """
    store: dict[str, Any] = {}
    leaves = {n for name in leaf for n in expand(adapter, name)}

    def fn(x: Any, p: Point) -> Any:
        if p.where == "call":
            store[p.name] = x
            return None
        if p.name in leaves:
            x = x.detach().requires_grad_(True)
        elif grad:
            x = x.view_as(x)
        else:
            store[p.name] = (x[:, -1] if last_only else x).detach()
            return None
        store[p.name] = x
        return x
    with hooks(adapter, [(n, fn) for n in names]):
        yield store


def layer_values(store: Mapping[str, Any], suffix: str) -> dict[int, Any]:
    """{layer: value} of the entries ``blocks.{l}.{suffix}`` of a :func:`record` store."""
    out = {}
    for name, v in store.items():
        m = _NAME_RE.match(name)
        if m and m.group(2) == suffix:
            out[int(m.group(1))] = v
    return out

