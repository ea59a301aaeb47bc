"""Sweep of the predictors past attribution patching against the exact zero-ablation scan.

    python bench/sweep_predictors.py [--model smollm2-135m] [--prompts 16] [--prompt-set extended]
                                     [--exact runs/sweep/exact.npy]

The scan prompts are chosen as in ``bench/bench_attribution.py`` (evenly spaced, shared first
tokens dropped). Every row: pooled r, r of head means, Spearman, top-10 recall, explained variance
and r over the heads of layers 0-1 ("early") and of the rest ("late"), and its seconds in this
process (the exact scan's seconds printed first; ``--exact FILE`` caches the scan's effect matrix).
Rows: AtP; IG with all heads interpolated jointly (2 and 4 steps, left and midpoint rule); IG per
layer for layers 0-1 (2 steps) + AtP; RelP; lookahead k = 1, 2, 4, 8 for the heads of layers < 1,
< 2, < 3 + AtP (docs/analysis.md, "Past attribution patching").

``--calibrate N``: calibrated AtP (:mod:`analysis.calibrated`): a one-time exact scan of N prompts
of the same set, disjoint from the scan prompts (cached next to ``--exact`` as ``*.calN.npz``),
every variant fitted there (lam by cross-validation on those N alone) and evaluated on the scan
prompts, plus the per-head calibration mean; ``--calibration-only`` skips the other rows.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from analysis.ablation import ablation_scan
from analysis.compare import compare_predictors
from analysis.gaps import pad_token_id
from analysis.lookahead import lookahead, residual_trace, unembed_rows
from analysis.pipeline import _evenly
from analysis.predictors import ig_attribution, make_groups, relp
from analysis.prompts import load_prompts, tokenize_set
from spindiff.config import ModelConfig
from spindiff.lm.adapter import get_adapter
from spindiff.lm.models import context_window, load_model
from spindiff.lm.tokens import pad_left


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-set", default="extended")
    ap.add_argument("--exact", default="", help="cache file (.npy) of the exact scan's effect matrix")
    ap.add_argument("--calibrate", type=int, default=0, help="calibrated AtP rows: N calibration prompts")
    ap.add_argument("--calibration-only", action="store_true", help="AtP and the calibrated rows only")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm = load_model(ModelConfig(name=args.model, dtype="float32"))
    model, tok = lm.model, lm.tokenizer
    ad = get_adapter(model, lm.name)
    pad = pad_token_id(tok)
    full = tokenize_set(tok, load_prompts(args.prompt_set), context_window(model) or 10**9, warn=False)
    ts = full.subset(_scan_ids(len(full), args.prompts, set(full.shared_first)))
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    ids, mask = pad_left(ts.ids, pad)
    g, b = ts.good_first, ts.bad_first
    P = len(ts)
    cache = Path(args.exact) if args.exact else None
    if cache is not None and cache.exists():
        exact = np.load(cache)
    else:
        t0 = time.perf_counter()
        exact = ablation_scan(model, ad, ts, heads, "zero", None, pad, P, progress=False).effect
        print(f"exact zero-ablation scan: {time.perf_counter() - t0:.2f} s", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, exact)
    print(f"model {lm.name}, {len(heads)} heads x {P} prompts ({args.prompt_set}); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    early = np.array([l < 2 for l, _ in heads])
    out = {}

    def show(name: str, pred: np.ndarray, secs: float) -> None:
        pred = pred.reshape(P, -1)
        r = compare_predictors({name: pred}, exact, 200, 0)[name]
        rl = np.corrcoef(pred[:, ~early].ravel(), exact[:, ~early].ravel())[0, 1]
        re = np.corrcoef(pred[:, early].ravel(), exact[:, early].ravel())[0, 1]
        sp = spearmanr(pred.ravel(), exact.ravel())[0]
        out[name] = {"r": r["r"], "r_means": r["r_means"], "spearman": sp, "recall10": r["recall10"],
                     "explained": r["explained"], "r_early": re, "r_late": rl, "seconds": secs}
        print(f"{name:34s} {secs:7.2f}s r={r['r']:.3f} r_means={r['r_means']:.3f} spearman={sp:.3f} "
              f"recall10={r['recall10']:.1f} explained={r['explained']:.2f} r_early={re:.3f} r_late={rl:.3f}",
              flush=True)

    residual_trace(model, ad, ids, mask, g, b)  # warm-up
    t0 = time.perf_counter()
    tr = residual_trace(model, ad, ids, mask, g, b)
    t_trace = time.perf_counter() - t0
    atp = torch.stack([(tr.g_z[l] * -tr.z[l]).sum((1, 3)).double() for l in range(ad.n_layers)], 1).numpy()
    show("atp", atp, t_trace)

    def timed(name, fn, extra=0.0):
        t0 = time.perf_counter()
        pred = fn()
        show(name, pred, time.perf_counter() - t0 + extra)

    def fill(a):
        a = a.copy()
        a[np.isnan(a)] = atp[np.isnan(a)]
        return a
    if args.calibrate:
        _calibrated_rows(args, model, ad, full, ts, heads, pad, exact, show)
    if args.calibration_only:
        return out
    for rule in ("left", "midpoint"):
        for S in (2, 4):
            timed(f"ig_joint_{rule}_S{S}", lambda: ig_attribution(model, ad, ids, mask, g, b, make_groups(ad, "joint"),
                                                                  S, rule=rule).attribution)
    timed("ig_layer01_left_S2+atp", lambda: fill(ig_attribution(model, ad, ids, mask, g, b,
                                                                make_groups(ad, "layer", [0, 1]), 2).attribution), t_trace)
    timed("relp", lambda: relp(model, ad, ids, mask, g, b))
    ue = unembed_rows(model, ad, g, b)
    for nl in (1, 2, 3):
        sel = [i for i, (l, _) in enumerate(heads) if l < nl]
        for k in (1, 2, 4, 8):
            def la():
                pred = atp.reshape(P, -1).copy()
                pred[:, sel] = lookahead(ad, tr, [heads[i] for i in sel], k, ue)
                return pred
            timed(f"lookahead_k{k}_layers<{nl}+atp", la, t_trace)
    return out


def _calibrated_rows(args, model, ad, full, ts, heads, pad, exact, show) -> None:
    """The calibrated-AtP rows (module docstring): calibration scan cached, CV on it alone."""
    from analysis.calibrated import VARIANTS, Features, atp_features, calibrate, calibration_ids, fit

    shared = set(full.shared_first)
    cal_ids = calibration_ids(len(full), [i not in shared for i in range(len(full))], args.calibrate,
                              _scan_ids(len(full), args.prompts, shared))  # disjoint from the scan prompts
    cache = Path(args.exact).with_suffix(f".cal{args.calibrate}.npz") if args.exact else None
    cts = full.subset(cal_ids)
    if cache is not None and cache.exists():
        z = np.load(cache)
        assert z["ids"].tolist() == cal_ids, "stale calibration cache: delete it"
        feat, ex = Features(z["atp"], z["gap"]), z["exact"]
    else:
        t0 = time.perf_counter()
        ex = ablation_scan(model, ad, cts, heads, "zero", None, pad, 8, progress=False).effect
        feat = atp_features(model, ad, cts, heads, "zero", None, pad, 8)
        print(f"calibration scan ({len(cal_ids)} prompts, disjoint from the scan prompts): "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
        if cache is not None:
            np.savez(cache, ids=np.array(cal_ids), atp=feat.atp, gap=feat.gap, exact=ex)
    layer = np.array([l for l, _ in heads])
    cal = calibrate(feat, ex, layer, "auto", 8)
    print("calibration CV (out-of-fold pooled r on the calibration prompts): " + "; ".join(
        f"{v} " + " ".join(f"{lam:g}:{r:.3f}" for lam, r in cal.cv[v].items()) for v in VARIANTS), flush=True)
    new = atp_features(model, ad, ts, heads, "zero", None, pad, len(ts))
    show("calib_mean (no per-prompt info)", fit(feat, ex, layer, "mean").predict(new), 1e-6)
    show("calib_layer", fit(feat, ex, layer, "layer").predict(new), new.seconds)
    for v in ("head", "head_gap", "head_gap_early"):
        lam = max(cal.cv[v], key=cal.cv[v].get)
        show(f"calib_{v} (lam {lam:g})", fit(feat, ex, layer, v, lam).predict(new), new.seconds)
    show(f"calibrated (CV pick: {cal.variant})", cal.predict(new), new.seconds)


def _scan_ids(n: int, prompts: int, shared: set[int]) -> list[int]:
    return [i for i in _evenly(n, prompts) if i not in shared]


if __name__ == "__main__":
    main()
