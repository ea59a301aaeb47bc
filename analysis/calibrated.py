"""Calibrated attribution patching: an amortised predictor of every head's ablation effect.

AtP (one forward + one backward) misses the heads whose ablation is a large perturbation (on
SmolLM2 the fully mediated heads of layers 0-1, docs/analysis.md). Those heads' effects have a
strong per-head component that carries over from prompt to prompt. So, once per model:

1. the exact ablation scan (:func:`analysis.ablation.ablation_scan`) and AtP on a small
   *calibration* prompt set, disjoint from every prompt the predictor will be asked about;
2. per head h a linear map from per-prompt features f (``features``: 1, AtP_h, optionally the
   clean logit gap of the prompt) to the exact effect, e_h ~ f . w_h, fitted by least squares
   with ridge shrinkage toward the fit pooled over the head's layer:

       w_h = argmin sum_c (e_hc - f_hc . w)^2 + lam * sum_j m_hj (w_j - w_layer,j)^2,

   m_hj = mean_c f_hcj^2 (so ``lam`` counts pseudo-prompts: lam = 0 is the head's own OLS,
   lam -> inf the layer's line). Variant and lam are chosen by k-fold cross-validation over the
   calibration prompts alone (out-of-fold pooled r), never on the prompts it predicts.

For a new prompt the prediction is f . w_h from one AtP pass: it runs no exact ablation on the
prompts it predicts, but it needs the one-time calibration scan (its cost amortised over every
later prompt; both costs are reported). Variants (:data:`VARIANTS`):

- ``mean``: w_h = the head's calibration mean (no per-prompt information: the trivial baseline);
- ``atp``: plain AtP (w = (0, 1): no calibration);
- ``layer``: e = a_l + b_l AtP, one line per layer;
- ``head``: e = a_h + b_h AtP per head, shrunk toward ``layer``;
- ``head_gap``: e = a_h + b_h AtP + c_h gap per head, shrunk toward the layer's such fit;
- ``head_gap_early``: ``head_gap`` for the heads of layers < ``early_layers``, plain AtP elsewhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from torch import Tensor, nn

from analysis.ablation import ablation_scan
from analysis.lookahead import residual_trace
from analysis.prompts import TokenizedSet
from analysis.stats import pearson_many
from spindiff.lm.adapter import ArchitectureAdapter, HeadList
from spindiff.lm.tokens import pad_left

VARIANTS = ("mean", "atp", "layer", "head", "head_gap", "head_gap_early")
LAMBDAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
_NEEDS_LAM = ("head", "head_gap", "head_gap_early")


@dataclass
class Features:
    """Per-prompt inputs of the calibrated predictor for P prompts x K heads."""

    atp: np.ndarray  # (P, K) AtP of each head (the same ablation mode as the target)
    gap: np.ndarray  # (P,) clean logit gap good - bad at the last position
    seconds: float = 0.0  # the forward + backward passes that produced them

    def subset(self, rows: Sequence[int] | np.ndarray) -> "Features":
        rows = np.asarray(rows)
        return Features(self.atp[rows], self.gap[rows], self.seconds)


def atp_features(model: nn.Module, ad: ArchitectureAdapter, ts: TokenizedSet, heads: HeadList, mode: str,
                 mean_z: dict[int, Tensor] | None, pad_id: int, batch_size: int) -> Features:
    """AtP of ``heads`` (P, K) and the clean gap (P,) from one forward + backward per batch (timed)."""
    H = ad.n_heads
    cols = np.array([l * H + h for l, h in heads])
    atp, gap, secs = [], [], 0.0
    for i in range(0, len(ts), batch_size):
        sub = ts.subset(range(i, min(i + batch_size, len(ts))))
        ids, mask = pad_left(sub.ids, pad_id)
        t0 = time.perf_counter()
        tr = residual_trace(model, ad, ids, mask, sub.good_first, sub.bad_first)
        dz = [(-tr.z[l] if mode == "zero" else mean_z[l].to(tr.z[l]) - tr.z[l]) for l in range(ad.n_layers)]
        a = np.stack([(tr.g_z[l] * dz[l]).sum((1, 3)).double().numpy() for l in range(ad.n_layers)], 1)
        secs += time.perf_counter() - t0
        atp.append(a.reshape(len(sub), -1)[:, cols])
        gap.append(tr.gap.numpy())
    return Features(np.concatenate(atp), np.concatenate(gap), secs)


def design(feat: Features, variant: str) -> np.ndarray:
    """The feature tensor (P, K, d) of ``variant`` (``mean``: (1); ``layer``/``head``: (1, AtP);
    ``head_gap*``: (1, AtP, gap))."""
    P, K = feat.atp.shape
    one = np.ones((P, K))
    if variant == "mean":
        return one[..., None]
    if variant in ("atp", "layer", "head"):
        return np.stack([one, feat.atp], -1)
    if variant in ("head_gap", "head_gap_early"):
        return np.stack([one, feat.atp, np.broadcast_to(feat.gap[:, None], (P, K))], -1)
    raise ValueError(f"calibration variant '{variant}': use one of {', '.join(VARIANTS)}")


def _layer_fit(F: np.ndarray, E: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """OLS pooled over (prompt, head of the layer) per layer: (K, d), each head gets its layer's w."""
    d = F.shape[-1]
    W = np.zeros((F.shape[1], d))
    for l in np.unique(layer):
        sel = layer == l
        X, y = F[:, sel].reshape(-1, d), E[:, sel].ravel()
        w = np.linalg.lstsq(X, y, rcond=None)[0]
        W[sel] = w
    return W


