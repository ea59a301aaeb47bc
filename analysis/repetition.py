"""``python -m analysis repetition``: Huo & Johnson's repetition-as-attractor claim measured on a real
LM (docs/analysis.md, "Repetition as an attractor"; issue 21).

One batched generation over the grid temperature x top-k (every prompt in every cell, the field
recorded from generate's own forwards, :mod:`analysis.attractor`), loops detected
(:mod:`analysis.loops`), then: the phase diagram, the attractor time course around onset,
self-reinforcement (from the loops and Xu et al.'s constructed test), attractor heads vs
induction scores, onset prediction (:mod:`analysis.attractor_stats`), and the intervention:
down-weighting the top attractor heads vs ``repetition_penalty`` / ``no_repeat_ngram_size`` at a
matched perplexity cost on non-looping text. Writes loops.csv, heads_attractor.csv,
intervention.csv, repetition.json and the figures.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from analysis import attractor_stats as ast
from analysis.attractor import GenPool, generate_recorded
from analysis.induction import induction_scores
from analysis.pipeline import _jsonable
from analysis.loops import QUICK, RepetitionConfig, boot_ci, check_rep, detect_loop, distinct_n, rep_w, seq_rep_n, wilson
from analysis.prompts import load_prompts
from analysis.report import write_csv
from analysis.repetition_figs import fig_heads_induction, fig_phase, fig_time_course
from spindiff.lm.interventions import HeadGains
from spindiff.runtime import atomic_write_json

OPEN_PROMPTS = (
    "Once upon a time", "The best way to learn a new language is", "I remember the first time I",
    "In the middle of the night, the", "The history of the city begins", "My favourite recipe is",
    "Scientists have recently discovered that", "The most important thing about friendship is",
    "It was a cold winter morning and", "Here is a list of things to do this weekend:",
    "The old man looked at the sea and", "Technology has changed the way we",
    "The rules of the game are simple:", "When I was a child, I used to", "The future of energy",
    "Dear diary, today", "The meeting started at nine and", "In this essay I will argue that",
    "The forest was quiet except for", "A good teacher is someone who", "The train was late, so",
    "Water is essential because", "She opened the door and saw", "The company announced that",
    "Music can make people feel", "The recipe calls for", "On the first day of school,",
    "The planet Mars is", "He said that he would", "The best advice I ever got was",
    "There are many reasons why", "The story of the little red hen")


def rep_config(cfg: Any) -> RepetitionConfig:
    """The ``repetition`` section as a dataclass, shrunk by ``quick=true``; checked."""
    rc = RepetitionConfig(**OmegaConf.to_container(cfg.repetition, resolve=True))
    if cfg.get("quick", False):  # the small grid, except for keys the user set
        dflt = RepetitionConfig()
        for k, v in QUICK.items():
            if getattr(rc, k) == getattr(dflt, k):
                setattr(rc, k, v)
    check_rep(rc)
    return rc


def prompt_pool(A: Any, n: int) -> list[tuple[str, int, str]]:
    """n prompts: half open-ended (OPEN_PROMPTS), half evenly spaced over ``prompts``:
    (set name, row in that set, text)."""
    fact = load_prompts(A.cfg.prompts, A.cfg.variant)
    n_open = min(len(OPEN_PROMPTS), (n + 1) // 2)
    n_fact = min(len(fact.items), n - n_open)
    picks = np.linspace(0, len(fact.items) - 1, max(n_fact, 1)).round().astype(int)[:n_fact]
    return ([("open", i, OPEN_PROMPTS[i]) for i in range(n_open)]
            + [(fact.name, int(j), fact.items[j].prompt) for j in picks])


def _encode(A: Any, texts: list[str]) -> list[list[int]]:
    return [A.tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _cells(rc: RepetitionConfig) -> list[tuple[float, int]]:
    cells = []
    for T in rc.temperatures:
        cells += [(0.0, 0)] if float(T) == 0 else [(float(T), int(k)) for k in rc.top_ks]
    return cells


def grid_prompts(A: Any, rc: RepetitionConfig) -> tuple[list[tuple[str, int, str]], list[tuple[float, int, int]]]:
    """The prompts of the grid: cells at T <= ``dense_temperature`` get ``dense_prompts`` prompts,
    the others ``prompts_per_cell`` (each :func:`prompt_pool`, so a smaller cell is not a prefix of a
    larger one). Returns (the union of the prompts, with ids = their index; one (T, top_k,
    prompt id) per continuation, cell by cell)."""
    pool: list[tuple[str, int, str]] = []
    ids: dict[tuple[str, int], int] = {}
    conts = []
    for T, k in _cells(rc):
        n = rc.dense_prompts if T <= float(rc.dense_temperature) else rc.prompts_per_cell
        for p in prompt_pool(A, int(n)):
            if p[:2] not in ids:
                ids[p[:2]] = len(pool)
                pool.append(p)
            conts.append((T, k, ids[p[:2]]))
    return pool, conts


def _loops(toks: torch.Tensor, rc: RepetitionConfig) -> list:
    return [detect_loop(t.tolist(), rc.max_period, rc.min_copies, rc.min_repeated) for t in toks]


def phase_diagram(rows: list[dict], rc: RepetitionConfig, n_boot: int, seed: int) -> dict[str, Any]:
    """Loop rate per cell with Wilson CIs; the vocabulary effect (k = smallest vs all, paired by
    prompt and temperature) and the largest change between neighbouring temperatures."""
    cells = {}
    for r in rows:
        cells.setdefault((r["temperature"], r["top_k"]), []).append(r["loop"])
    table = [{"temperature": T, "top_k": k, "n": len(v), "loops": int(sum(v)), "rate": float(np.mean(v)),
              "ci": wilson(int(sum(v)), len(v))} for (T, k), v in sorted(cells.items())]
    ks = sorted({int(k) for k in rc.top_ks if int(k) > 0})
    res: dict[str, Any] = {"cells": table, "n_continuations": len(rows), "n_loops": int(sum(r["loop"] for r in rows))}
    if ks and 0 in [int(k) for k in rc.top_ks]:
        small = {(r["temperature"], r["prompt_id"]): r["loop"] for r in rows if r["top_k"] == ks[0]}
        full = {(r["temperature"], r["prompt_id"]): r["loop"] for r in rows if r["top_k"] == 0 and r["temperature"] > 0}
        d = np.array([float(small[key]) - float(full[key]) for key in small if key in full])
        res["small_minus_full_vocab"] = {"k_small": ks[0], "diff": boot_ci(d, n_boot, seed), "n_pairs": int(len(d))}
    jumps = []
    for k in sorted({c["top_k"] for c in table if c["temperature"] > 0}):
        line = [c for c in table if c["top_k"] == k and c["temperature"] > 0]
        line = ([c for c in table if c["temperature"] == 0] + line)
        for a, b in zip(line, line[1:]):
            jumps.append({"top_k": k, "from_T": a["temperature"], "to_T": b["temperature"],
                          "change": b["rate"] - a["rate"]})
    res["largest_change"] = min(jumps, key=lambda j: j["change"]) if jumps else None
    res["changes"] = jumps
    return res


# --------------------------------------------------------------------------- intervention
@torch.no_grad()
def reference_costs(A: Any, texts: list[tuple[list[int], list[int]]], gains_heads: list[tuple[int, int]],
                    rc: RepetitionConfig) -> dict[str, float]:
    """Perplexity of non-looping reference continuations (prompt ids, continuation ids) under each
    decoding arm, teacher-forced: the model with head gains; the base logits through HF's
    repetition-penalty / no-repeat-n-gram processors at every position. Returns {arm: perplexity}."""
    arms: dict[str, list[float]] = {}

    def add(name: str, lp: torch.Tensor) -> None:
        arms.setdefault(name, []).extend(lp.tolist())

    procs = {f"repetition_penalty={p:g}": RepetitionPenaltyLogitsProcessor(float(p)) for p in rc.penalties}
    procs.update({f"no_repeat_ngram_size={n}": NoRepeatNGramLogitsProcessor(int(n)) for n in rc.ngram_sizes})
    for pre, cont in texts:
        ids = torch.tensor([pre + cont])
        pos = torch.arange(len(pre) - 1, ids.shape[1] - 1)  # positions that predict the continuation
        tgt = ids[0, len(pre):]
        logits = A.model(input_ids=ids).logits[0].double()
        add("base", logits[pos].log_softmax(-1).gather(-1, tgt[:, None])[:, 0])
        for name, proc in procs.items():
            lp = [proc(ids[:, :t + 1], logits[t][None].clone())[0].log_softmax(-1)[tgt[j]] for j, t in enumerate(pos)]
            add(name, torch.stack(lp))
        for g in rc.int_gains:
            with HeadGains(A.ad, {h: float(g) for h in gains_heads}):
                lg = A.model(input_ids=ids).logits[0].double()
            add(f"head_gain={g:g}", lg[pos].log_softmax(-1).gather(-1, tgt[:, None])[:, 0])
    return {k: float(np.exp(-np.mean(v))) for k, v in arms.items()}


def _pick_arms(ppl: dict[str, float], rc: RepetitionConfig) -> dict[str, str]:
    """Head-gain arm: the strongest gain within the budget (else the mildest); repetition_penalty
    matched to its cost (largest penalty not costing more) and at the budget; no-repeat: the
    smallest n within the budget (else the largest n)."""
    cost = {k: v / ppl["base"] - 1 for k, v in ppl.items()}
    gains = sorted((float(k.split("=")[1]), k) for k in cost if k.startswith("head_gain"))
    ok = [k for g, k in gains if cost[k] <= rc.ppl_budget]
    g_arm = ok[0] if ok else gains[-1][1]
    pens = sorted((float(k.split("=")[1]), k) for k in cost if k.startswith("repetition_penalty"))
    within = lambda c: [k for _, k in pens if cost[k] <= c]  # noqa: E731
    matched = (within(max(cost[g_arm], 0.0)) or [pens[0][1]])[-1]
    budget = (within(rc.ppl_budget) or [pens[0][1]])[-1]
    ngr = sorted((int(k.split("=")[1]), k) for k in cost if k.startswith("no_repeat"))
    ok_n = [k for _, k in ngr if np.isfinite(cost[k]) and cost[k] <= rc.ppl_budget]
    return {"head_gains": g_arm, "penalty_matched": matched, "penalty_budget": budget,
            "no_repeat": ok_n[0] if ok_n else ngr[-1][1]}


def intervention(A: Any, rc: RepetitionConfig, heads: list[tuple[int, int]], ref: list[tuple[list[int], list[int]]],
                 seed: int, n_boot: int, base: tuple[list[list[int]], torch.Tensor] | None = None,
                 pool: GenPool | None = None, enc: list[list[int]] | None = None) -> dict[str, Any]:
    """Loop rate, seq-rep-4, distinct-2 and reference perplexity of each arm at (int_temperature,
    int_top_k) on ``int_prompts`` prompts (paired: every arm continues every prompt).

    Args:
        base: (prompt ids, their continuations (n, S)) already generated in that cell by the grid:
            the base arm, not generated again (greedy: the same continuations up to float noise).
        pool: worker processes for the generations (:class:`analysis.attractor.GenPool`).
        enc: the prompts (token ids) when ``base`` is None (default: ``int_prompts`` of the pool)."""
    ppl = reference_costs(A, ref, heads, rc)
    pick = _pick_arms(ppl, rc)
    arms = list(dict.fromkeys(["base", pick["penalty_matched"], pick["penalty_budget"], pick["no_repeat"]]))
    if base is not None:
        enc, base_toks = base
        arms = arms[1:]
    else:
        enc = enc or _encode(A, [p[2] for p in prompt_pool(A, rc.int_prompts)])
    n = len(enc)
    prompts = enc * len(arms)
    extra = []
    for j, arm in enumerate(arms):
        if arm == "base":
            continue
        mask = [j == i // n for i in range(len(prompts))]
        v = arm.split("=")[1]
        extra.append((RepetitionPenaltyLogitsProcessor(float(v)) if arm.startswith("repetition")
                      else NoRepeatNGramLogitsProcessor(int(v)), mask))
    T, k = float(rc.int_temperature), int(rc.int_top_k)
    S = int(rc.int_max_new_tokens) or rc.max_new_tokens
    prog = _progress("repetition: intervention") if A.cfg.progress else None
    out = generate_recorded(A.model, A.ad, prompts, [T] * len(prompts), [k] * len(prompts), S,
                            A.pad_id, rc.batch_size, seed + 7, record=False, extra=extra, progress=prog,
                            pool=pool)["tokens"]
    g = float(pick["head_gains"].split("=")[1])
    og = generate_recorded(A.model, A.ad, enc, [T] * n, [k] * n, S, A.pad_id, rc.batch_size,
                           seed + 7, record=False, progress=prog, gains={h: g for h in heads}, pool=pool)["tokens"]
    conts = {arm: out[j * n:(j + 1) * n] for j, arm in enumerate(arms)}
    if base is not None:
        conts = {"base": base_toks, **conts}
    conts[pick["head_gains"]] = og
    base_loop = np.array([l.loop for l in _loops(conts["base"], rc)], float)
    table = []
    for arm, toks in conts.items():
        lo = np.array([l.loop for l in _loops(toks, rc)], float)
        sr = np.array([seq_rep_n(t.tolist(), 4) for t in toks])
        d2 = np.array([distinct_n(t.tolist(), 2) for t in toks])
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, (n_boot, n))
        with np.errstate(all="ignore"):  # no base loop in a resample: reduction undefined (nan)
            red = 1 - lo[idx].mean(1) / base_loop[idx].mean(1)
        table.append({"arm": arm, "loop_rate": float(lo.mean()), "loop_ci": wilson(int(lo.sum()), n),
                      "loop_reduction": float(1 - lo.mean() / base_loop.mean()) if base_loop.any() else float("nan"),
                      "loop_reduction_ci": [float(np.nanquantile(red, 0.025)), float(np.nanquantile(red, 0.975))]
                      if base_loop.any() else [float("nan")] * 2,
                      "seq_rep_4": boot_ci(sr, n_boot, seed), "distinct_2": boot_ci(d2, n_boot, seed),
                      "rep_w16": float(np.mean([rep_w(t.tolist(), 16) for t in toks])),
                      "ref_ppl": ppl[arm], "ppl_cost": ppl[arm] / ppl["base"] - 1})
    return {"temperature": T, "top_k": k, "n_prompts": n, "base_from_grid": base is not None, "heads": [f"L{l}H{h}" for l, h in heads],
            "reference_ppl": ppl, "reference_tokens": int(sum(len(c) for _, c in ref)), "arms": pick, "table": table}


# --------------------------------------------------------------------------- the stage
def _progress(label: str):
    t0 = time.perf_counter()

    def cb(done: int, total: int) -> None:
        print(f"{label}: {done}/{total} continuations ({time.perf_counter() - t0:.0f} s)", flush=True)
    return cb


def step_repetition(A: Any) -> dict[str, Any]:
    """The whole study on ``A``'s model; writes loops.csv, heads_attractor.csv, intervention.csv,
    repetition.json and the figures under ``A.out``; returns repetition.json's content. With
    ``repetition.workers`` > 1 the generations run in that many worker processes (one torch thread
    each, each loading the model once), the rest in this process."""
    rc = rep_config(A.cfg)
    if rc.workers <= 1:
        return _study(A, rc, None)
    mcfg = {**OmegaConf.to_container(A.cfg.model, resolve=True), "name": A.lm.name, "fallback": False}
    with GenPool(mcfg, rc.workers, threads=1) as pool:
        return _study(A, rc, pool)


def _study(A: Any, rc: RepetitionConfig, gpool: GenPool | None) -> dict[str, Any]:
    c = A.cfg
    t0 = time.perf_counter()
    nb, seed = int(c.n_bootstrap), int(c.seed)
    pool, conts = grid_prompts(A, rc)
    enc = _encode(A, [p[2] for p in pool])
    cells = _cells(rc)
    pid = [i for _, _, i in conts]
    prompts = [enc[i] for i in pid]
    temps = [T for T, _, _ in conts]
    ks = [k for _, k, _ in conts]
    rec = generate_recorded(A.model, A.ad, prompts, temps, ks, rc.max_new_tokens, A.pad_id, rc.batch_size, seed,
                            progress=_progress("repetition: grid") if c.progress else None, pool=gpool)
    t_gen = time.perf_counter() - t0
    loops = _loops(rec["tokens"], rc)
    rows = []
    for i, lp in enumerate(loops):
        s, j, text = pool[pid[i]]
        toks = rec["tokens"][i].tolist()
        rows.append({"prompt_id": pid[i], "prompt_set": s, "set_row": j, "temperature": temps[i],
                     "top_k": ks[i], "loop": lp.loop, "onset": lp.onset, "period": lp.period,
                     "copies": round(lp.copies, 3), "seq_rep_4": seq_rep_n(toks, 4), "distinct_2": distinct_n(toks, 2),
                     "rep_w16": rep_w(toks, 16), "mean_logp": float(rec["logp"][i].mean()), "prompt": text,
                     "continuation": A.tok.decode(toks).replace("\r", "\\r"), "tokens": " ".join(map(str, toks))})
    write_csv(A.out / "loops.csv", list(rows[0]), rows)
    onsets = np.array([lp.onset for lp in loops])
    periods = np.array([lp.period for lp in loops])
    W_U = A.ad.unembedding().detach()
    sig = ast.step_signals(rec, W_U)
    res: dict[str, Any] = {"config": OmegaConf.to_container(OmegaConf.structured(rc)), "quick": bool(c.get("quick", False)),
                           "n_prompts": len(pool), "cells": len(cells), "seconds_generation": t_gen}
    res["phase"] = phase_diagram(rows, rc, nb, seed)
    print(f"repetition: {res['phase']['n_loops']} loops in {len(rows)} continuations ({t_gen:.0f} s generating)")
    res["time_course"] = ast.time_course(sig, onsets, rc.window, nb, seed)
    res["self_reinforcement"] = ast.self_reinforcement(sig["prob"], onsets, periods, 6, nb, seed)
    sents = [s for s in _encode(A, [p[2] for p in prompt_pool(A, rc.xu_sentences)]) if len(s) >= 3]
    res["constructed_reinforcement"] = ast.constructed_reinforcement(A.model, A.ad, sents, rc.xu_copies, nb, seed)
    bos = A.tok.bos_token_id
    ind = induction_scores(A.model, A.ad, rc.induction_len, rc.induction_batch, bos=bos, seed=seed)
    H = A.ad.n_heads
    if (onsets >= 0).sum() >= 2 and (onsets < 0).any():
        heads = ast.attractor_heads(rec["push"].numpy(), onsets, ind, H, 10, min(nb, 300), seed)
        score = heads.pop("score")
        heads.pop("induction")
        write_csv(A.out / "heads_attractor.csv", ["layer", "head", "attractor_score", "induction_score"],
                  [[k // H, k % H, score[k], ind.reshape(-1)[k]] for k in range(len(score))])
        res["heads"] = heads
        A.figures["heads_induction"] = Path(fig_heads_induction(score, ind.reshape(-1), H, A.out / "fig_heads_induction.png",
                                                                heads["spearman"], A.lm.name)).name
        res["prediction"] = ast.onset_prediction(sig, onsets, [int(k) for k in rc.horizons], min(nb, 300), seed)
        top = [(k // H, k % H) for k in np.argsort(-score)[:rc.int_heads]]
        if rc.intervention:
            ref = _reference_texts(rec["tokens"], loops, temps, ks, prompts, rc)
            Ti, ki = float(rc.int_temperature), int(rc.int_top_k) if float(rc.int_temperature) > 0 else 0
            cell = [i for i in range(len(conts)) if temps[i] == Ti and ks[i] == ki][:rc.int_prompts]
            base = ([prompts[i] for i in cell], rec["tokens"][cell]) if cell else None
            prone = None
            if rc.int_loop_prone:  # the prompts whose greedy continuation looped; base generated anew
                prone = [prompts[i] for i in range(len(conts)) if temps[i] == 0 and loops[i].loop][:rc.int_prompts]
                base = None
            if rc.int_max_new_tokens and rc.int_max_new_tokens != rc.max_new_tokens:
                base = None  # other length: the grid's continuations are not the base arm
            res["intervention"] = intervention(A, rc, top, ref, seed, nb, base, gpool, prone)
            res["intervention"]["loop_prone_prompts"] = bool(rc.int_loop_prone)
            write_csv(A.out / "intervention.csv", ["arm", "loop_rate", "loop_reduction", "seq_rep_4", "distinct_2",
                                                   "rep_w16", "ref_ppl", "ppl_cost"],
                      [{**r, "seq_rep_4": r["seq_rep_4"][0], "distinct_2": r["distinct_2"][0]}
                       for r in res["intervention"]["table"]])
    else:
        A.note("fewer than 2 loops (or no non-looping continuation): heads, prediction and intervention skipped; "
               "use more prompts or lower temperatures")
    A.figures["phase"] = Path(fig_phase(res["phase"], rc, A.out / "fig_phase.png", A.lm.name)).name
    A.figures["time_course"] = Path(fig_time_course(res["time_course"], A.out / "fig_attractor_time_course.png",
                                                    A.lm.name)).name
    res["induction_top"] = [{"head": f"L{k // H}H{k % H}", "score": float(ind.reshape(-1)[k])}
                            for k in np.argsort(-ind.reshape(-1))[:10]]
    res["answers"] = answers(res)
    res["seconds"] = time.perf_counter() - t0
    res["figures"] = dict(A.figures)
    atomic_write_json(A.out / "repetition.json", _jsonable(res, nan_as_null=True))
    A.report["repetition"] = {"answers": res["answers"], "seconds": res["seconds"]}
    for k, v in res["answers"].items():
        print(f"repetition: {k}: {v}")
    print(f"repetition: done in {res['seconds']:.0f} s -> {A.out / 'repetition.json'}")
    return res


def _reference_texts(toks: torch.Tensor, loops: list, temps: list, ks: list, prompts: list, rc: RepetitionConfig):
    """Non-looping continuations sampled at the highest grid temperature <= 1 with the whole
    vocabulary (plain samples of the model), at most ``ref_texts``; any non-looping ones if none.
    ``prompts``: each continuation's prompt ids."""
    Ts = [T for T, k in zip(temps, ks) if k == 0 and 0 < T <= 1.0]
    Tref = max(Ts) if Ts else None
    idx = [i for i, lp in enumerate(loops) if not lp.loop and ks[i] == 0 and temps[i] == Tref]
    idx = idx or [i for i, lp in enumerate(loops) if not lp.loop]
    return [(prompts[i], toks[i].tolist()) for i in idx[:rc.ref_texts]]


