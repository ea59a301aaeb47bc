"""The benchmark's verdict logic (bench/bench_generation.py): CI overlap, direction per metric,
and the sections of the plain-language answer, on synthetic results (no model)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from spindiff.evaluation.evaluate import EvalResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bg():
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "bench" / "bench_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _res(label: str, tv: list[float], ppl: list[float], logp: list[float] | None = None) -> EvalResult:
    logp = logp or [-5.0] * len(tv)
    rows = [{"fidelity/tv": a, "gen/perplexity": b, "fidelity/logprob": c, "gen/distinct_2": 0.8,
             "gen/self_bleu": 0.2} for a, b, c in zip(tv, ppl, logp)]
    return EvalResult({"label": label}, rows)


def test_cmp_uses_ci_overlap_and_direction(bg):
    good = _res("a", [0.50, 0.51, 0.49], [10, 11, 9])
    bad = _res("b", [0.90, 0.91, 0.89], [100, 110, 90])
    noisy = _res("c", [0.30, 0.95, 0.60], [10, 500, 50])
    assert bg._cmp(good, bad, "fidelity/tv", True)[0] == "better"
    assert bg._cmp(bad, good, "fidelity/tv", True)[0] == "worse"
    assert bg._cmp(good, bad, "fidelity/logprob", False)[0] == "indistinguishable"  # same values
    assert bg._cmp(noisy, bad, "fidelity/tv", True)[0] == "indistinguishable"  # wide CI
    assert bg._cmp(good, _res("x", [], []), "fidelity/tv", True)[0] == "not measured"
    # perplexity is compared on the log scale: per-seed PPLs of one arm span 8e3..1.3e5 (linear CIs
    # overlap), but the mean log-probs (-6.3 vs -10.4) are far apart
    lo = EvalResult({}, [{"gen/logprob": v, "gen/perplexity": math.exp(-v)} for v in (-6.2, -6.3, -6.4)])
    hi = EvalResult({}, [{"gen/logprob": v, "gen/perplexity": math.exp(-v)} for v in (-9.0, -10.4, -11.8)])
    assert abs(lo.mean["gen/perplexity"] - hi.mean["gen/perplexity"]) < hi.ci["gen/perplexity"]
    assert bg._cmp(lo, hi, "gen/perplexity", True)[0] == "better"
    assert bg._value(lo, "gen/perplexity") == pytest.approx(math.exp(6.3))


def test_answer_reports_each_comparison(bg):
    b = SimpleNamespace(s={"steps": [10, 20], "curve_steps": [10, 20]})
    learned = _res("spin eta=0", [0.93, 0.92, 0.94], [3e4, 3.1e4, 2.9e4], [-14, -14.2, -13.8])
    field = _res("spin eta=8", [0.85, 0.85, 0.86], [540, 520, 560], [-7.5, -7.4, -7.6])
    prior = _res("prior eta=0", [0.88, 0.89, 0.88], [900, 950, 850], [-11, -11.2, -10.8])
    prior_field = _res("prior eta=8", [0.83, 0.83, 0.84], [400, 420, 380], [-7, -7.1, -6.9])
    ar = _res("ar", [0.37, 0.38, 0.36], [14, 15, 13], [-3, -3.1, -2.9])
    table = {"ar": {0: ar}, "spin eta=0": {20: learned}, "spin best": {20: field},
             "spin prior eta=0": {20: prior}, "spin prior best": {20: prior_field}}
    curves = {"spin best (lam=1)": {10: field, 20: field}, "spin best (lam=inf)": {10: learned, 20: field}}
    sweep = {"best_all": {"sampler.eta": 8.0, "sampler.lam": 4.0}}
    text = "\n".join(bg.answer(b, sweep, table, curves))
    assert "field drift on vs off" in text
    assert "next-token TV better (0.853 vs 0.93)" in text
    assert "analytic prior inside the score" in text
    assert "learned residual + field prior, no drift vs learned score only" in text
    assert "Against the LM's own sampling" in text and "euclid" not in text.split("Against the LM")[0]
    assert "Precession (lam=1) is better at 1, worse at 0, indistinguishable at 1 of 2" in text
    assert "Steps to come within 0.01 TV" in text
    assert "lowest TV overall is at eta = 8" in text
    assert math.isfinite(field.ci["fidelity/tv"])
