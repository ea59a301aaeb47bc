"""Predictors of every head's single-head ablation effect past attribution patching: integrated
gradients along the ablation path (EAP-IG style) and relevance patching (RelP, LRP rules).

Target. Head (l, h)'s z (input of W_O, every position) replaced by z' (0, or the mean z):
e_lh = dL(z_lh -> z'_lh) - dL. Its exact line integral along its own path z_lh(a) = z + a (z' - z):

    e_lh = int_0^1 < d dL / d z_lh (a), z' - z > da                    (per-head IG, exact as S grows)

**IG, batched** (:func:`ig_attribution`). Heads are put in *groups* whose members are
interpolated together: every z of the group's heads -> z + a (z' - z), the rest untouched; the
attribution of head h of group G is the Riemann sum of < g_h(a), z'_h - z_h(a) > over ``steps``
values of a (``rule`` left: a = s / S, s = 0 .. S-1, so one step *is* AtP; midpoint:
a = (s + 1/2) / S); z_h(a) is the z the interpolated run computes (equal to z for heads that
nothing interpolated feeds). By the fundamental theorem of calculus along the path, the terms of
a group sum to the exact effect of ablating the *whole group* as S grows (error O(1/S), O(1/S^2)
for midpoint; tested). A group of one head gives its exact single-head effect (cost: S passes
per head, more than the exact scan); ``layer`` groups (all heads of one layer together) need
S passes per layer, ``joint`` (all heads of the model, what EAP-IG does with its input
interpolation) S passes in all but measures each head in a context where every other head is
ablated too. The left rule's a = 0 term is shared by all groups (one pass).

Every pass is one forward + one backward of B prompts x (group, step) rows at once
(``max_rows`` a chunk), from one hook at each output projection.

**RelP** (:func:`relp_rules`; Jafari et al. 2025): the gradient of AtP is replaced by the
propagation coefficients of layer-wise relevance propagation, implemented as a modified backward
(the forward values are unchanged):

- norms (LayerNorm, RMSNorm: input, post-attention and final): the LN-rule, the 1/std (1/rms)
  scale is a constant: y = w * centre(x) * s, s frozen (centring, for LayerNorm, is kept: linear);
- attention: the AH-rule, the attention weights are constants: z = alpha v with alpha frozen, so
  relevance flows only through the values (queries and keys get none);
- MLP activation: the identity rule, act(x) = (act(x) / x) * x with the ratio frozen;
- gated MLP (Llama: act(gate) * up): the half rule, each factor receives half of the product's
  relevance (d/d gate-part = u / 2, d/d up = act / 2).

With these rules the network is linear in its residual stream at the actual forward point, so
relevance R = sum x * g_mod is *conserved* from the logit gap down to every layer's residual
when the model has no biases (biases absorb relevance: GPT-2's and the tiny Llama's attention
biases; tested on bias-free copies). RelP(l, h) = < g_mod at z_lh, z' - z >.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from analysis.ablation import ablation_check
from analysis.attention import attend, check_supported
from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.field import last_positions
from spindiff.lm.hooks import Point, hooks, module_hooks, record

GROUPINGS = ("joint", "layer", "head")
RULES = ("left", "midpoint")
Groups = list[list[tuple[int, int]]]


@dataclass
class BeyondConfig:
    """``beyond.*`` keys of ``python -m analysis beyond`` (the predictors past AtP; docs/analysis.md)."""

    ig_steps: int = 4  # integration steps of every IG predictor
    ig_rule: str = "left"  # left (a = s/S: one step is AtP) | midpoint (a = (s + 1/2)/S)
    ig_layers: int = 2  # ig_layer / ig_head: IG for the heads of layers < this, AtP for the rest (0 = off)
    ig_head: bool = False  # per-head IG (the exact target's line integral) on those layers: steps passes per head
    relp: bool = True  # the RelP row (LRP rules)
    lookahead_k: int = 4  # lookahead: each head's ablation run exactly through this many layers (0 = off)
    lookahead_layers: int = 1  # ... for the heads of layers < this, AtP for the rest
    heldout: bool = False  # also the table on the `heldout` prompt set (its own exact scans)
    max_rows: int = 256  # rows (prompts x interpolation points / heads) per forward
    # calibrated AtP (analysis/calibrated.py): a one-time exact scan of calibration prompts
    calibration: str = ""  # prompt set of the calibration scan ("" = off; prompts it predicts are left out)
    calibration_prompts: int = 32  # calibration prompts (evenly spaced usable rows, disjoint from the predicted)
    calibration_variant: str = "auto"  # auto (cross-validated on the calibration set) | one of calibrated.VARIANTS
    calibration_folds: int = 8  # cross-validation folds over the calibration prompts


def check_beyond(bc: BeyondConfig) -> None:
    """Ranges and choices of the ``beyond.*`` keys (ConfigError names the key and a valid value)."""
    from spindiff.config import ConfigError

    if bc.ig_rule not in RULES:
        raise ConfigError(f"beyond.ig_rule={bc.ig_rule}: use one of {', '.join(RULES)} (e.g. beyond.ig_rule=left)")
    for key, low in (("ig_steps", 1), ("ig_layers", 0), ("lookahead_k", 0), ("lookahead_layers", 0), ("max_rows", 1),
                     ("calibration_prompts", 4), ("calibration_folds", 2)):
        if int(getattr(bc, key)) < low:
            raise ConfigError(f"beyond.{key}={getattr(bc, key)}: must be >= {low} (default {getattr(BeyondConfig, key)})")
    from analysis.calibrated import VARIANTS  # calibrated AtP (issue 20)

    if bc.calibration_variant not in ("auto", *VARIANTS):
        raise ConfigError(f"beyond.calibration_variant={bc.calibration_variant}: use auto or one of "
                          f"{', '.join(VARIANTS)} (e.g. beyond.calibration_variant=auto)")
    if bc.calibration and str(bc.calibration).lower() != "none":
        from analysis.prompts import load_prompts

        load_prompts(str(bc.calibration))  # PromptFileError (one line) if it is neither bundled nor a file


def make_groups(ad: ArchitectureAdapter, grouping: str, layers: Sequence[int] | None = None) -> Groups:
    """Interpolation groups over the heads of ``layers`` (default all): one group of all of
    them (``joint``), one per layer (``layer``) or one per head (``head``)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"IG grouping '{grouping}': use one of {', '.join(GROUPINGS)}")
    layers = list(range(ad.n_layers)) if layers is None else list(layers)
    heads = [(l, h) for l in layers for h in range(ad.n_heads)]
    if grouping == "joint":
        return [heads] if heads else []
    if grouping == "layer":
        return [[(l, h) for h in range(ad.n_heads)] for l in layers]
    return [[hd] for hd in heads]


