"""Benchmark of the analysis hot paths against the loop structures they replace.

    python bench/bench_analysis.py [--quick] [--model smollm2-135m] [--repeats 3]

1. Gap table (dL_theory of every head on the paper's 20 prompts, protocol=paper): the
   reference code's loop structure (Python loops over prompt, layer, head; per-head weight
   slices) vs ``analysis.gaps.compute_gaps`` (batched over prompts, vectorised over heads).
   Requirement: >= 20x.
2. Ablation scan (every head zero-ablated alone on every prompt): one full forward per head
   with all prompts batched (what TransformerLens' patching helpers do) vs the layer-suffix
   fast path (``analysis.ablation.LayerSuffixScanner``, what ``ablation_scan`` runs), timed
   layer by layer, interleaved. Requirement: >= 1.7x. Also reports the FLOPs each must do and
   the achieved GFLOP/s.
3. Field provider: one new token with the context field
   (``ContextFieldProvider.step``) vs a plain cached step ``model(new_token, cache=...)``.
   Requirement: <= 1.3x.

Ratios are measured side by side in one process, interleaved (alternating order, best of
``--repeats``) so that other jobs on a shared machine hit both sides; wall-clock and process
CPU-time ratios are printed. The numbers each pair computes must agree to 1e-4 (max abs
difference printed).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch

from analysis.ablation import LayerSuffixScanner, gaps_with_ablation, scan_flops
from analysis.gaps import compute_gaps, pad_token_id
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter
from spindiff.config import ModelConfig
from spindiff.lm.field import ContextFieldProvider, last_positions
from spindiff.lm.models import context_window, load_model
from spindiff.lm.tokens import pad_left


def reference_loop_gaps(model, ad, tset) -> np.ndarray:
    """The reference code's loop structure: for prompt, for layer, for head, slice that head's
    weights from the HF modules and compute alpha, N0, N_proj = N0 @ W_O_slice.T, dL_theory.
    (Llama/nn.Linear slices here, GQA: KV head h // (H / H_kv); GPT-2 Conv1D slices otherwise.)"""
    P, L, H, dh = len(tset), ad.n_layers, ad.n_heads, ad.d_head
    E, U = ad.embedding(), ad.unembedding()
    out = np.zeros((P, L, H))
    with torch.no_grad():
        for p in range(P):
            S = E[torch.tensor(tset.ids[p])]  # (T, D)
            de = U[tset.good_first[p]] - U[tset.bad_first[p]]
            for l in range(L):
                a = ad.attn(l)
                for h in range(H):
                    sl = slice(h * dh, (h + 1) * dh)
                    if ad.family == "gpt2":
                        Wq, Wk, Wv = a.c_attn.weight.split(ad.d_model, dim=1)
                        Wq, Wk, Wv = Wq[:, sl], Wk[:, sl], Wv[:, sl]
                        Wo = a.c_proj.weight[:, sl]
                    else:
                        kv = h // (H // ad.n_kv_heads)
                        ks = slice(kv * dh, (kv + 1) * dh)
                        Wq, Wk, Wv = a.q_proj.weight[sl].T, a.k_proj.weight[ks].T, a.v_proj.weight[ks].T
                        Wo = a.o_proj.weight[:, sl]
                    Q, K, V = S @ Wq, S @ Wk, S @ Wv
                    alpha = torch.softmax(Q[-1] @ K.T / math.sqrt(dh), dim=-1)
                    N_proj = (alpha @ V) @ Wo.T
                    out[p, l, h] = float(N_proj @ de)
    return out


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Run each callable ``repeats`` times, alternating their order (ABBA...), so that load
    changes on a shared machine hit both. Returns best wall time, best CPU time, last result."""
    wall = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    res = {}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            res[k] = fns[k]()
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu, res


def bench_gaps(model, ad, ts, repeats: int) -> dict:
    wall, cpu, res = interleaved({
        "loop": lambda: reference_loop_gaps(model, ad, ts),
        "ours": lambda: compute_gaps(model, ts, "paper", batch_size=len(ts), adapter=ad, pad_id=pad_token_id_,
                                     progress=False, actual=False)}, repeats)
    return {"task": f"gap table, paper protocol, {ad.n_layers * ad.n_heads} heads x {len(ts)} prompts",
            "baseline_s": wall["loop"], "ours_s": wall["ours"], "ratio": wall["loop"] / wall["ours"],
            "cpu_ratio": cpu["loop"] / cpu["ours"],
            "max_abs_diff": float(np.abs(res["ours"].dl_theory - res["loop"]).max()), "need": ">= 20x"}


def bench_scan(model, ad, ts, heads, repeats: int) -> dict:
    """Full forward per head (prompts batched) vs the layer-suffix fast path, interleaved layer by
    layer (full forwards for the heads of layer l, then the fast path for layer l, order
    alternating), each piece timed separately and the best of ``repeats`` kept. Both sides also
    pay one baseline forward (the fast side's caches the activations)."""
    ids, mask = pad_left(ts.ids, pad_token_id_)
    g, b = ts.good_first, ts.bad_first
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn()
        return r, time.perf_counter() - t0, time.process_time() - c0

    inf = float("inf")
    best = {k: {"wall": inf, "cpu": inf} for k in ["full_base", "fast_base"] +
            [f"{side}{l}" for l in by_layer for side in ("full", "fast")]}
    diff = 0.0

    def keep(key, w, c):
        best[key]["wall"], best[key]["cpu"] = min(best[key]["wall"], w), min(best[key]["cpu"], c)

    for r in range(repeats):
        base, w, c = timed(lambda: gaps_with_ablation(model, ad, ids, mask, g, b))
        keep("full_base", w, c)
        sc, w, c = timed(lambda: LayerSuffixScanner(model, ad, ids, mask, g, b))
        keep("fast_base", w, c)
        for i, (l, hs) in enumerate(by_layer.items()):
            def full():
                return torch.stack([gaps_with_ablation(model, ad, ids, mask, g, b, [(l, h)]) for h in hs], 1)
            order = [("full", full), ("fast", lambda: sc.layer(l, hs))]
            res = {}
            for side, fn in (order if (i + r) % 2 == 0 else order[::-1]):
                res[side], w, c = timed(fn)
                keep(f"{side}{l}", w, c)
            diff = max(diff, float((res["full"] - res["fast"]).abs().max()))
    tot = {side: {k: sum(v[k] for key, v in best.items() if key.startswith(side)) for k in ("wall", "cpu")}
           for side in ("full", "fast")}
    fl = scan_flops(ad, [len(x) for x in ts.ids], heads)
    return {"task": f"ablation scan, {len(heads)} heads x {len(ts)} prompts", "baseline_s": tot["full"]["wall"],
            "ours_s": tot["fast"]["wall"], "ratio": tot["full"]["wall"] / tot["fast"]["wall"],
            "cpu_ratio": tot["full"]["cpu"] / tot["fast"]["cpu"], "max_abs_diff": diff, "need": ">= 1.7x",
            "note": (f"FLOPs: fast {fl['fast_flops'] / 1e9:.0f} G ({fl['fast_flops'] / 1e9 / tot['fast']['wall']:.1f}"
                     f" GFLOP/s), full {fl['full_flops'] / 1e9:.0f} G "
                     f"({fl['full_flops'] / 1e9 / tot['full']['wall']:.1f} GFLOP/s); FLOP ratio "
                     f"{fl['ratio_full_over_fast']:.2f}; interleaved per layer, best of {repeats}")}


def bench_field_step(model, tok, batch: int, n_steps: int, repeats: int) -> dict:
    """Per-token cost of the field with the KV cache vs a plain cached step. The two are
    interleaved step by step (each on its own cache) so that load changes hit both equally."""
    prompts = ["The capital of France is Paris. The capital of Germany is", "A dog says woof. A cat says",
               "The opposite of hot is", "Lions are carnivores. Cows are"] * 8
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:batch]]
    ids, mask = pad_left(enc, pad_token_id_)
    prov = ContextFieldProvider(model, "all", "in_situ", normalize=True, final_norm=True)
    plain_t, field_t, plain_c, field_c, diff = [], [], [], [], 0.0
    with torch.no_grad():
        for rep in range(repeats):
            out = model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), use_cache=True)
            past, m, nxt_p = out.cache, mask, out.logits[:, -1].argmax(-1)
            prev = prov(ids, mask, use_cache=True)
            nxt_f = prev.logits.argmax(-1)
            for i in range(n_steps):
                def plain():
                    nonlocal past, m, nxt_p
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    t0, c0 = time.perf_counter(), time.process_time()
                    o = model(input_ids=nxt_p[:, None], attention_mask=m, position_ids=last_positions(m)[:, -1:],
                              cache=past, use_cache=True)
                    plain_t.append(time.perf_counter() - t0)
                    plain_c.append(time.process_time() - c0)
                    past, nxt_p = o.cache, o.logits[:, -1].argmax(-1)
                    return o.logits[:, -1]

                def field():
                    nonlocal prev, nxt_f
                    t0, c0 = time.perf_counter(), time.process_time()
                    prev = prov.step(nxt_f, prev)
                    field_t.append(time.perf_counter() - t0)
                    field_c.append(time.process_time() - c0)
                    nxt_f = prev.logits.argmax(-1)
                    return prev.logits

                a, b = (plain(), field()) if (i + rep) % 2 == 0 else (field(), plain())[::-1]
                diff = max(diff, float((a - b).abs().max()))
    p, f = statistics.median(plain_t), statistics.median(field_t)
    return {"task": f"field step (all heads, batch {batch}) vs plain cached step", "baseline_s": p, "ours_s": f,
            "ratio": f / p, "cpu_ratio": statistics.median(field_c) / statistics.median(plain_c),
            "max_abs_diff": diff, "need": "<= 1.3x",
            "note": f"median per token over {len(plain_t)} interleaved steps; ratio = field / plain"}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer heads in the scan, fewer repeats")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = 2 if args.quick else args.repeats
    lm = load_model(ModelConfig(name=args.model, dtype="float32"))
    model, tok = lm.model, lm.tokenizer
    ad = get_adapter(model, lm.name)
    global pad_token_id_
    pad_token_id_ = pad_token_id(tok)
    ts = tokenize_set(tok, load_prompts("paper"), context_window(model), warn=False)
    print(f"model {lm.name}: {ad.n_layers} layers x {ad.n_heads} heads, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    ids, mask = pad_left(ts.ids, pad_token_id_)
    with torch.no_grad():  # warm-up: first forward passes of a process are slow
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), logits_to_keep=1)
    heads = ([(l, 0) for l in range(ad.n_layers)] if args.quick
             else [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)])
    rows = [bench_gaps(model, ad, ts, max(7, repeats)), bench_scan(model, ad, ts, heads, repeats),
            bench_field_step(model, tok, 1, 12 if args.quick else 24, repeats),
            bench_field_step(model, tok, 8, 8 if args.quick else 16, repeats)]
    w = max(len(r["task"]) for r in rows)
    print(f"\n{'task':<{w}}  {'baseline':>10}  {'ours':>10}  {'ratio':>7}  {'cpu ratio':>9}  {'need':>8}  "
          f"{'max|diff|':>9}")
    for r in rows:
        print(f"{r['task']:<{w}}  {r['baseline_s']:>9.4f}s  {r['ours_s']:>9.4f}s  {r['ratio']:>6.2f}x  "
              f"{r['cpu_ratio']:>8.2f}x  {r['need']:>8}  {r['max_abs_diff']:>9.2e}")
    print("(times: best wall-clock of interleaved repeats; cpu ratio: the same from process CPU time, "
          "less sensitive to other jobs on a shared machine)")
    for r in rows:
        if r.get("note"):
            print(f"  {r['task']}: {r['note']}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return rows


pad_token_id_ = 0

if __name__ == "__main__":
    main()
