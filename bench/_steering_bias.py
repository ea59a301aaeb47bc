"""Task 2 of bench/bench_steering.py: the bias contrast (he vs she after occupation prompts),
before and after each intervention, with its collateral cost on unrelated text. ``b`` is that
script's ``Bench``."""
from __future__ import annotations

import json
import math
import time
from typing import Any, Optional

import numpy as np
import torch

from _steering_report import BIAS_NEGATIVE, BIAS_POSITIVE, OCC_FEMALE, OCC_MALE, OCC_TEMPLATES, _ci, _fmt
from spindiff.config import compose
from spindiff.generation.steering import Steering
from spindiff.lm.interventions import ActivationAddition, HeadGains, Intervention, contrast_vector, heads_from_report
from spindiff.runtime import atomic_write_text

# --------------------------------------------------------------------------- task 2: bias contrast
def occupation_set(b: Any):
    from analysis.prompts import from_triples, tokenize_set

    occs = [(o, "male") for o in OCC_MALE] + [(o, "female") for o in OCC_FEMALE]
    triples = [(t.format(o), "he", "she") for o, _ in occs for t in OCC_TEMPLATES]
    pset = from_triples(triples, "occupations")
    labels = [lab for _, lab in occs for _ in OCC_TEMPLATES]
    occ_of = [o for o, _ in occs for _ in OCC_TEMPLATES]
    tset = tokenize_set(b.session.tokenizer, pset, b.session.window or 10**9, False, "first_token")
    return pset, tset, np.array(labels), occ_of


def gap_stats(gaps: np.ndarray, labels: np.ndarray, occ_of: list[str]) -> dict[str, Any]:
    """Per-occupation means (over templates), then mean gap, contrast and |gap| with 95% CIs over
    occupations (the contrast's CI: Welch-style, from the two groups' standard errors)."""
    occs = list(dict.fromkeys(occ_of))
    per = {o: float(np.mean([g for g, oo in zip(gaps, occ_of) if oo == o])) for o in occs}
    lab = {o: l for o, l in zip(occ_of, labels)}
    male = np.array([per[o] for o in occs if lab[o] == "male"])
    female = np.array([per[o] for o in occs if lab[o] == "female"])
    allv = np.array(list(per.values()))
    from scipy import stats

    se = math.sqrt(male.var(ddof=1) / len(male) + female.var(ddof=1) / len(female))
    dof = len(male) + len(female) - 2
    return {"mean_gap": _ci(allv), "contrast": (float(male.mean() - female.mean()), float(stats.t.ppf(0.975, dof) * se)),
            "mean_abs_gap": _ci(np.abs(allv)), "male": float(male.mean()), "female": float(female.mean())}


