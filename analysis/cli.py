"""``python -m analysis <command> [key=value ...]``: thin CLI over :class:`Analysis`.

Every command composes the ``analysis`` config (``configs/analysis.yaml`` + overrides), calls
``prepare_run`` (config.yaml, run.json with versions and seeds) and ``record_model`` (the model
actually used), and returns a dict of results (``main([...])`` in tests).
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from analysis.ablation import ScanResult, ablation_scan, ablation_table, mean_z_over, scan_flops
from analysis.figures import fig_ablation, fig_causal, fig_heatmap, fig_landscape, fig_scatter, fig_temperature
from analysis.gaps import PROTOCOLS, GapTable, compute_gaps, last_logits, pad_token_id
from analysis.landscape import decision_landscape
from analysis.prompts import (PromptFileError, PromptTokenError, TokenizedSet, from_triples, load_prompts,
                              pad_left, tokenize_set)
from analysis.report import PAPER_NUMBERS, fnum, md_table, render_markdown, write_csv
from analysis.stats import HeadStats, bh_q, head_regression, head_stats, pearson_many, r_pvalue, replication
from analysis.temperature import TemperatureSweep, temperature_sweep
from spindiff.lm.adapter import HeadList, HeadSpecError, get_adapter
from spindiff.config import ConfigError, parse_cli
from spindiff.lm.models import LoadedModel, ModelLoadError, context_window, load_model
from spindiff.runtime import atomic_write_json, atomic_write_text, package_versions, prepare_run, record_model

USAGE = """\
python -m analysis <command> [key=value ...]

Per-head spin-bath logit-gap analysis (docs/analysis.md).

commands:
  gaps         dL_theory of every head and dL_actual of every prompt          -> gaps.csv
  stats        gaps + per-head r, p, BH q, permutation FWER, bootstrap CI,
               split-half stability, held-out replication, Fig. 1, heatmap    -> heads.csv, report.json/.md
  ablate       zero- and mean-ablation of `ablate` heads on ablation_prompt   -> ablation.csv, fig4_ablation.png
  scan         every head ablated alone on scan_prompts prompts; does
               dL_theory predict the causal effect?                           -> scan.csv, fig_causal.png
  temperature  mean entropy (bits) and P(top-1) vs T, one forward per prompt  -> temperature.csv, fig3_temperature.png
  landscape    Fig. 2 decision plane of `head` on prompt `landscape_prompt`   -> fig2_landscape.png
  all          everything above                                              -> + report.json, report.md
  reproduce    the paper's GPT-2 table (protocol paper vs paper_fixed vs in_situ, Fig. 4 numbers)

examples:
  python -m analysis all model.name=smollm2-135m out=runs/analysis-smollm2
  python -m analysis stats prompts=paper protocol=paper model.name=smollm2-135m
  python -m analysis ablate ablate=L3H5,L0H0 model.name=smollm2-135m
  python -m analysis reproduce model.name=gpt2      (needs hub access; falls back to smollm2-135m offline)
