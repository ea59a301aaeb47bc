"""Attribution patching vs the exact ablation scan, side by side in one run.

    python bench/bench_attribution.py [--quick] [--model smollm2-135m] [--prompts 16] [--repeats 3]

Both sides predict / measure the change in dL (good - bad logit gap at the last position) when
each of all heads is zero-ablated alone on each of the scan prompts (``--prompts`` evenly spaced
over the extended set, as ``python -m analysis scan`` picks them; one batch):

- exact: :func:`analysis.ablation.ablation_scan` (the layer-suffix fast path, the ground truth
  of ``python -m analysis beyond``);
- AtP: one forward + one backward (:func:`analysis.paths.gradient_trace`) and gradient x
  activation difference (:func:`analysis.attribution.atp`) -- zero- *and* mean-ablation come
  from the same backward;
- AtP*: AtP + the attention-saturation QK fix (:mod:`analysis.attribution`).

Order: AtP, AtP*, exact, AtP, AtP*, ... (``--repeats`` of the cheap sides around each exact scan,
``--exact-repeats`` exact scans), best wall-clock and process-CPU time of each kept. Prints the
ratio (exact / AtP, requirement >= 50x) and each predictor's correlation with the exact effect
(pooled over (prompt, head) and across the heads' means).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from analysis.ablation import ablation_scan
from analysis.attribution import SaturationFix, atp, qk_fix
from analysis.compare import compare_predictors
from analysis.gaps import last_logits, pad_token_id
from analysis.paths import gradient_trace
from analysis.pipeline import _evenly
from analysis.prompts import load_prompts, tokenize_set
from spindiff.config import ModelConfig
from spindiff.lm.adapter import get_adapter
from spindiff.lm.models import context_window, load_model
from spindiff.lm.tokens import pad_left


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 2 repeats")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="AtP / AtP* runs around each exact scan")
    ap.add_argument("--exact-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n_prompts, repeats = (4, 2) if args.quick else (args.prompts, args.repeats)
    lm = load_model(ModelConfig(name=args.model, dtype="float32"))
    model, tok = lm.model, lm.tokenizer
    ad = get_adapter(model, lm.name)
    pad = pad_token_id(tok)
    full = tokenize_set(tok, load_prompts("extended"), context_window(model) or 10**9, warn=False)
    ids_sel = [i for i in _evenly(len(full), n_prompts) if i not in set(full.shared_first)]
    ts = full.subset(ids_sel)
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    ids, mask = pad_left(ts.ids, pad)
    g, b = ts.good_first, ts.bad_first
    print(f"model {lm.name}: {ad.n_layers} layers x {ad.n_heads} heads = {len(heads)} heads, {len(ts)} prompts "
          f"(extended set, evenly spaced), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    with torch.no_grad():  # warm-up: first forward passes of a process are slow
        for _ in range(2):
            last_logits(model, ids, mask)
    gradient_trace(model, ad, ids, mask, g, b)

    def run_atp():  # z and its gradient only
        tr = gradient_trace(model, ad, ids, mask, g, b, branches=False)
        return tr, atp(tr, "zero")

    def run_atp_star():  # the QK fix needs the residual entering every layer (the branch hooks)
        tr = gradient_trace(model, ad, ids, mask, g, b)
        return atp(tr, "zero") + qk_fix(tr, ad, "zero", None, SaturationFix(tr, ad))

    def run_exact():
        return ablation_scan(model, ad, ts, heads, "zero", None, pad, len(ts), progress=False).effect

    fns = {"atp": run_atp, "atp_star": run_atp_star, "exact": run_exact}
    best = {k: {"wall": float("inf"), "cpu": float("inf")} for k in fns}
    res = {}

    def timed(k):
        t0, c0 = time.perf_counter(), time.process_time()
        res[k] = fns[k]()
        best[k]["wall"] = min(best[k]["wall"], time.perf_counter() - t0)
        best[k]["cpu"] = min(best[k]["cpu"], time.process_time() - c0)

    for _ in range(repeats):
        timed("atp"), timed("atp_star")
    for _ in range(args.exact_repeats):
        timed("exact")
        for _ in range(repeats):
            timed("atp_star"), timed("atp")
    exact = res["exact"]
    P = exact.shape[0]
    preds = {"atp": res["atp"][1].reshape(P, -1), "atp_star": res["atp_star"].reshape(P, -1)}
    rec = compare_predictors(preds, exact, 1000, 0)
    print(f"\n{'':<34}{'wall':>10}{'cpu':>10}{'exact/this':>12}{'cpu ratio':>11}{'r pooled':>10}{'r means':>9}"
          f"{'recall10':>9}")
    print(f"{'exact zero-ablation scan':<34}{best['exact']['wall']:>9.2f}s{best['exact']['cpu']:>9.2f}s")
    for k, name in (("atp", "AtP (1 forward + 1 backward)"), ("atp_star", "AtP* (AtP + QK fix)")):
        r = rec[k]
        print(f"{name:<34}{best[k]['wall']:>9.3f}s{best[k]['cpu']:>9.3f}s"
              f"{best['exact']['wall'] / best[k]['wall']:>11.1f}x{best['exact']['cpu'] / best[k]['cpu']:>10.1f}x"
              f"{r['r']:>10.3f}{r['r_means']:>9.3f}{r['recall10']:>9.1f}")
    ratio = best["exact"]["wall"] / best["atp"]["wall"]
    print(f"\nAtP over {len(heads)} heads x {P} prompts: {ratio:.1f}x faster than the exact scan "
          f"(need >= 50x: {'met' if ratio >= 50 else 'NOT met'}); r = {rec['atp']['r']:.3f} "
          f"[{rec['atp']['r_ci'][0]:.2f}, {rec['atp']['r_ci'][1]:.2f}] pooled, {rec['atp']['r_means']:.3f} across "
          f"head means (best of {repeats * (args.exact_repeats + 1)} AtP runs, {args.exact_repeats} exact). "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    return {"best": best, "ratio": ratio, "r": {k: v["r"] for k, v in rec.items()},
            "r_means": {k: v["r_means"] for k, v in rec.items()}}


if __name__ == "__main__":
    main()