def ridge_toward(F: np.ndarray, E: np.ndarray, prior: np.ndarray, lam: float) -> np.ndarray:
    """Per-head ridge (module docstring): F (C, K, d), E (C, K), prior (K, d) -> w (K, d).
    lam = 0 is each head's OLS (least-norm where singular); lam -> inf returns the prior."""
    C, K, d = F.shape
    XtX = np.einsum("ckd,cke->kde", F, F)
    Xty = np.einsum("ckd,ck->kd", F, E)
    m = np.maximum(np.einsum("kdd->kd", XtX) / C, 1e-300)  # mean square of each feature per head
    if lam == 0:
        return np.stack([np.linalg.lstsq(F[:, k], E[:, k], rcond=None)[0] for k in range(K)])
    A = XtX + lam * np.einsum("kd,de->kde", m, np.eye(d))
    return np.linalg.solve(A, (Xty + lam * m * prior)[..., None])[..., 0]


@dataclass
class Calibration:
    """A fitted calibrated predictor: prediction = design(features, variant) . w per head."""

    variant: str
    lam: float
    w: np.ndarray  # (K, d)
    layer: np.ndarray  # (K,) layer of each head
    early_layers: int
    prompt_ids: list[int] = field(default_factory=list)  # the calibration prompts (of their set)
    cv: dict[str, dict[float, float]] = field(default_factory=dict)  # variant -> lam -> out-of-fold r
    seconds: float = 0.0  # one-time cost: the calibration scan + its AtP

    def predict(self, feat: Features) -> np.ndarray:
        """(P, K) predicted exact effect for new prompts' features."""
        if self.variant == "atp":
            return feat.atp.copy()
        out = np.einsum("pkd,kd->pk", design(feat, self.variant), self.w)
        if self.variant == "head_gap_early":
            late = self.layer >= self.early_layers
            out[:, late] = feat.atp[:, late]
        return out


def fit(feat: Features, exact: np.ndarray, layer: np.ndarray, variant: str, lam: float = 0.0,
        early_layers: int = 2) -> Calibration:
    """Fit ``variant`` on calibration features and exact effects (C, K)."""
    if variant not in VARIANTS:
        raise ValueError(f"calibration variant '{variant}': use one of {', '.join(VARIANTS)}")
    F = design(feat, variant)
    if variant == "atp":
        w = np.tile([0.0, 1.0], (exact.shape[1], 1))
    elif variant == "mean":
        w = exact.mean(0)[:, None]
    elif variant == "layer":
        w = _layer_fit(F, exact, layer)
    else:
        w = ridge_toward(F, exact, _layer_fit(F, exact, layer), lam)
    return Calibration(variant, lam, w, np.asarray(layer), early_layers)