"""

USER_ERRORS = (PromptFileError, PromptTokenError, HeadSpecError, ModelLoadError, ConfigError, ValueError)


def _evenly(n_total: int, n: int) -> list[int]:
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, n).round().astype(int).tolist()))


class Analysis:
    """One model, one config: computes and caches gap tables and statistics, writes outputs.

    Args:
        cfg: a composed ``analysis`` config (``cfg.out`` must be set, e.g. by ``prepare_run``).
        lm: an already loaded model (default: ``load_model(cfg.model)``).
    """

    def __init__(self, cfg: DictConfig, lm: LoadedModel | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.lm = lm or load_model(cfg.model)
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.ad = get_adapter(self.model, self.lm.name)
        self.pad_id = pad_token_id(self.tok)
        self.window = context_window(self.model) or 10**9
        if cfg.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol={cfg.protocol}: use one of {', '.join(PROTOCOLS)}")
        if cfg.candidates not in ("first_token", "full"):
            raise ConfigError(f"candidates={cfg.candidates}: use first_token or full")
        if cfg.ablation not in ("zero", "mean"):
            raise ConfigError(f"ablation={cfg.ablation}: use zero or mean")
        self.family: HeadList = self.ad.parse_heads(cfg.heads)
        H = self.ad.n_heads
        self.family_idx = np.array([l * H + h for l, h in self.family])
        self._tsets: dict[str, TokenizedSet] = {}
        self._gaps: dict[tuple[str, str], GapTable] = {}
        self._stats: dict[tuple[str, str], HeadStats] = {}
        self._mean_z: Any = None
        self.report: dict[str, Any] = {}
        self.figures: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def tset(self, spec: str) -> TokenizedSet:
        """The tokenised prompt set ``spec`` (bundled name or file), cached."""
        if spec not in self._tsets:
            pset = load_prompts(spec, self.cfg.variant)
            self._tsets[spec] = tokenize_set(self.tok, pset, self.window, self.cfg.add_bos, self.cfg.candidates)
        return self._tsets[spec]

    def prompts_info(self, spec: str) -> dict[str, Any]:
        ts = self.tset(spec)
        multi_rows = {m["prompt_id"] for m in ts.multi_token}
        return {"name": ts.pset.name, "source": ts.pset.source, "variant": ts.pset.variant, "n": len(ts),
                "n_rows_single_token": len(ts) - len(multi_rows), "multi_token": ts.multi_token,
                "shared_first": ts.shared_first}

    def gaps(self, spec: str | None = None, protocol: str | None = None, keep_logits: bool = False) -> GapTable:
        spec, protocol = spec or self.cfg.prompts, protocol or self.cfg.protocol
        key = (spec, protocol)
        if key not in self._gaps or (keep_logits and self._gaps[key].last_logits is None):
            t0 = time.perf_counter()
            self._gaps[key] = compute_gaps(self.model, self.tset(spec), protocol, self.cfg.candidates,
                                           self.cfg.final_norm, self.cfg.batch_size, self.ad, self.pad_id,
                                           keep_logits, self.cfg.progress)
            self.timings[f"gaps[{spec},{protocol}]"] = time.perf_counter() - t0
        return self._gaps[key]

    def design(self, gt: GapTable) -> tuple[np.ndarray, np.ndarray]:
        """X (P_valid, K_family), y (P_valid,) for the statistics."""
        return gt.flat()[gt.valid][:, self.family_idx], gt.dl_actual[gt.valid]

    def stats(self, spec: str | None = None, protocol: str | None = None) -> HeadStats:
        spec, protocol = spec or self.cfg.prompts, protocol or self.cfg.protocol
        key = (spec, protocol)
        if key not in self._stats:
            X, y = self.design(self.gaps(spec, protocol))
            if X.shape[0] < 3:
                raise ValueError(f"prompt set '{spec}' has {X.shape[0]} usable prompts; statistics need at least 3")
            c = self.cfg
            t0 = time.perf_counter()
            self._stats[key] = head_stats(X, y, np.array([l for l, _ in self.family]),
                                          np.array([h for _, h in self.family]), c.n_permutations, c.n_bootstrap,
                                          c.n_splits, c.top_k, c.seed)
            self.timings[f"stats[{spec},{protocol}]"] = time.perf_counter() - t0
        return self._stats[key]

    def mean_z(self) -> Any:
        if self._mean_z is None:
            self._mean_z = mean_z_over(self.model, self.ad, self.tset(self.cfg.prompts), self.pad_id,
                                       self.cfg.batch_size)
        return self._mean_z

    def one_head(self, spec: str) -> tuple[int, int]:
        heads = self.ad.parse_heads(spec)
        if len(heads) != 1:
            raise HeadSpecError(f"head={spec} names {len(heads)} heads; give exactly one, e.g. head=L3H5")
        return heads[0]

    # ------------------------------------------------------------------ steps
    def step_gaps(self) -> GapTable:
        gt = self.gaps(keep_logits=True)
        write_csv(self.out / "gaps.csv", ["prompt_id", "layer", "head", "dl_theory", "dl_actual"], gt.rows())
        self.report.update(self._header())
        print(f"gaps: {gt.n_prompts} prompts x {gt.n_layers * gt.n_heads} heads ({gt.protocol}) -> "
              f"{self.out / 'gaps.csv'}")
        return gt

    def _header(self) -> dict[str, Any]:
        """Model, protocol, prompt set, seeds, versions (computes the main gap table if needed)."""
        return {**self._meta(), "prompts": self.prompts_info(self.cfg.prompts),
                "n_prompts": int(self.gaps().valid.sum())}

    def _meta(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": self.lm.info, "model_used": self.lm.name, "protocol": c.protocol,
                "candidates": c.candidates, "final_norm": bool(c.final_norm), "alpha": c.alpha,
                "heads_family": c.heads, "n_heads": len(self.family),
                "seeds": {"seed": c.seed, "permutation": c.seed, "bootstrap": c.seed + 1, "split_half": c.seed + 2},
                "versions": package_versions(),
                "candidate_rule": ("first token of ' ' + word; dL_actual = logit gap at the last position"
                                   if c.candidates == "first_token" else
                                   "dL_actual = log P(' ' + good) - log P(' ' + bad) over all candidate tokens; "
                                   "dL_theory uses the first tokens' unembedding difference")}

    def step_stats(self) -> HeadStats:
        c = self.cfg
        gt, st = self.gaps(), self.stats()
        self.report.update(self._header())
        alpha = c.alpha
        surviving = [st.name(int(k)) for k in st.order if st.p_fwer[k] < alpha]
        self.report.update({
            "top_heads": st.ranked(c.top_k),
            "heads_ranked": [{"layer": int(st.layer[k]), "head": int(st.head[k]), "r": float(st.r[k])}
                             for k in st.order],
            "family_wise": {"max_abs_r": st.perm.observed_max, "p_family": st.perm.p_family,
                            "threshold_abs_r": st.perm.threshold(alpha), "n_permutations": st.perm.n_permutations,
                            "n_heads": len(self.family), "surviving": surviving,
                            "method": "max-|r| permutation of dL_actual (Westfall-Young max-T)"},
            "bh": {"n_significant": int((st.q_bh < alpha).sum()),
                   "heads": [st.name(int(k)) for k in st.order if st.q_bh[k] < alpha]},
            "split_half": st.split,
        })
        rep_cols: dict[str, np.ndarray] = {}
        if c.heldout and c.heldout.lower() != "none":
            Xh, yh = self.design(self.gaps(c.heldout))
            rp = replication(st, Xh, yh, c.top_k, alpha)
            rep_cols = {"r_heldout": rp.pop("r_heldout_all"), "p_heldout": rp.pop("p_heldout_all")}
            rp["set"] = self.prompts_info(c.heldout)["name"]
            rp["prompts"] = self.prompts_info(c.heldout)
            self.report["replication"] = rp
        if c.also_paper and c.prompts != "paper":
            self.report["paper_set"] = self._paper_set(st)
        rank = np.empty(len(st.r), int)
        rank[st.order] = np.arange(1, len(st.r) + 1)
        cols = ["layer", "head", "r", "p", "q_bh", "r_ci_low", "r_ci_high", "p_fwer", "r2", "slope", "intercept",
                "rank", "role"] + list(rep_cols)
        rows = [[int(st.layer[k]), int(st.head[k]), st.r[k], st.p[k], st.q_bh[k], st.r_ci_low[k], st.r_ci_high[k],
                 st.p_fwer[k], st.r2[k], st.slope[k], st.intercept[k], int(rank[k]),
                 "cooperative" if st.r[k] > 0 else "antagonistic"] + [float(v[k]) for v in rep_cols.values()]
                for k in range(len(st.r))]
        write_csv(self.out / "heads.csv", cols, rows)
        # figures: heatmap of r, Fig. 1 scatter of the chosen head
        L, H = self.ad.n_layers, self.ad.n_heads
        rmap = np.full((L, H), np.nan)
        rmap[st.layer, st.head] = st.r
        top = [(int(st.layer[k]), int(st.head[k])) for k in st.order[: c.top_k]]
        self.figures["heatmap"] = Path(fig_heatmap(
            rmap, self.out / "fig_heatmap_r.png", f"{self.lm.name} [{c.protocol}] r over {st.n} prompts "
            f"('{self.tset(c.prompts).pset.name}'); boxes: top {c.top_k}", top)).name
        l, h = self.one_head(c.head) if c.head else top[0]
        x = gt.dl_theory[gt.valid, l, h]
        reg = head_regression(x[:, None], gt.dl_actual[gt.valid])
        labels = [str(i) for i in np.nonzero(gt.valid)[0]]
        self.figures["fig1"] = Path(fig_scatter(
            x, gt.dl_actual[gt.valid], f"L{l}H{h}", float(reg["r"][0]), float(reg["p"][0]), float(reg["slope"][0]),
            float(reg["intercept"][0]), self.out / "fig1_scatter.png", f" [{c.protocol}]", labels)).name
        t = self.report["top_heads"]
        print(f"stats: top heads " + ", ".join(f"{r['name']} r={r['r']:+.3f} q={r['q_bh']:.2g}" for r in t[:5])
              + f"; family-wise p = {st.perm.p_family:.3g} -> {self.out / 'heads.csv'}")
        return st

    def _paper_set(self, main: HeadStats) -> dict[str, Any]:
        """Rank heads on the paper's 20 prompts; test their r on the main set."""
        c = self.cfg
        ps = self.stats("paper")
        top = ps.ranked(c.top_k)
        idx = [main.index_of(r["layer"], r["head"]) for r in top]
        q = bh_q(np.array([main.p[k] for k in idx]))
        for r, k, qq in zip(top, idx, q):
            r["r_on_main"] = float(main.r[k])
            r["p_on_main"] = float(main.p[k])
            r["replicated"] = bool(np.sign(main.r[k]) == np.sign(r["r"]) and qq < c.alpha)
        return {"n_prompts": ps.n, "top_heads": top, "prompts": self.prompts_info("paper"),
                "family_wise": {"p_family": ps.perm.p_family, "threshold_abs_r": ps.perm.threshold(c.alpha),
                                "max_abs_r": ps.perm.observed_max},
                "n_top_replicated": int(sum(r["replicated"] for r in top))}

    def step_ablate(self) -> list[dict[str, Any]]:
        c = self.cfg
        heads = self.ad.parse_heads(c.ablate)
        pset = from_triples([(c.ablation_prompt, c.ablation_good, c.ablation_bad)], name="ablation_prompt")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ts = tokenize_set(self.tok, pset, self.window, c.add_bos, "first_token")
        for w in caught:
            print(f"warning: {w.message}")
        rows = ablation_table(self.model, self.ad, ts, heads, ("zero", "mean"), self.mean_z(), self.pad_id)
        for r in rows:
            r.update(prompt=c.ablation_prompt, good=c.ablation_good, bad=c.ablation_bad)
        write_csv(self.out / "ablation.csv", ["prompt_id", "prompt", "good", "bad", "mode", "ablated", "dl_base",
                                              "dl_ablated", "delta"], rows)
        self.figures["fig4"] = Path(fig_ablation(
            rows, self.out / "fig4_ablation.png",
            f"{self.lm.name}: '{c.ablation_prompt}' {c.ablation_good} vs {c.ablation_bad}")).name
        self.report["ablation"] = {
            "prompt": c.ablation_prompt, "good": c.ablation_good, "bad": c.ablation_bad, "baseline": rows[0]["dl_base"],
            "rows": [{k: r[k] for k in ("mode", "ablated", "dl_ablated", "delta")} for r in rows],
            "multi_token": [f"{m['word']} -> {m['tokens']}" for m in ts.multi_token],
            "mean_over": f"every real token of '{c.prompts}'", "paper_gpt2": PAPER_NUMBERS["ablation"]}
        print(f"ablate: baseline dL = {rows[0]['dl_base']:+.3f}; " + ", ".join(
            f"{r['ablated']}[{r['mode']}] {r['dl_ablated']:+.3f}" for r in rows) + f" -> {self.out / 'ablation.csv'}")
        return rows

    def step_scan(self) -> ScanResult:
        c = self.cfg
        ts, gt = self.tset(c.prompts), self.gaps()
        ids = [i for i in _evenly(len(ts), c.scan_prompts) if gt.valid[i]]
        heads = self.ad.parse_heads(c.scan_heads or c.heads)
        mz = self.mean_z() if c.ablation == "mean" else None
        t0 = time.perf_counter()
        res = ablation_scan(self.model, self.ad, ts.subset(ids), heads, c.ablation, mz, self.pad_id, c.batch_size,
                            progress=c.progress, prompt_ids=ids)
        secs = time.perf_counter() - t0
        hl, hh = np.array([l for l, _ in heads]), np.array([h for _, h in heads])
        theory = gt.dl_theory[ids][:, hl, hh]  # (n, K)
        eff = res.effect
        r_pool = float(pearson_many(theory.reshape(-1, 1), eff.reshape(-1))[0])
        r_prompt = pearson_many(theory[:, :, None], eff)[:, 0]  # (n,)
        r_means = float(pearson_many(theory.mean(0)[:, None], eff.mean(0))[0])
        fl = scan_flops(self.ad, [len(ts.ids[i]) for i in ids], heads)
        order = np.argsort(-np.abs(eff).mean(0))[:10]
        rows = [[p, l, h, res.base[i], res.ablated[i, k], eff[i, k], theory[i, k]]
                for i, p in enumerate(ids) for k, (l, h) in enumerate(heads)]
        write_csv(self.out / "scan.csv", ["prompt_id", "layer", "head", "dl_base", "dl_ablated", "delta",
                                          "dl_theory"], rows)
        self.figures["causal"] = Path(fig_causal(theory, eff, self.out / "fig_causal.png", r_pool,
                                                 f"{self.lm.name} [{c.protocol}, {c.ablation}-ablation]")).name
        self.report["scan"] = {
            "mode": c.ablation, "n_prompts": len(ids), "prompt_ids": ids, "n_heads": len(heads),
            "r_theory_effect": r_pool, "p_theory_effect": float(r_pvalue(np.array(r_pool), theory.size)),
            "r_per_prompt_median": float(np.median(r_prompt)), "r_head_means": r_means,
            "top_causal": [{"name": f"L{heads[k][0]}H{heads[k][1]}", "mean_effect": float(eff[:, k].mean()),
                            "mean_abs_effect": float(np.abs(eff[:, k]).mean()),
                            "mean_theory": float(theory[:, k].mean())} for k in order],
            "seconds": secs, "gflop_fast": fl["fast_flops"] / 1e9, "gflop_full": fl["full_flops"] / 1e9,
            "gflop_per_s": fl["fast_flops"] / 1e9 / max(secs, 1e-9),
            "gap": "first-token logit gap (as Fig. 4)"}
        print(f"scan: {len(heads)} heads x {len(ids)} prompts in {secs:.1f} s ({fl['fast_flops'] / 1e9:.0f} GFLOP); "
              f"r(dL_theory, effect) = {r_pool:+.3f} -> {self.out / 'scan.csv'}")
        return res

    def step_temperature(self) -> TemperatureSweep:
        c = self.cfg
        gt = self._gaps.get((c.prompts, c.protocol))
        if gt is not None and gt.last_logits is not None:
            logits = gt.last_logits
        else:  # one forward per prompt (batched)
            ts = self.tset(c.prompts)
            chunks = []
            for i in range(0, len(ts), c.batch_size):
                ids, mask = pad_left(ts.ids[i:i + c.batch_size], self.pad_id)
                chunks.append(last_logits(self.model, ids, mask).float())
            logits = torch.cat(chunks)
        temps = np.linspace(c.t_min, c.t_max, c.t_steps)
        sw = temperature_sweep(logits, temps)
        write_csv(self.out / "temperature.csv", ["T", "entropy_bits", "p_top1", "entropy_bits_sd", "p_top1_sd"],
                  sw.rows())
        self.figures["fig3"] = Path(fig_temperature(sw, self.out / "fig3_temperature.png", self.lm.name)).name
        self.report["temperature"] = {
            "t_min": float(temps[0]), "t_max": float(temps[-1]), "n_T": len(temps),
            "entropy_bits_at_tmin": float(sw.entropy_bits[0]), "entropy_bits_at_tmax": float(sw.entropy_bits[-1]),
            "p_top1_at_tmin": float(sw.p_top1[0]), "p_top1_at_tmax": float(sw.p_top1[-1]),
            "paper_gpt2": PAPER_NUMBERS["temperature"]}
        print(f"temperature: entropy {sw.entropy_bits[0]:.3f} -> {sw.entropy_bits[-1]:.2f} bits, P(top-1) "
              f"{sw.p_top1[0]:.3f} -> {sw.p_top1[-1]:.3f} over T in [{temps[0]}, {temps[-1]}]")
        return sw

    def step_landscape(self) -> Any:
        c = self.cfg
        ts = self.tset(c.prompts)
        if not 0 <= c.landscape_prompt < len(ts):
            raise ValueError(f"landscape_prompt={c.landscape_prompt} is outside the prompt set '{c.prompts}' "
                             f"(0 .. {len(ts) - 1})")
        if c.head:
            l, h = self.one_head(c.head)
        else:
            st = self.stats()
            k = int(st.order[0])
            l, h = int(st.layer[k]), int(st.head[k])
        ls = decision_landscape(self.ad, self.model, ts, c.landscape_prompt, l, h, c.protocol, c.final_norm,
                                self.pad_id)
        self.figures["fig2"] = Path(fig_landscape(ls, self.out / "fig2_landscape.png")).name
        self.report["landscape"] = {"head": f"L{l}H{h}", "prompt_id": ls.prompt_id, "prompt": ls.prompt,
                                    "good": ls.good, "bad": ls.bad, "dl_theory": ls.dl_theory,
                                    "N0_dot_S_good": float(ls.N0 @ ls.S_good), "N0_dot_S_bad": float(ls.N0 @ ls.S_bad)}
        print(f"landscape: L{l}H{h} on prompt #{ls.prompt_id}: N0.(S_good - S_bad) = {ls.dl_theory:+.4f}")
        return ls

    def write_report(self, markdown: bool = True) -> dict[str, Any]:
        """report.json (always with the model used, versions and seeds) and, after stats, report.md."""
        for k, v in self._meta().items():
            self.report.setdefault(k, v)
        self.report["timings_s"] = {k: round(v, 3) for k, v in self.timings.items()}
        self.report["figures"] = dict(self.figures)
        atomic_write_json(self.out / "report.json", _jsonable(self.report))
        if markdown and "top_heads" in self.report:
            atomic_write_text(self.out / "report.md", render_markdown(self.report, self.figures))
        return self.report


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


