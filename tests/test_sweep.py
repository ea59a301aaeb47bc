"""The eta x lambda sweep: the shipped W&B sweep file is valid for both `wandb sweep` and the
offline runner, and one offline run writes summary.csv, heatmaps and best.json."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from spindiff.config import ConfigError, compose
from spindiff.evaluation.sweep import DEFAULT_SWEEP, _override, grid_points, load_sweep, main, run_sweep

REPO = Path(__file__).resolve().parent.parent


def test_shipped_sweep_file_is_a_wandb_grid_sweep():
    raw = yaml.safe_load(DEFAULT_SWEEP.read_text())
    assert raw["method"] == "grid" and raw["metric"]["goal"] in ("minimize", "maximize")
    assert {"sampler.eta", "sampler.lam", "sampler.steps"} <= set(raw["parameters"])
    assert "${args_no_hyphens}" in raw["command"] and "spindiff.evaluate" in raw["command"]
    assert (REPO / raw["program"]).exists()
    assert math.isinf(max(raw["parameters"]["sampler.lam"]["values"]))  # lam = inf: no precession
    spec = load_sweep(DEFAULT_SWEEP)
    pts = grid_points(spec)
    assert len(pts) == math.prod(len(v) for v in spec.grid.values())
    for p in pts:  # every point is a valid command line for spindiff.evaluation.evaluate (as the W&B agent passes it)
        args = [f"{k}={v}" for k, v in {**spec.fixed, **p}.items() if not isinstance(v, list)]
        args += [_override(k, v) for k, v in spec.fixed.items() if isinstance(v, list)]
        cfg = compose("evaluate", args)
        assert cfg.sampler.eta == p["sampler.eta"] and cfg.sampler.lam == p["sampler.lam"]


def test_override_roundtrip():
    for key, val in [("sampler.lam", math.inf), ("eval.seeds", [0, 1]), ("sampler.kappa", None),
                     ("sampler.eta", 0.5), ("eval.generation", False)]:
        cfg = compose("evaluate", [_override(key, val)])
        from omegaconf import OmegaConf

        got = OmegaConf.select(cfg, key)
        assert (list(got) if val == [0, 1] else got) == val


def test_bad_sweep_files(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("method: random\nparameters:\n  sampler.eta:\n    values: [1]\n")
    with pytest.raises(ConfigError, match="grids only"):
        load_sweep(bad)
    bad.write_text("method: grid\nparameters:\n  sampler.etaa:\n    values: [1]\n")
    with pytest.raises(ConfigError, match="sampler.eta"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_offline_sweep_writes_summary_heatmaps_best(tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny", "method": "grid", "metric": {"name": "fidelity/tv", "goal": "minimize"},
        "parameters": {"sampler.eta": {"values": [0.0, 1.0, 4.0]}, "sampler.lam": {"values": [1.0, float("inf")]},
                       "sampler.steps": {"value": 3}, "ckpt": {"value": "none"},
                       "eval.n_prompts": {"value": 3}, "eval.seeds": {"value": [0]}, "eval.n_draws": {"value": 8},
                       "eval.generation": {"value": False}},
        "command": ["${env}", "${interpreter}", "-m", "spindiff.evaluate", "${args_no_hyphens}"]}))
    out = tmp_path / "out"
    rc = main([str(sweep), "model.name=tiny-gpt2", "wandb.mode=disabled", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 6
    assert all(r["status"] in ("ok", "skipped") for r in rows) and any(r["status"] == "ok" for r in rows)
    assert all(r.get("reason") for r in rows if r["status"] == "skipped")  # a skipped point says why
    assert {r["sampler.lam"] for r in rows} == {"1.0", "inf"}
    best = json.loads((out / "best.json").read_text())
    ok = [float(r["fidelity/tv"]) for r in rows if r["status"] == "ok"]
    assert best["best"]["fidelity/tv"] == pytest.approx(min(ok))
    assert (out / "heatmap_fidelity_tv.png").stat().st_size > 1000
    assert (out / "sweep.yaml").exists() and (out / "run.json").exists()


def test_sweep_logs_each_point_to_wandb_offline(tmp_path, monkeypatch):
    """Every grid point becomes one offline W&B run of the same group (never the network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = load_sweep(DEFAULT_SWEEP)
    spec.grid = {"sampler.eta": [1.0, 2.0], "sampler.lam": [1.0]}
    spec.fixed = {**spec.fixed, "ckpt": "none", "eval.n_prompts": 2, "eval.seeds": [0], "eval.n_draws": 4,
                  "sampler.steps": 2}
    res = run_sweep(spec, ["model.name=tiny-gpt2"], tmp_path, progress=False)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and res["group"].startswith("sweep-eta_lambda-")