def _fmt_ci(e: Any, nd: int = 3) -> str:
    return f"{e[0]:+.{nd}f} [{e[1]:+.{nd}f}, {e[2]:+.{nd}f}]"


def answers(res: dict[str, Any]) -> dict[str, str]:
    """A plain yes / no / partly per claim, with the effect size and its 95% CI."""
    out: dict[str, str] = {}
    ph = res["phase"]
    sv = ph.get("small_minus_full_vocab")
    if sv:
        d = sv["diff"]
        verdict = "yes" if d[1] > 0 else "no" if d[2] < 0 else "not resolved"
        out["smaller vocabulary loops more"] = (f"{verdict}: loop rate top_k={sv['k_small']} minus whole vocabulary "
                                                f"= {_fmt_ci(d)} ({sv['n_pairs']} paired continuations)")
    lc = ph.get("largest_change")
    if lc:
        out["sharp transition"] = (f"largest change between neighbouring temperatures: {lc['change']:+.2f} "
                                   f"(top_k={lc['top_k']}, T {lc['from_T']} -> {lc['to_T']}); grid spacing limits "
                                   "the resolution")
    tc = res["time_course"]["push"]["after_minus_before"]
    out["attractor push rises at onset"] = (("yes" if tc[1] > 0 else "no" if tc[2] < 0 else "not resolved")
                                            + f": push on the emitted token after - before onset = {_fmt_ci(tc)} logits "
                                            f"({res['time_course']['n_loops_with_4_pre_onset_steps']} loops)")
    sr = res["self_reinforcement"]["copy3_minus_copy1"]
    xu = res["constructed_reinforcement"]["last_minus_first_repeat"]
    if np.isnan(sr[0]):  # no loop with 3 copies: the constructed test alone
        verdict = ("yes" if xu[1] > 0 else "no" if xu[2] < 0 else "not resolved") + " (constructed test only)"
    else:
        verdict = "yes" if sr[1] > 0 and xu[1] > 0 else "partly" if sr[1] > 0 or xu[1] > 0 else "no"
    out["self-reinforcement"] = (verdict + f": p(copy 3) - p(copy 1) in loops = {_fmt_ci(sr)}; constructed, last - first repeat "
                                 f"= {_fmt_ci(xu)}")
    if "heads" in res:
        h = res["heads"]
        lo, hi = h["spearman_ci"]
        out["attractor heads are induction heads"] = (
            # yes: a strong rank agreement (CI above 0.5); partly: related but not the same set of heads
            ("yes" if lo > 0.5 else "partly" if lo > 0 else "no")
            + f": Spearman(attractor score, induction score) = {h['spearman']:+.3f} [{lo:+.3f}, {hi:+.3f}] over heads; "
            f"top-10 overlap {h['top_overlap']} (chance {h['top_overlap_chance']:.2f}, p = {h['top_overlap_p']:.2g})")
    if "prediction" in res:
        parts = []
        for k, v in res["prediction"].items():
            f, b = v["logistic_test"]["field"], v["logistic_test"]["baseline"]
            parts.append(f"k={k}: field {f[0]:.3f} [{f[1]:.3f}, {f[2]:.3f}] vs entropy/max-prob {b[0]:.3f} "
                         f"[{b[1]:.3f}, {b[2]:.3f}]")
        out["field predicts onset"] = "; ".join(parts)
    if "intervention" in res:
        iv = res["intervention"]
        t = {r["arm"]: r for r in iv["table"]}
        g, p = t[iv["arms"]["head_gains"]], t[iv["arms"]["penalty_matched"]]
        lo_red, cost = g["loop_reduction_ci"][0], g["ppl_cost"]
        target = ("not resolved (no base loop)" if np.isnan(g["loop_reduction"]) else
                  "reached" if lo_red >= 0.5 and cost <= 0.05 else
                  "not reached" if g["loop_reduction_ci"][1] < 0.5 or cost > 0.05 else "not resolved (CI spans 50%)")
        where = f"T = {iv['temperature']:g}" + (", loop-prone prompts" if iv.get("loop_prone_prompts") else "")
        out["intervention"] = (f"target (>= 50% fewer loops at <= 5% cost, at {where}) {target}: "
                               f"{iv['arms']['head_gains']} on {','.join(iv['heads'])}: loop rate "
                               f"{t['base']['loop_rate']:.2f} -> {g['loop_rate']:.2f} (reduction {g['loop_reduction']:+.2f} "
                               f"[{g['loop_reduction_ci'][0]:+.2f}, {g['loop_reduction_ci'][1]:+.2f}]) at ppl cost "
                               f"{g['ppl_cost']:+.3f}; {iv['arms']['penalty_matched']}: {p['loop_rate']:.2f} at "
                               f"{p['ppl_cost']:+.3f}")
    return out