# --------------------------------------------------------------------------- commands
def cmd_gaps(A: Analysis) -> dict[str, Any]:
    gt = A.step_gaps()
    return {"gaps": gt, "report": A.write_report(markdown=False)}


def cmd_stats(A: Analysis) -> dict[str, Any]:
    gt = A.step_gaps()
    st = A.step_stats()
    return {"gaps": gt, "stats": st, "report": A.write_report()}


def cmd_ablate(A: Analysis) -> dict[str, Any]:
    rows = A.step_ablate()
    return {"ablation": rows, "report": A.write_report(markdown=False)}


def cmd_scan(A: Analysis) -> dict[str, Any]:
    res = A.step_scan()
    return {"scan": res, "report": A.write_report(markdown=False)}


def cmd_temperature(A: Analysis) -> dict[str, Any]:
    sw = A.step_temperature()
    return {"temperature": sw, "report": A.write_report(markdown=False)}


def cmd_landscape(A: Analysis) -> dict[str, Any]:
    ls = A.step_landscape()
    return {"landscape": ls, "report": A.write_report(markdown=False)}


def cmd_all(A: Analysis) -> dict[str, Any]:
    t0 = time.perf_counter()
    gt = A.step_gaps()
    st = A.step_stats()
    ab = A.step_ablate()
    sc = A.step_scan()
    sw = A.step_temperature()
    ls = A.step_landscape()
    A.timings["all"] = time.perf_counter() - t0
    rep = A.write_report()
    print(f"all: done in {A.timings['all']:.0f} s -> {A.out / 'report.md'}")
    return {"gaps": gt, "stats": st, "ablation": ab, "scan": sc, "temperature": sw, "landscape": ls, "report": rep}


