"""Decision landscape: N0 . (S_good - S_bad) with S_A = W_O[h] @ e_A reproduces the gap table
under every protocol; the plane's axes are orthonormal and contain N0."""
from __future__ import annotations


import numpy as np
import pytest

from analysis.figures import fig_landscape
from analysis.gaps import compute_gaps
from analysis.landscape import decision_landscape
from analysis.prompts import load_prompts, tokenize_set
from spindiff.lm.adapter import get_adapter


@pytest.mark.parametrize("protocol", ["paper", "paper_fixed", "in_situ"])
def test_landscape_reproduces_gap_table(tiny_model, protocol):
    model, tok = tiny_model
    ad = get_adapter(model)
    ts = tokenize_set(tok, load_prompts("paper"), 128, warn=False)
    gt = compute_gaps(model, ts, protocol, progress=False)
    for p, (l, h) in [(0, (1, 2)), (13, (0, 0)), (19, (1, 3))]:
        ls = decision_landscape(ad, model, ts, p, l, h, protocol)
        assert ls.dl_theory == pytest.approx(gt.dl_theory[p, l, h], abs=1e-10)
        U = np.stack([ls.u1, ls.u2])
        np.testing.assert_allclose(U @ U.T, np.eye(2), atol=1e-12)
        assert np.linalg.norm(ls.coords(ls.N0)) == pytest.approx(np.linalg.norm(ls.N0), rel=1e-10)  # N0 in plane
        for S in (ls.S_good, ls.S_bad):  # colour at the projected point = N0 . S
            a, b = ls.coords(S)
            assert ls.field(a, b) == pytest.approx(ls.N0 @ S, abs=1e-10)
        assert ls.coords(ls.S_good - ls.S_bad)[1] == pytest.approx(0, abs=1e-10)  # decision axis is u1


def test_landscape_figure(tmp_path, tiny_gpt2):
    model, tok = tiny_gpt2
    ts = tokenize_set(tok, load_prompts("paper"), 128, warn=False)
    ls = decision_landscape(get_adapter(model), model, ts, 0, 1, 2, "paper")
    path = fig_landscape(ls, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000 and path.endswith("f.png")
