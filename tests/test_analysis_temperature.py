"""Temperature sweep: exact entropy/top-1 from rescaled logits, limits, -inf logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from analysis.temperature import temperature_sweep


def test_matches_scipy_entropy_and_limits():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000, dtype=torch.float64) * 4
    logits[:, 0] = logits.max(-1).values + 3  # a clear top-1, so T -> 0 is deterministic
    temps = np.array([0.01, 0.5, 1.0, 2.5, 1000.0])
    sw = temperature_sweep(logits, temps)
    for j, T in enumerate(temps):
        P = torch.softmax(logits / T, -1).numpy()
        ent = [sps.entropy(p, base=2) for p in P]
        np.testing.assert_allclose(sw.entropy_per_prompt[j], ent, atol=1e-9)
        np.testing.assert_allclose(sw.p_top1_per_prompt[j], P.max(-1), atol=1e-12)
    assert sw.entropy_bits[0] < 1e-3 and sw.p_top1[0] > 0.999  # T -> 0: deterministic
    assert sw.entropy_bits[-1] == pytest.approx(np.log2(1000), abs=1e-3)  # T -> inf: uniform
    assert np.all(np.diff(sw.entropy_bits) > 0) and np.all(np.diff(sw.p_top1) < 0)


def test_minus_inf_logits_and_float32_input():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0]], dtype=torch.float32)
    sw = temperature_sweep(logits, [0.1, 1.0, 2.5])
    assert np.isfinite(sw.entropy_bits).all()
    P = torch.softmax(logits.double(), -1)[0, [0, 1, 3]].numpy()
    assert sw.entropy_bits[1] == pytest.approx(sps.entropy(P, base=2), abs=1e-9)
    with pytest.raises(ValueError, match="must be > 0"):
        temperature_sweep(logits, [0.0])