PAPER_HEADS = ("L3H5", "L0H2", "L0H7")


def cmd_reproduce(A: Analysis) -> dict[str, Any]:
    """The paper's table under protocol=paper and the corrected protocols side by side."""
    c = A.cfg
    spec = "paper"
    out_stats: dict[str, HeadStats] = {}
    for proto in PROTOCOLS:
        A.gaps(spec, proto)
        out_stats[proto] = A.stats(spec, proto)
    A.report.update(A._header())
    A.report["prompts"] = A.prompts_info(spec)
    known = {}
    rows = []
    for name in PAPER_HEADS:
        try:
            l, h = A.one_head(name)
        except HeadSpecError as e:
            known[name] = str(e)
            continue
        row = {"head": name, "paper_r": PAPER_NUMBERS["heads"][name]}
        for proto, st in out_stats.items():
            k = st.index_of(l, h)
            row[f"r_{proto}"] = float(st.r[k]) if k is not None else float("nan")
            row[f"p_{proto}"] = float(st.p[k]) if k is not None else float("nan")
            row[f"rank_{proto}"] = int(np.nonzero(st.order == k)[0][0]) + 1 if k is not None else -1
        rows.append(row)
    tops = {proto: st.ranked(5) for proto, st in out_stats.items()}
    fw = {proto: {"p_family": st.perm.p_family, "threshold_abs_r": st.perm.threshold(c.alpha),
                  "surviving": [st.name(int(k)) for k in st.order if st.p_fwer[k] < c.alpha]}
          for proto, st in out_stats.items()}
    for proto, st in out_stats.items():
        rmap = np.full((A.ad.n_layers, A.ad.n_heads), np.nan)
        rmap[st.layer, st.head] = st.r
        A.figures[f"heatmap_{proto}"] = Path(fig_heatmap(
            rmap, A.out / f"fig_heatmap_r_{proto}.png", f"{A.lm.name} [{proto}] r over {st.n} paper prompts",
            [(int(st.layer[k]), int(st.head[k])) for k in st.order[:5]])).name
    abl = None
    try:
        heads = A.ad.parse_heads("L3H5,L0H0")
    except HeadSpecError as e:
        known["ablation"] = str(e)
    else:
        pset = from_triples([("Lions are carnivores. Cows are", "herbivores", "omnivores")], name="fig4")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = tokenize_set(A.tok, pset, A.window, c.add_bos, "first_token")
        abl = ablation_table(A.model, A.ad, ts, heads, ("zero",), None, A.pad_id)
    # one table, printed and written
    cols = ["head", "paper_r"] + [f"{k}_{p}" for p in PROTOCOLS for k in ("r", "p", "rank")]
    write_csv(A.out / "reproduce.csv", cols, rows)
    if abl:
        write_csv(A.out / "ablation.csv", ["prompt_id", "mode", "ablated", "dl_base", "dl_ablated", "delta"], abl)
    A.report.update({"reproduce": {"paper_heads": rows, "top5": tops, "family_wise": fw, "not_in_model": known,
                                   "ablation_fig4": abl, "paper_numbers": PAPER_NUMBERS},
                     "heads_ranked": [{"layer": int(out_stats[c.protocol].layer[k]),
                                       "head": int(out_stats[c.protocol].head[k]),
                                       "r": float(out_stats[c.protocol].r[k])} for k in out_stats[c.protocol].order]})
    md = _reproduce_md(A, rows, tops, fw, abl, known)
    A.report["timings_s"] = {k: round(v, 3) for k, v in A.timings.items()}
    atomic_write_json(A.out / "report.json", _jsonable(A.report))
    atomic_write_text(A.out / "report.md", md)
    print(md)
    return {"stats": out_stats, "rows": rows, "ablation": abl, "report": A.report}