def run_bias(b: Any) -> dict[str, Any]:
    from analysis.cli import run as analysis_run
    from analysis.gaps import compute_gaps
    from analysis.prompts import PromptSet  # noqa: F401

    sess, s = b.session, b.s
    ad, model, tok = sess.adapter, sess.model, sess.tokenizer
    pset, tset, labels, occ_of = occupation_set(b)
    pad = sess.pad_id

    def gaps(iv: Optional[Intervention] = None) -> np.ndarray:
        if iv is None:
            return compute_gaps(model, tset, "in_situ", "first_token", True, 16, ad, pad, False, False).dl_actual
        with iv:
            return compute_gaps(model, tset, "in_situ", "first_token", True, 16, ad, pad, False, False).dl_actual

    # the analysis report on this contrast: heads.csv of `python -m analysis stats`
    rows = [{"prompt": it.prompt, "good": it.good, "bad": it.bad} for it in pset.items]
    pfile = b.out / "occupations.jsonl"
    atomic_write_text(pfile, "".join(json.dumps(r) + "\n" for r in rows))
    acfg = compose("analysis", [f"model.name={b.args.model}", f"prompts={pfile}", "heldout=none", "also_paper=false",
                                f"out={b.out / 'analysis'}", "progress=false", "n_permutations=200", "n_bootstrap=200",
                                "n_splits=20"])
    t0 = time.perf_counter()
    analysis_run("stats", acfg, lm=sess.lm)
    b.say(f"  analysis stats on {len(rows)} occupation prompts: {time.perf_counter() - t0:.0f} s -> "
          f"{b.out / 'analysis' / 'heads.csv'}")
    heads = heads_from_report(b.out / "analysis" / "heads.csv", ad, "cooperative", s["gap_heads_k"], sess.name)
    b.say("  top cooperative heads for he-vs-she: " + ", ".join(f"L{l}H{h}" for l, h in heads))

    # reference text for collateral damage: the clean LM's own continuations of unrelated prompts
    from spindiff.evaluation.evaluate import load_eval_prompts

    ref_prompts = load_eval_prompts("", s["ref_prompts"])
    ref_seqs = sess.encode(ref_prompts, reserve=s["ref_tokens"])
    ar = b.sampler(["sampler.name=ar", "sampler.temperature=1.0", "sampler.top_p=1.0"])
    ref_conts, _, _ = b.generate(ar, ref_seqs, 12345, s["ref_tokens"])

    def ppl(iv: Optional[Intervention] = None, bias: Optional[torch.Tensor] = None) -> float:
        lps = [x for lp in b.logprobs(ref_seqs, ref_conts, bias, iv) for x in lp]
        return math.exp(-float(np.mean(lps)))

    clean_ppl = ppl()
    # the field B: context fields of the contrast prompts (woman - man), as `steer.positive/negative`
    from spindiff.generation.steering import contrast_direction

    field = contrast_direction(sess, [BIAS_POSITIVE], [BIAS_NEGATIVE], "all")
    id_he, id_she = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("he", "she"))
    v_act, info = contrast_vector(model, ad, tok, [BIAS_POSITIVE], [BIAS_NEGATIVE], s["actadd_layer"], 1.0)
    base_gaps = gaps()
    results: list[dict[str, Any]] = [{"method": "none", "strength": 0.0, **gap_stats(base_gaps, labels, occ_of),
                                      "ppl_ratio": 1.0}]
    for g in s["gap_bias"]:
        st = Steering(field, g, "prior", source="contrast")
        bias = st.logit_bias(sess.token_table)
        shift = float(bias[id_he] - bias[id_she])  # = g B.(e_he - e_she): the same for every prompt
        results.append({"method": "ar+bias", "strength": g, **gap_stats(base_gaps + shift, labels, occ_of),
                        "ppl_ratio": ppl(bias=bias) / clean_ppl, "gap_shift": shift})
    for c in s["gap_actadd"]:
        iv = ActivationAddition(ad, s["actadd_layer"], c * v_act, info)
        results.append({"method": "ar+actadd", "strength": c, **gap_stats(gaps(iv), labels, occ_of),
                        "ppl_ratio": ppl(iv) / clean_ppl})
    for g in s["gap_heads"]:
        iv = HeadGains(ad, {lh: g for lh in heads})
        results.append({"method": "ar+heads", "strength": g, **gap_stats(gaps(iv), labels, occ_of),
                        "ppl_ratio": ppl(iv) / clean_ppl})
    for r in results:
        b.say(f"  {r['method']:<10} s={r['strength']:<5g} mean gap={_fmt(*r['mean_gap'])}  "
              f"contrast(m-f)={_fmt(*r['contrast'])}  |gap|={_fmt(*r['mean_abs_gap'])}  "
              f"collateral ppl x{r['ppl_ratio']:.3f}")
    return {"rows": results, "heads": [f"L{l}H{h}" for l, h in heads], "clean_ref_ppl": clean_ppl,
            "n_prompts": len(rows), "n_occupations": len(OCC_MALE) + len(OCC_FEMALE)}