def _r(pred: np.ndarray, eff: np.ndarray) -> float:
    return float(pearson_many(pred.reshape(-1, 1), eff.ravel())[0])


def cross_validate(feat: Features, exact: np.ndarray, layer: np.ndarray, folds: int = 8,
                   variants: Sequence[str] = VARIANTS, lambdas: Sequence[float] = LAMBDAS,
                   early_layers: int = 2) -> dict[str, dict[float, float]]:
    """Out-of-fold pooled r of every (variant, lam) over ``folds`` contiguous prompt folds of the
    calibration set: variant -> lam -> r (lam is 0 for the variants that have none)."""
    C = exact.shape[0]
    folds = max(2, min(folds, C))
    parts = np.array_split(np.arange(C), folds)
    out: dict[str, dict[float, float]] = {}
    for v in variants:
        out[v] = {}
        for lam in (lambdas if v in _NEEDS_LAM else (0.0,)):
            pred = np.zeros_like(exact)
            for te in parts:
                tr = np.setdiff1d(np.arange(C), te)
                cal = fit(feat.subset(tr), exact[tr], layer, v, lam, early_layers)
                pred[te] = cal.predict(feat.subset(te))
            out[v][float(lam)] = _r(pred, exact)
    return out


def calibrate(feat: Features, exact: np.ndarray, layer: np.ndarray, variant: str = "auto", folds: int = 8,
              early_layers: int = 2, prompt_ids: Sequence[int] = (), seconds: float = 0.0) -> Calibration:
    """Pick (variant, lam) by cross-validation on the calibration set (``variant`` auto: among all
    but ``mean`` and ``atp``; a named variant: its lam alone) and refit on the whole set."""
    if variant != "auto" and variant not in VARIANTS:
        raise ValueError(f"calibration variant '{variant}': use auto or one of {', '.join(VARIANTS)}")
    cands = [v for v in VARIANTS if v not in ("mean", "atp")] if variant == "auto" else [variant]
    cv = cross_validate(feat, exact, layer, folds, VARIANTS, early_layers=early_layers)
    v, lam = max(((v, lam) for v in cands for lam in cv[v]), key=lambda t: cv[t[0]][t[1]])
    cal = fit(feat, exact, layer, v, lam, early_layers)
    cal.cv, cal.prompt_ids, cal.seconds = cv, list(prompt_ids), seconds
    return cal


def calibration_ids(n_rows: int, valid: np.ndarray | Sequence[bool], n: int, exclude: Sequence[int]) -> list[int]:
    """``n`` calibration prompt ids, evenly spaced over the usable rows of a set that are not in
    ``exclude`` (the prompts that will be predicted): disjoint from them by construction."""
    ex = set(int(i) for i in exclude)
    pool = [i for i in range(n_rows) if bool(valid[i]) and i not in ex]
    if n <= 0 or n >= len(pool):
        return pool
    return [pool[j] for j in sorted(set(np.linspace(0, len(pool) - 1, n).round().astype(int).tolist()))]


def calibration_scan(model: nn.Module, ad: ArchitectureAdapter, ts: TokenizedSet, heads: HeadList, mode: str,
                     mean_z: dict[int, Tensor] | None, pad_id: int, batch_size: int
                     ) -> tuple[Features, np.ndarray, float]:
    """The one-time calibration data of one mode: features, exact effect (C, K), and the seconds of
    the exact scan + AtP pass together."""
    t0 = time.perf_counter()
    exact = ablation_scan(model, ad, ts, heads, mode, mean_z, pad_id, batch_size, progress=False).effect
    feat = atp_features(model, ad, ts, heads, mode, mean_z, pad_id, batch_size)
    return feat, exact, time.perf_counter() - t0


def summary(cal: Calibration) -> dict[str, Any]:
    """JSON-ready record of a calibration (chosen variant, lam, CV table, prompts, one-time cost)."""
    return {"variant": cal.variant, "lam": cal.lam, "n_prompts": len(cal.prompt_ids), "prompt_ids": cal.prompt_ids,
            "seconds": cal.seconds, "cv_r": {v: {str(k): r for k, r in d.items()} for v, d in cal.cv.items()}}


