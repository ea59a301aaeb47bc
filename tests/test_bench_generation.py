"""The generation benchmark end to end on tiny-gpt2 (--quick): every stage runs, the report has the
oracle table, the arms table with distances to ar and to the oracle, and the figure opens."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bg():
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "bench" / "bench_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_bench_on_tiny_model(bg, tmp_path):
    from PIL import Image

    res = bg.main(["--quick", "--model", "tiny-gpt2", "--no-wandb", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "## Oracle prior" in report and "| uniform | geodesic_midpoint |" in report
    assert "TV - oracle" in report and "| ar |" in report and "| oracle |" in report
    assert "ratio" not in report or "/ar@batch8" in report
    data = json.loads((tmp_path / "results.json").read_text())
    tv = data["arms"]["ar"]["mean"]["fidelity/tv"]
    assert 0 < tv < 1 and set(data["oracle_tv"]) == {"uniform", "speciation"}
    for k in ("spin(oracle)/ar@batch8", "ar:batch32/batch1"):
        assert data["throughput"]["ratios"][k] > 0
    with Image.open(tmp_path / "tv_vs_steps.png") as im:
        assert im.size[0] > 100
    assert res["arms"]["oracle"].mean["fidelity/tv"] < 1


@pytest.mark.slow
def test_only_throughput_at_several_steps(bg, tmp_path):
    res = bg.main(["--quick", "--model", "tiny-gpt2", "--no-wandb", "--out", str(tmp_path), "--only-throughput",
                   "--tp-steps", "2,4"])
    data = json.loads((tmp_path / "results.json").read_text())
    ratios = data["throughput"]["ratios"]
    assert ratios["spin(oracle)@2/ar@batch8"] > 0 and ratios["spin(oracle)@4/ar@batch8"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| spin(oracle)@4 |" in report and "| ar |" in report
    assert set(res["throughput"]["batch8"]) == {"ar", "spin(oracle)@2", "spin(oracle)@4"}


@pytest.mark.slow
def test_cold_bias_table(bg, tmp_path):
    """--cold-bias: logprob_excess and TV of every setting next to ar, and tokens/s side by side
    (with the BrownianInterval arm)."""
    res = bg.main(["--quick", "--cold-bias", "--brownian-interval", "--model", "tiny-gpt2", "--no-wandb",
                   "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "| ar |" in report and "(shipped)" in report and "tail dropped" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["cold_bias"]) == 1 + len(bg.COLD_ARMS)  # ar + every setting on the oracle
    for row in data["cold_bias"].values():
        assert abs(row["mean"]["fidelity/logprob_excess"]) < 50 and 0 <= row["mean"]["fidelity/tv"] <= 1
    ratios = data["throughput"]["ratios"]
    assert ratios["oracle shipped/ar@batch8"] > 0 and ratios["oracle shipped, BrownianInterval/ar@batch8"] > 0
    assert set(res["throughput"]["batch8"]) == {"ar", "oracle before", "oracle shipped", "oracle shipped, BrownianInterval"}