def _reproduce_md(A: Analysis, rows, tops, fw, abl, known) -> str:
    m = A.lm.info
    lines = [f"# Reproduction of the paper's GPT-2 numbers: model used = **{m['used']}**", ""]
    if m["used"] != "gpt2" and not str(m["used"]).startswith("gpt2"):
        lines += [f"> The paper's numbers are for GPT-2 small; this run used **{m['used']}** "
                  f"(requested '{m['requested']}'{'; ' + m['fallback_reason'] if m.get('fallback_reason') else ''}). "
                  "Head indices do not correspond across models.", ""]
    lines += ["Prompt set: the paper's 20 prompts with the reference code's 'twenty' variant; candidates = first "
              "token of ' ' + word; no BOS.", "",
              "## Paper heads, r over the 20 prompts", "",
              md_table(["head", "paper (GPT-2)"] + [f"r [{p}]" for p in PROTOCOLS] + [f"rank [{p}]" for p in PROTOCOLS],
                       [[r["head"], fnum(r["paper_r"])] + [fnum(r[f"r_{p}"]) for p in PROTOCOLS]
                        + [r[f"rank_{p}"] for p in PROTOCOLS] for r in rows]), ""]
    for k, v in known.items():
        lines += [f"- {k}: {v}"]
    lines += ["", "## Top 5 heads by |r| per protocol", "",
              md_table(["rank"] + list(PROTOCOLS),
                       [[i + 1] + [f"{tops[p][i]['name']} ({fnum(tops[p][i]['r'])}, p={fnum(tops[p][i]['p'])})"
                                   if i < len(tops[p]) else "" for p in PROTOCOLS] for i in range(5)]), "",
              md_table(["", *PROTOCOLS],
                       [["family-wise p (max abs r permutation)"] + [fnum(fw[p]["p_family"]) for p in PROTOCOLS],
                        ["abs r needed to survive"] + [fnum(fw[p]["threshold_abs_r"]) for p in PROTOCOLS],
                        ["heads surviving"] + [", ".join(fw[p]["surviving"]) or "none" for p in PROTOCOLS]]), ""]
    if abl:
        pn = PAPER_NUMBERS["ablation"]
        base = abl[0]["dl_base"]
        vals = {r["ablated"]: r["dl_ablated"] for r in abl}
        lines += ["## Fig. 4: 'Lions are carnivores. Cows are' herbivores vs omnivores (zero-ablation)", "",
                  md_table(["", "paper (GPT-2)", m["used"]],
                           [["baseline dL", pn["baseline"], fnum(base)],
                            ["L3H5 ablated", pn["L3H5"], fnum(vals.get("L3H5"))],
                            ["L0H0 ablated", pn["L0H0"], fnum(vals.get("L0H0"))]]), ""]
    for p in PROTOCOLS:
        lines += [f"![r heatmap {p}]({A.figures[f'heatmap_{p}']})", ""]
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[Analysis], dict[str, Any]]] = {
    "gaps": cmd_gaps, "stats": cmd_stats, "ablate": cmd_ablate, "scan": cmd_scan, "temperature": cmd_temperature,
    "landscape": cmd_landscape, "all": cmd_all, "reproduce": cmd_reproduce}


