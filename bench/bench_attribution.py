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
- AtP*: AtP + the attention-saturation QK fix (:mod:`analysis.attribution`);
- the predictors past AtP (:mod:`analysis.predictor_table`, ``--beyond``): IG with all heads
  interpolated jointly (EAP-IG style), IG per early layer, RelP, lookahead (``--ig-steps``,
  ``--lookahead-k``; per-head IG of the first two layers with ``--ig-head``).

``--prompt-set heldout`` (or paper) runs the same table on a prompt set the predictors were not
tuned on.

Order: AtP, AtP*, exact, AtP, AtP*, ... (``--repeats`` of the cheap sides around each exact scan,
``--exact-repeats`` exact scans), best wall-clock and process-CPU time of each kept. Prints the
ratio (exact / AtP, requirement >= 50x) and, for every predictor, its correlation with the exact
effect (pooled over (prompt, head) with a prompt-bootstrap CI, across the heads' means),
Spearman, top-10 / top-20 recall, explained variance and wall-clock speed-up over the exact scan.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from analysis.ablation import ablation_scan
from analysis.attribution import SaturationFix, atp, qk_fix
from analysis.compare import compare_predictors
from analysis.gaps import last_logits, pad_token_id
from analysis.paths import gradient_trace
from analysis.pipeline import _evenly
from analysis.predictor_table import compute, extra_metrics
from analysis.predictors import BeyondConfig
from analysis.prompts import load_prompts, tokenize_set
from spindiff.config import ModelConfig
from spindiff.lm.adapter import get_adapter
from spindiff.lm.models import context_window, load_model
from spindiff.lm.tokens import pad_left


SHORT = {"ig": "IG, all heads jointly (EAP-IG)", "ig_layer": "IG per layer (0-1) + AtP",
         "ig_head": "IG per head (0-1) + AtP", "relp": "RelP (LRP rules)", "lookahead": "lookahead (layer 0) + AtP"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 2 repeats")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="AtP / AtP* runs around each exact scan")
    ap.add_argument("--exact-repeats", type=int, default=1)
    ap.add_argument("--prompt-set", default="extended", help="extended | heldout | paper")
    ap.add_argument("--no-beyond", action="store_true", help="AtP / AtP* only (the predictors past AtP off)")
    ap.add_argument("--ig-steps", type=int, default=4)
    ap.add_argument("--ig-head", action="store_true", help="also per-head IG for layers 0-1 (costly)")
    ap.add_argument("--lookahead-k", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n_prompts, repeats = (4, 2) if args.quick else (args.prompts, args.repeats)
    lm = load_model(ModelConfig(name=args.model, dtype="float32"))
    model, tok = lm.model, lm.tokenizer
    ad = get_adapter(model, lm.name)
    pad = pad_token_id(tok)
    full = tokenize_set(tok, load_prompts(args.prompt_set), context_window(model) or 10**9, warn=False)
    ids_sel = [i for i in _evenly(len(full), n_prompts) if i not in set(full.shared_first)]
    ts = full.subset(ids_sel)
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    ids, mask = pad_left(ts.ids, pad)
    g, b = ts.good_first, ts.bad_first
    print(f"model {lm.name}: {ad.n_layers} layers x {ad.n_heads} heads = {len(heads)} heads, {len(ts)} prompts "
          f"({args.prompt_set} set, evenly spaced), torch {torch.__version__}, {torch.get_num_threads()} threads, "
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

    bc = BeyondConfig(ig_steps=args.ig_steps, ig_head=args.ig_head, lookahead_k=args.lookahead_k)

    def run_beyond():  # each row timed inside compute (its own passes, the shared trace counted fully)
        return compute(model, ad, ts, heads, "zero", None, pad, len(ts), bc)

    fns = {"atp": run_atp, "atp_star": run_atp_star, "exact": run_exact}
    if not args.no_beyond:
        fns["beyond"] = run_beyond
    best = {k: {"wall": float("inf"), "cpu": float("inf")} for k in fns}
    res = {}

    def timed(k):
        t0, c0 = time.perf_counter(), time.process_time()
        res[k] = fns[k]()
        best[k]["wall"] = min(best[k]["wall"], time.perf_counter() - t0)
        best[k]["cpu"] = min(best[k]["cpu"], time.process_time() - c0)

    beyond_secs: dict[str, float] = {}

    def timed_beyond():  # best per row over the repeats
        timed("beyond")
        for k, (_, sec) in res["beyond"].items():
            beyond_secs[k] = min(beyond_secs.get(k, float("inf")), sec)
    for _ in range(repeats):
        timed("atp"), timed("atp_star")
    if "beyond" in fns:
        timed_beyond()
    for _ in range(args.exact_repeats):
        timed("exact")
        for _ in range(repeats):
            timed("atp_star"), timed("atp")
        if "beyond" in fns:
            timed_beyond()
    exact = res["exact"]
    P = exact.shape[0]
    preds = {"atp": res["atp"][1].reshape(P, -1), "atp_star": res["atp_star"].reshape(P, -1)}
    walls = {"atp": best["atp"]["wall"], "atp_star": best["atp_star"]["wall"]}
    names = {"atp": "AtP (1 forward + 1 backward)", "atp_star": "AtP* (AtP + QK fix)"}
    for k, (p, _) in res.get("beyond", {}).items():
        if k != "atp":
            preds[k], walls[k], names[k] = p, beyond_secs[k], SHORT[k]
    rec = compare_predictors(preds, exact, 1000, 0)
    for k in rec:
        rec[k].update(extra_metrics(preds[k], exact, 1000, 0))
    print(f"\n{'':<40}{'wall':>9}{'exact/this':>11}{'r pooled':>9}{'95% CI':>14}{'r means':>8}{'rho':>7}"
          f"{'rec10':>6}{'rec20':>6}{'expl':>7}")
    print(f"{'exact zero-ablation scan':<40}{best['exact']['wall']:>8.2f}s (cpu {best['exact']['cpu']:.2f} s)")
    for k, r in rec.items():
        print(f"{names[k][:39]:<40}{walls[k]:>8.3f}s{best['exact']['wall'] / walls[k]:>10.1f}x{r['r']:>9.3f}"
              f"  [{r['r_ci'][0]:.2f}, {r['r_ci'][1]:.2f}]{r['r_means']:>8.3f}{r['spearman']:>7.3f}"
              f"{r['recall10']:>6.1f}{r['recall20']:>6.2f}{r['explained']:>7.2f}")
    ratio = best["exact"]["wall"] / best["atp"]["wall"]
    print(f"\nAtP over {len(heads)} heads x {P} prompts: {ratio:.1f}x faster than the exact scan "
          f"(need >= 50x: {'met' if ratio >= 50 else 'NOT met'}); r = {rec['atp']['r']:.3f} "
          f"[{rec['atp']['r_ci'][0]:.2f}, {rec['atp']['r_ci'][1]:.2f}] pooled, {rec['atp']['r_means']:.3f} across "
          f"head means (best of {repeats * (args.exact_repeats + 1)} AtP runs, {args.exact_repeats} exact). "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    return {"best": best, "ratio": ratio, "r": {k: v["r"] for k, v in rec.items()},
            "r_means": {k: v["r_means"] for k, v in rec.items()},
            "speedup": {k: best["exact"]["wall"] / w for k, w in walls.items()}}


if __name__ == "__main__":
    main()