def alphas(steps: int, rule: str) -> list[float]:
    """The interpolation points of the Riemann sum (``rule`` left: s / S; midpoint: (s + 1/2) / S)."""
    if steps < 1:
        raise ValueError(f"IG steps={steps}: must be >= 1")
    if rule not in RULES:
        raise ValueError(f"IG rule '{rule}': use one of {', '.join(RULES)}")
    return [(s + (0.5 if rule == "midpoint" else 0.0)) / steps for s in range(steps)]


# --------------------------------------------------------------------------- hooks (spindiff.lm.hooks)
RELP_FAMILIES = ("gpt2", "llama")  # the MLP rules name these families' activation / gate modules


def _frozen_scale_output(norm: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """LN-rule: y's value, gradient of w * centre(x) * s with the scale s frozen."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    xf = x.to(y.dtype)
    if isinstance(norm, nn.LayerNorm):
        xc = xf - xf.mean(-1, keepdim=True)
    else:
        xc = xf
    s = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    w = norm.weight.to(y.dtype)
    return y.detach() + w * (xc - xc.detach()) * s.detach()


def _identity_rule(x: Tensor, y: Tensor) -> Tensor:
    """act: y's value, gradient of (y / x) * x with the ratio frozen (ratio 1/2 at x = 0)."""
    small = x.abs() < 1e-12
    ratio = torch.where(small, torch.full_like(y, 0.5), y / torch.where(small, torch.ones_like(x), x))
    return y.detach() + ratio.detach() * (x - x.detach())


def _mlp_rules(ad: ArchitectureAdapter, l: int) -> list[tuple[Point, Any]]:
    """Hooks on layer l's MLP sub-modules (no named point): identity rule on the activation, half
    rule on a gate (Llama); for :func:`spindiff.lm.hooks.module_hooks`."""
    mlp = ad.layers()[l].mlp
    act = mlp.act if ad.family == "gpt2" else mlp.act_fn
    parts: dict[str, Tensor] = {}

    def act_in(x, p):
        parts["x"] = x

    def act_out(y, p):
        parts["a"] = _identity_rule(parts["x"], y)
        return parts["a"]
    rules = [(Point(f"blocks.{l}.mlp.act.in", l, act, "in"), act_in),
             (Point(f"blocks.{l}.mlp.act.out", l, act, "out"), act_out)]
    if ad.family == "gpt2":
        return rules

    def up_out(y, p):
        parts["u"] = y

    def down_in(x, p):  # half rule on act(gate) * up
        a, u = parts["a"], parts["u"]
        return x.detach() + 0.5 * ((a - a.detach()) * u.detach() + a.detach() * (u - u.detach()))
    return rules + [(Point(f"blocks.{l}.mlp.up.out", l, mlp.up_proj, "out"), up_out),
                    (Point(f"blocks.{l}.mlp.down.in", l, mlp.down_proj, "in"), down_in)]


@contextlib.contextmanager
def relp_rules(ad: ArchitectureAdapter, mask: Tensor) -> Iterator[dict[int, Tensor]]:
    """The RelP rules of the module docstring on the model's forward (values unchanged, backward
    modified) for a left-padded batch with attention ``mask`` (R, T): norms and attention on the
    hook points of :mod:`spindiff.lm.hooks`, the MLP rules as module hooks. Yields a dict that
    the forward fills with each layer's rule-applied z (R, T, H, dh)."""
    check_supported(ad)
    if ad.family not in RELP_FAMILIES or ad.parallel:
        raise NotImplementedError(f"RelP rules are written for the {' and '.join(RELP_FAMILIES)} families "
                                  f"(sequential residual); this model is '{ad.family}'")
    pos = last_positions(mask)
    seen: dict[str, Tensor] = {}
    zs: dict[int, Tensor] = {}

    def keep(x: Tensor, p) -> None:
        seen[p.name.rsplit(".", 1)[0]] = x

    def norm_rule(y: Tensor, p) -> Tensor:
        return _frozen_scale_output(p.module, seen[p.name.rsplit(".", 1)[0]], y)

    def attn_rule(z: Tensor, p) -> Tensor:  # AH-rule: z = alpha v, alpha frozen (recomputed; equals z)
        n = seen[f"blocks.{p.layer}.attn"]
        a = attend(ad, p.layer, n, n, n, mask, pos)
        zs[p.layer] = z.detach() + (a.alpha.detach() @ (a.v - a.v.detach())).transpose(1, 2).to(z.dtype)
        return zs[p.layer]
    fns = [("blocks.*.ln1.in", keep), ("blocks.*.ln1.out", norm_rule), ("blocks.*.ln2.in", keep),
           ("blocks.*.ln2.out", norm_rule), ("ln_final.in", keep), ("ln_final.out", norm_rule),
           ("blocks.*.attn.in", keep), ("blocks.*.attn.z", attn_rule)]
    with hooks(ad, fns), module_hooks(ad, [r for l in range(ad.n_layers) for r in _mlp_rules(ad, l)]):
        yield zs


@contextlib.contextmanager
def interpolate_z(ad: ArchitectureAdapter, coef: Tensor, mode: str, mean_z: dict[int, Tensor] | None,
                  store: dict[int, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Row r's z_lh -> z + coef[r, l, h] (z' - z) at every ``blocks.{l}.attn.z`` (``coef``
    (R, L, H)); ``store[l]`` = (interpolated z (R, T, H, dh), z' - z of this run, detached).
    Entered after :func:`relp_rules` when both are on, so it acts on the rule-applied z."""
    def fn(z: Tensor, p) -> Tensor:
        tgt = torch.zeros_like(z) if mode == "zero" else mean_z[p.layer].to(z).expand_as(z)
        d = tgt - z
        zi = z + coef[:, p.layer, None, :, None].to(z) * d
        store[p.layer] = (zi, d.detach())
        return zi
    with hooks(ad, {"blocks.*.attn.z": fn}):
        yield


# --------------------------------------------------------------------------- one batched pass
def _gap_rows(model: nn.Module, ids: Tensor, mask: Tensor, good: Tensor, bad: Tensor) -> Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1,
                use_cache=False)
    lg = out.logits[:, -1]
    return lg.gather(-1, good[:, None])[:, 0] - lg.gather(-1, bad[:, None])[:, 0]


def attribution_pass(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                     bad: Tensor, coef: Tensor, mode: str = "zero", mean_z: dict[int, Tensor] | None = None,
                     relp: bool = False) -> tuple[Tensor, Tensor]:
    """One forward + backward of R rows (prompts already repeated): z of row r interpolated by
    ``coef`` (R, L, H), RelP rules on or off. Returns (< d gap / d z_lh, z'_lh - z_lh > (R, L, H)
    float64, gap (R,) float64)."""
    ablation_check(mode, mean_z)
    store: dict[int, tuple[Tensor, Tensor]] = {}
    with contextlib.ExitStack() as st, torch.enable_grad():
        if relp:
            st.enter_context(relp_rules(ad, mask))
        st.enter_context(interpolate_z(ad, coef, mode, mean_z, store))
        gap = _gap_rows(model, ids, mask, good, bad)
        L = ad.n_layers
        grads = torch.autograd.grad(gap.sum(), [store[l][0] for l in range(L)], allow_unused=True)
    terms = torch.stack([torch.zeros(coef.shape[0], ad.n_heads, dtype=torch.float64) if g is None
                         else (g * store[l][1]).sum((1, 3)).double() for l, g in enumerate(grads)], 1)
    return terms, gap.detach().double()


@dataclass
class IGResult:
    """attribution (B, L, H) float64 (heads outside every group: NaN), the passes (rows / B) it
    took, and seconds."""

    attribution: np.ndarray
    passes: int
    seconds: float


def ig_attribution(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor, bad: Tensor,
                   groups: Groups, steps: int, mode: str = "zero", mean_z: dict[int, Tensor] | None = None,
                   rule: str = "left", relp: bool = False, max_rows: int = 256) -> IGResult:
    """Integrated gradients of every head of ``groups`` (module docstring) on a left-padded batch
    of B prompts: sum over the steps of < g_h(a), z'_h - z_h(a) > / S. With ``relp`` the
    gradients are RelP's (rules applied at every interpolation point)."""
    t0 = time.perf_counter()
    B = ids.shape[0]
    L, H = ad.n_layers, ad.n_heads
    al = alphas(steps, rule)
    units: list[tuple[int, float]] = []  # (group index or -1 for the shared a = 0 row, alpha)
    if al[0] == 0.0 and groups:
        units.append((-1, 0.0))
    units += [(g, a) for g in range(len(groups)) for a in al if a != 0.0]
    member = torch.zeros(len(groups), L, H, dtype=torch.float64)
    for g, grp in enumerate(groups):
        for l, h in grp:
            member[g, l, h] = 1.0
    acc = torch.zeros(B, L, H, dtype=torch.float64)
    per = max(1, max_rows // B)
    for c in range(0, len(units), per):
        chunk = units[c:c + per]
        U = len(chunk)
        coef = torch.stack([a * member[g] if g >= 0 else torch.zeros(L, H, dtype=torch.float64)
                            for g, a in chunk])  # (U, L, H)
        coef = coef.repeat_interleave(B, 0)  # row u * B + b
        terms, _ = attribution_pass(model, ad, ids.repeat(U, 1), mask.repeat(U, 1), good.repeat(U), bad.repeat(U),
                                    coef, mode, mean_z, relp)
        terms = terms.view(U, B, L, H)
        for u, (g, _) in enumerate(chunk):
            m = member.sum(0).clamp(max=1) if g < 0 else member[g]
            acc += terms[u] * m
    out = (acc / steps).numpy()
    covered = member.sum(0).numpy() > 0
    out[:, ~covered] = np.nan
    return IGResult(out, len(units), time.perf_counter() - t0)


def relp(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor, bad: Tensor,
         mode: str = "zero", mean_z: dict[int, Tensor] | None = None) -> np.ndarray:
    """RelP of every head: < g_mod at z_lh, z'_lh - z_lh > (B, L, H) float64 (one forward + backward)."""
    coef = torch.zeros(ids.shape[0], ad.n_layers, ad.n_heads, dtype=torch.float64)
    return attribution_pass(model, ad, ids, mask, good, bad, coef, mode, mean_z, relp=True)[0].numpy()


def residual_relevance(model: nn.Module, ad: ArchitectureAdapter, ids: Tensor, mask: Tensor, good: Tensor,
                       bad: Tensor) -> tuple[Tensor, Tensor]:
    """Under the RelP rules: (relevance sum x . g_mod of the residual entering each decoder layer
    and the final norm, over positions and features (B, L + 1) float64; the gap (B,))."""
    names = ["blocks.*.resid_pre", "ln_final.in"]
    with record(ad, names, grad=True) as g, relp_rules(ad, mask), torch.enable_grad():
        gap = _gap_rows(model, ids, mask, good, bad)
        wanted = [g[f"blocks.{l}.resid_pre"] for l in range(ad.n_layers)] + [g["ln_final.in"]]
        grads = torch.autograd.grad(gap.sum(), wanted)
    rel = torch.stack([(x.detach() * gr).sum((1, 2)).double() for x, gr in zip(wanted, grads)], 1)
    return rel, gap.detach().double()