# --------------------------------------------------------------------------- the `beyond` stage
ROWS = ("calibrated", "calib_mean")


def prompt_set_ids(A: Any, spec: str) -> list[int]:
    """The prompts the predictor table evaluates on set ``spec``: the scan prompts of ``prompts``,
    else ``scan_prompts`` evenly spaced usable rows (as :func:`analysis.predictor_table.prompt_set_table`)."""
    from analysis.pipeline import _evenly

    if spec == A.cfg.prompts:
        return A.scan_ids()
    gt = A.gaps(spec)
    return [i for i in _evenly(len(A.tset(spec)), A.cfg.scan_prompts) if gt.valid[i]]


def fit_for(A: Any, bc: Any) -> dict[str, Calibration]:
    """The run's calibrations (cached on ``A``): per mode the chosen variant (``mode``) and the
    calibration-mean baseline (``mode:mean``), from one exact scan + AtP pass of
    ``bc.calibration_prompts`` prompts of ``bc.calibration`` that the table never evaluates."""
    if "calibration" in A.cache:
        return A.cache["calibration"]
    c, spec = A.cfg, str(bc.calibration)
    exclude = list(A.scan_ids()) if spec == c.prompts else []
    if bc.heldout and c.heldout and spec == str(c.heldout):
        exclude += prompt_set_ids(A, spec)
    gt = A.gaps(spec)
    ids = calibration_ids(len(A.tset(spec)), gt.valid, bc.calibration_prompts, exclude)
    if len(ids) < 4:
        from spindiff.config import ConfigError

        raise ConfigError(f"beyond.calibration={spec}: only {len(ids)} usable prompts left once the predicted ones "
                          "are excluded; use a larger set (e.g. beyond.calibration=extended)")
    ts, heads = A.tset(spec).subset(ids), A.scan_heads()
    layer = np.array([l for l, _ in heads])
    out: dict[str, Calibration] = {}
    for m in ("zero", "mean"):
        feat, exact, secs = calibration_scan(A.model, A.ad, ts, heads, m, A.mean_z() if m == "mean" else None,
                                             A.pad_id, c.batch_size)
        out[m] = calibrate(feat, exact, layer, bc.calibration_variant, bc.calibration_folds, prompt_ids=ids,
                           seconds=secs)
        out[f"{m}:mean"] = fit(feat, exact, layer, "mean")
        out[f"{m}:mean"].prompt_ids, out[f"{m}:mean"].seconds = ids, secs
        A.timings[f"calibration[{m}]"] = secs
    A.cache["calibration"] = out
    return out


def rows(A: Any, bc: Any, spec: str, ids: Sequence[int], mode: str) -> dict[str, tuple[np.ndarray, float, str]]:
    """The calibrated rows on prompts ``ids`` of set ``spec``: name -> (prediction (P, K), seconds
    on these prompts (the calibration excluded: it is reported apart), label)."""
    cals = fit_for(A, bc)
    cal, base = cals[mode], cals[f"{mode}:mean"]
    if spec == str(bc.calibration) and set(ids) & set(cal.prompt_ids):  # cannot happen: fit_for excludes them
        raise RuntimeError(f"calibration prompts {sorted(set(ids) & set(cal.prompt_ids))} are also predicted")
    c = A.cfg
    feat = atp_features(A.model, A.ad, A.tset(spec).subset(list(ids)), A.scan_heads(), mode,
                        A.mean_z() if mode == "mean" else None, A.pad_id, c.batch_size)
    t0 = time.perf_counter()
    pred = cal.predict(feat)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = base.predict(feat)
    t_mean = max(time.perf_counter() - t0, 1e-6)
    once = f"one-time exact scan of {len(cal.prompt_ids)} {bc.calibration} prompts, {cal.seconds:.0f} s"
    lam = f", lam {cal.lam:g}" if cal.variant in _NEEDS_LAM else ""
    return {"calibrated": (pred, feat.seconds + t_fit, f"calibrated AtP ({cal.variant}{lam}; {once})"),
            "calib_mean": (mean, t_mean, f"per-head calibration mean, no per-prompt information ({once})")}
