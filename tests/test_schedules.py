"""Noise schedules: integrals, inverses, the dimension scaling and the docstring table."""
from __future__ import annotations

import math
import re

import pytest
import torch

from spindiff.sphere import schedules
from spindiff.config import SDEConfig
from spindiff.sphere.schedules import make_schedule, schedule_from_config

F64 = torch.float64


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("dim", [3, 576])
def test_integral_is_integral_of_beta_and_inverse(name, dim):
    sch = make_schedule(name, dim)
    t = torch.linspace(0, 1, 20001, dtype=F64)
    quad = torch.cumulative_trapezoid(sch.beta(t), t)
    assert torch.allclose(sch.integral(t[1:]), quad, rtol=1e-5, atol=1e-12)  # trapezoid error
    assert float(sch.integral(0.0)) == 0.0
    tt = torch.linspace(1e-4, 1, 50, dtype=F64)
    assert torch.allclose(sch.integral_inverse(sch.integral(tt)), tt, rtol=1e-9, atol=1e-12)
    assert (sch.beta(t) > 0).all()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dimension_scaling_makes_decay_independent_of_d(name):
    t = torch.linspace(0, 1, 11, dtype=F64)
    ref = make_schedule(name, 3).mean_cosine(t)
    for d in (16, 576, 768):
        sch = make_schedule(name, d)
        assert math.isclose(sch.scale, 2 / (d - 1))
        assert torch.allclose(sch.mean_cosine(t), ref, rtol=1e-12)
        assert torch.allclose(sch.mean_cosine(t), torch.exp(-(d - 1) * sch.integral(t) / 2), rtol=1e-12)
    # gradual: E[S_t.S_0] falls from ~1 to ~0 across [0, 1], no single step dominates
    assert ref[1] > 0.8 and ref[-1] < 1e-3
    assert (ref[:-1] - ref[1:]).max() < 0.4


def test_unscaled_schedule_destroys_signal_at_once():
    sch = make_schedule("linear", 576, dim_scaled=False)
    assert float(sch.mean_cosine(0.1)) < 1e-12


def _parse_table() -> list[list[str]]:
    rows = []
    for line in schedules.__doc__.splitlines():
        m = re.match(r"^\s+(\d\.\d\d)\s+(.*)$", line)
        if m:
            rows.append([m.group(1)] + m.group(2).split())
    return rows


def test_docstring_table_matches_code():
    rows = _parse_table()
    assert [r[0] for r in rows] == ["0.10", "0.25", "0.50", "0.75", "1.00"]
    cols = [(576, True), (768, True), (576, False), (768, False)]
    for r in rows:
        t = float(r[0])
        for (d, scaled), cell in zip(cols, r[1:]):
            val = float(make_schedule("linear", d, dim_scaled=scaled).mean_cosine(torch.tensor(t, dtype=F64)))
            expected = float(cell)
            if expected == 0.0:
                assert val < 1e-300
            else:
                assert math.isclose(val, expected, rel_tol=1e-3), (t, d, scaled, val, expected)


def test_registry_and_config():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("nope", 3)
    cfg = SDEConfig()
    sch = schedule_from_config(cfg, 576)
    assert isinstance(sch, schedules.LinearSchedule)
    assert sch.beta_min == cfg.beta_min and sch.beta_max == cfg.beta_max and sch.dim_scaled == cfg.dim_scaled
    cfg.schedule = "cosine"
    assert isinstance(schedule_from_config(cfg, 576), schedules.CosineSchedule)