def run(command: str, cfg: DictConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run ``command`` with a composed config (raises on bad input). Writes config.yaml/run.json."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}'; choose one of {', '.join(COMMANDS)}")
    if command == "reproduce":
        cfg.prompts, cfg.variant, cfg.candidates, cfg.heldout, cfg.also_paper = "paper", "reference", "first_token", "", False
    out = prepare_run(cfg, "analysis")
    lm = lm or load_model(cfg.model)
    record_model(out, lm.info)
    if lm.fallback_reason:
        print(f"note: model used = {lm.name} ({lm.fallback_reason})")
    else:
        print(f"model: {lm.name} ({lm.info['n_layers']} layers x {lm.info['n_heads']} heads)")
    A = Analysis(cfg, lm)
    res = COMMANDS[command](A)
    res.update({"command": command, "out": str(out), "model": lm.name, "analysis": A})
    return res


def main(argv: Sequence[str] | None = None, lm: LoadedModel | None = None) -> dict[str, Any]:
    """CLI entry point; returns the results dict of the command. Bad input -> one-line error, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        cfg = parse_cli("analysis", ["--help"], USAGE)  # prints usage + config tree, exits 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of {', '.join(COMMANDS)} (--help for usage)",
              file=sys.stderr)
        raise SystemExit(2)
    cfg = parse_cli("analysis", rest, USAGE)
    try:
        return run(command, cfg, lm)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
