"""Calibrated AtP (analysis/calibrated.py): the per-head fit recovers a known linear relation, the
shrinkage interpolates between the head's own fit and its layer's, cross-validation uses the
calibration prompts alone, and in the `beyond` stage no predicted prompt is ever a calibration
prompt (tiny models, float64)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.ablation import mean_z_over
from analysis.attribution import atp
from analysis.calibrated import (Features, _layer_fit, atp_features, calibrate, calibration_ids, cross_validate,
                                 design, fit)
from analysis.paths import gradient_trace
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter
from tests.test_analysis_cli import SMALL, _numeric_cells_parse
from tests.test_analysis_paths import _exact_float64

LAYER = np.array([0, 0, 0, 1, 1, 1])


def _synthetic(C: int, rng: np.random.Generator, a: np.ndarray, b: np.ndarray, c: np.ndarray, noise: float = 0.0):
    feat = Features(rng.normal(size=(C, len(a))), rng.normal(size=C))
    e = a + b * feat.atp + c * feat.gap[:, None] + noise * rng.normal(size=(C, len(a)))
    return feat, e


def test_fit_recovers_a_known_linear_relation():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    feat, e = _synthetic(12, rng, a, b, 0 * c)
    new, e_new = _synthetic(5, rng, a, b, 0 * c)
    cal = fit(feat, e, LAYER, "head", lam=0.0)
    np.testing.assert_allclose(cal.w, np.stack([a, b], 1), atol=1e-10)
    np.testing.assert_allclose(cal.predict(new), e_new, atol=1e-10)
    feat, e = _synthetic(12, rng, a, b, c)  # with the gap term
    cal = fit(feat, e, LAYER, "head_gap", lam=0.0)
    np.testing.assert_allclose(cal.w, np.stack([a, b, c], 1), atol=1e-10)
    assert np.abs(fit(feat, e, LAYER, "head", lam=0.0).w[:, 1] - b).max() > 1e-3  # the gap term matters


def test_shrinkage_between_the_head_and_its_layer():
    rng = np.random.default_rng(1)
    # every head of a layer on the same line: the layer fit is exact, any lam recovers it
    a, b = np.repeat([0.5, -1.0], 3), np.repeat([2.0, 0.3], 3)
    feat, e = _synthetic(10, rng, a, b, np.zeros(6))
    for lam in (0.0, 1.0, 100.0):
        np.testing.assert_allclose(fit(feat, e, LAYER, "head", lam).w, np.stack([a, b], 1), atol=1e-9)
    # heads differ: lam -> inf gives the layer line, lam = 0 the head's own, in between in between
    a, b = rng.normal(size=6), rng.normal(size=6)
    feat, e = _synthetic(10, rng, a, b, np.zeros(6), noise=0.1)
    layer_w = _layer_fit(design(feat, "head"), e, LAYER)
    np.testing.assert_allclose(fit(feat, e, LAYER, "head", 1e12).w, layer_w, atol=1e-8)
    own, mid = fit(feat, e, LAYER, "head", 0.0).w, fit(feat, e, LAYER, "head", 4.0).w
    m = (design(feat, "head") ** 2).mean(0)  # the penalty's metric: its distance shrinks with lam
    dist = lambda w: (m * (w - layer_w) ** 2).sum(1)  # noqa: E731
    assert np.all(dist(mid) < dist(own))
    assert np.abs(mid - own).max() > 1e-3 and np.abs(mid - layer_w).max() > 1e-3


def test_mean_and_atp_variants():
    rng = np.random.default_rng(2)
    feat, e = _synthetic(8, rng, rng.normal(size=6), rng.normal(size=6), np.zeros(6), noise=0.5)
    new = Features(rng.normal(size=(3, 6)), rng.normal(size=3))
    np.testing.assert_allclose(fit(feat, e, LAYER, "mean").predict(new), np.tile(e.mean(0), (3, 1)), atol=1e-12)
    np.testing.assert_array_equal(fit(feat, e, LAYER, "atp").predict(new), new.atp)
    early = fit(feat, e, LAYER, "head_gap_early", 1.0, early_layers=1).predict(new)
    np.testing.assert_array_equal(early[:, 3:], new.atp[:, 3:])  # layer 1 >= early_layers: plain AtP
    assert np.abs(early[:, :3] - new.atp[:, :3]).max() > 1e-3
    with pytest.raises(ValueError, match="variant"):
        fit(feat, e, LAYER, "nope")


def test_cross_validation_picks_the_per_head_fit_when_heads_differ():
    rng = np.random.default_rng(3)
    a, b = 3 * rng.normal(size=6), 2 * rng.normal(size=6)
    feat, e = _synthetic(24, rng, a, b, np.zeros(6), noise=0.2)
    cv = cross_validate(feat, e, LAYER, folds=6)
    assert set(cv) == {"mean", "atp", "layer", "head", "head_gap", "head_gap_early"}
    assert max(cv["head"].values()) > cv["layer"][0.0] + 0.05 and max(cv["head"].values()) > cv["mean"][0.0]
    cal = calibrate(feat, e, LAYER, "auto", folds=6, prompt_ids=range(24))
    assert cal.variant in ("head", "head_gap") and cal.cv == cv and cal.prompt_ids == list(range(24))
    # the fit uses only what it is given: changing a prompt outside the calibration set changes nothing
    sub = calibrate(feat.subset(range(12)), e[:12], LAYER, "head", folds=4)
    e2 = e.copy()
    e2[12:] += 100.0
    sub2 = calibrate(feat.subset(range(12)), e2[:12], LAYER, "head", folds=4)
    np.testing.assert_array_equal(sub.w, sub2.w)


def test_calibration_ids_are_disjoint_from_the_predicted_prompts():
    valid = np.ones(40, bool)
    valid[[3, 7]] = False
    exclude = [0, 10, 20, 30, 39]
    ids = calibration_ids(40, valid, 12, exclude)
    assert len(ids) == 12 and not set(ids) & set(exclude) and not set(ids) & {3, 7}
    assert ids == sorted(ids) and len(set(ids)) == 12
    assert calibration_ids(40, valid, 100, exclude) == [i for i in range(40) if valid[i] and i not in exclude]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_atp_features_are_atp_and_the_gap(tiny_model, mode):
    model, tok = tiny_model
    model = _exact_float64(model)
    ad = get_adapter(model)
    ts = tokenize_set(tok, load_prompts("paper"), 128, warn=False).subset(range(5))
    mz = mean_z_over(model, ad, ts, 0)
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    f = atp_features(model, ad, ts, heads, mode, mz if mode == "mean" else None, 0, batch_size=3)
    from spindiff.lm.tokens import pad_left

    ids, mask = pad_left(ts.ids, 0)
    tr = gradient_trace(model, ad, ids, mask, ts.good_first, ts.bad_first, branches=False)
    ref = atp(tr, mode, mz).reshape(len(ts), -1)
    np.testing.assert_allclose(f.atp, ref, atol=1e-10 * np.abs(ref).max())
    from analysis.gaps import last_logits

    lg = last_logits(model, ids, mask)
    gap = (lg.gather(-1, ts.good_first[:, None]) - lg.gather(-1, ts.bad_first[:, None]))[:, 0].double().numpy()
    np.testing.assert_allclose(f.gap, gap, atol=1e-10)
    assert f.seconds > 0


@pytest.mark.slow
def test_beyond_calibrated_rows_never_see_the_predicted_prompts(tmp_path):
    """`beyond` with a calibration set that is also the held-out set: the calibration prompts are
    disjoint from the scan prompts and from the held-out table's prompts; both tables carry the
    calibrated rows."""
    from analysis.cli import main

    res = main(["beyond", "model.name=tiny-llama", "model.dtype=float64", "prompts=paper", "scan_prompts=6",
                "heldout=heldout", "pair_top_k=2", "hybrid_layers=1", "beyond.relp=false", "beyond.ig_layers=0",
                "beyond.lookahead_k=0", "beyond.heldout=true", "beyond.calibration=heldout",
                "beyond.calibration_prompts=12", "beyond.calibration_folds=4", f"out={tmp_path}", *SMALL])
    rep = json.loads((tmp_path / "report.json").read_text())["beyond"]
    cal = rep["calibration"]
    ho_ids = rep["heldout"]["prompt_ids"]
    assert len(cal["zero"]["prompt_ids"]) == 12 and not set(cal["zero"]["prompt_ids"]) & set(ho_ids)
    assert cal["zero"]["variant"] in ("layer", "head", "head_gap", "head_gap_early") and cal["zero"]["seconds"] > 0
    for f in ("predictors.csv", "predictors_heldout.csv"):
        rows = _numeric_cells_parse(tmp_path / f)
        got = {(r["mode"], r["predictor"]) for r in rows}
        assert {(m, k) for m in ("zero", "mean") for k in ("calibrated", "calib_mean")} <= got
        for r in rows:
            if r["predictor"] == "calibrated":
                assert "one-time exact scan of 12 heldout prompts" in r["label"] and -1 <= float(r["r"]) <= 1
    A = res["analysis"]
    assert A.cache["calibration"]["zero"].prompt_ids == cal["zero"]["prompt_ids"]


def test_bad_calibration_keys(tmp_path, capsys):
    from analysis.cli import main

    for arg, word in (("beyond.calibration_variant=bogus", "calibration_variant"),
                      ("beyond.calibration=/no/such/file.jsonl", "/no/such/file.jsonl"),
                      ("beyond.calibration_prompts=2", "calibration_prompts")):
        with pytest.raises(SystemExit) as e:
            main(["beyond", "model.name=tiny-gpt2", arg, f"out={tmp_path / 'x'}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and word in err and err.count("\n") == 1
        assert not (tmp_path / "x").exists()
