"""The analysis pipeline: :class:`Analysis` holds one model and one config, caches tokenised prompt
sets, gap tables and statistics, and runs each stage as a method that returns its result (and
writes its CSV / figures / report entries under ``cfg.out``). ``analysis.cli`` maps commands to
stages; ``analysis.beyond`` adds the stages beyond the two-body term; ``analysis.reproduce`` the
paper's table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from analysis.ablation import ScanResult, ablation_scan, ablation_table, mean_z_over, scan_flops
from analysis.config import check_config, default
from analysis.figures import fig_ablation, fig_causal, fig_heatmap, fig_landscape, fig_scatter, fig_temperature
from analysis.gaps import GapTable, compute_gaps, last_logits, pad_token_id
from analysis.landscape import decision_landscape
from analysis.prompts import PromptFileError, TokenizedSet, from_triples, load_prompts, tokenize_set
from analysis.report import PAPER_NUMBERS, render_markdown, write_csv
from analysis.stats import HeadStats, bh_q, head_regression, head_stats, pearson_many, r_pvalue, replication
from analysis.temperature import TemperatureSweep, temperature_sweep
from spindiff.config import ConfigError
from spindiff.lm.adapter import HeadList, HeadSpecError, get_adapter
from spindiff.lm.models import LoadedModel, context_window, load_model
from spindiff.lm.tokens import pad_left
from spindiff.runtime import atomic_write_json, atomic_write_text, notice, package_versions


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
        check_config(cfg)  # also run by compose(); here for configs built in code
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
        self.notes: list[str] = []  # what a stage chose for the user (printed and in the report)
        self._scans: dict[str, ScanResult] = {}
        self.cache: dict[str, Any] = {}  # results other stages reuse (analysis.beyond)

    def check_inputs(self) -> None:
        """What needs the model, checked right after it is loaded and before any run directory
        exists: the head specs lie inside it, every prompt set tokenises for it, an explicit
        ``ablate`` fits (the default falls back to the top heads).
        Raises a registered user error (HeadSpecError, PromptTokenError, ConfigError)."""
        c = self.cfg
        self.scan_heads()
        if c.head:
            self.one_head(c.head)
        if c.ablate != default("ablate"):
            self.ad.parse_heads(c.ablate)
        for spec in [c.prompts] + ([c.heldout] if c.heldout and str(c.heldout).lower() != "none" else []):
            # tokenised silently here (a failing run shows only its error); the stages warn later
            tokenize_set(self.tok, load_prompts(spec, c.variant), self.window, c.add_bos, c.candidates, warn=False)

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
                raise PromptFileError(f"prompt set '{spec}' has {X.shape[0]} usable prompts; statistics need at "
                                      "least 3 (add rows, or use prompts=extended)")
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

    def note(self, text: str) -> None:
        """Tell the user what a stage chose for them (``note:`` on stderr now, listed in the report)."""
        self.notes.append(text)
        notice(text, kind="note", once=False)

    def ablate_heads(self) -> HeadList:
        """``ablate``; when it is the default (the paper's GPT-2 Fig. 4 heads) and does not fit this
        model, the two top heads of the stats stage instead (said in a note)."""
        c = self.cfg
        try:
            return self.ad.parse_heads(c.ablate)
        except HeadSpecError as e:
            if c.ablate != default("ablate"):
                raise
            st = self.stats()
            heads = [(int(st.layer[k]), int(st.head[k])) for k in st.order[:2]]
            self.note(f"ablate={c.ablate} (the paper's GPT-2 Fig. 4 heads) does not fit {self.lm.name} ({e}); "
                      f"ablating the top heads of the stats stage instead: "
                      + ",".join(f"L{l}H{h}" for l, h in heads))
            return heads

    def step_ablate(self) -> list[dict[str, Any]]:
        c = self.cfg
        heads = self.ablate_heads()
        pset = from_triples([(c.ablation_prompt, c.ablation_good, c.ablation_bad)], name="ablation_prompt")
        ts = tokenize_set(self.tok, pset, self.window, c.add_bos, "first_token")
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

    def scan_ids(self) -> list[int]:
        """The scan's prompt ids: ``scan_prompts`` evenly spaced over the set, usable rows only."""
        ts, gt = self.tset(self.cfg.prompts), self.gaps()
        return [i for i in _evenly(len(ts), self.cfg.scan_prompts) if gt.valid[i]]

    def scan_heads(self) -> HeadList:
        return self.ad.parse_heads(self.cfg.scan_heads or self.cfg.heads)

    def exact_scan(self, mode: str) -> ScanResult:
        """Every scan head ablated alone on every scan prompt (the ground truth), cached per mode;
        its wall time is in ``timings['scan[mode]']``."""
        if mode not in self._scans:
            c, ids = self.cfg, self.scan_ids()
            mz = self.mean_z() if mode == "mean" else None
            t0 = time.perf_counter()
            self._scans[mode] = ablation_scan(self.model, self.ad, self.tset(c.prompts).subset(ids), self.scan_heads(),
                                              mode, mz, self.pad_id, c.batch_size, progress=c.progress,
                                              prompt_ids=ids)
            self.timings[f"scan[{mode}]"] = time.perf_counter() - t0
        return self._scans[mode]

    def step_scan(self) -> ScanResult:
        c = self.cfg
        ts, gt = self.tset(c.prompts), self.gaps()
        ids, heads = self.scan_ids(), self.scan_heads()
        res = self.exact_scan(c.ablation)
        secs = self.timings[f"scan[{c.ablation}]"]
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
            raise ConfigError(f"landscape_prompt={c.landscape_prompt} is outside the prompt set '{c.prompts}' "
                              f"(e.g. landscape_prompt=0; rows 0 .. {len(ts) - 1})")
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
        self.report["notes"] = list(self.notes)
        atomic_write_json(self.out / "report.json", _jsonable(self.report))
        if markdown and any(k in self.report for k in ("top_heads", "beyond", "paths", "pairs")):
            atomic_write_text(self.out / "report.md", render_markdown(self.report, self.figures))
        return self.report


def _jsonable(x: Any, nan_as_null: bool = False) -> Any:
    """Plain JSON types from numpy arrays / scalars and tuple keys; ``nan_as_null``: non-finite
    floats become null (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v, nan_as_null) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, nan_as_null) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), nan_as_null)
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if nan_as_null and isinstance(x, float) and not np.isfinite(x):
        return None
    return x
