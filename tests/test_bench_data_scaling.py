"""bench/bench_data_scaling.py on tiny-gpt2: the exact held-out metrics, the limit arm (the network's
own code path set to the LM head gives the LM's logits: KL 0) and the untrained-prior arm."""
from __future__ import annotations

import json
import math

import pytest


def test_exact_metrics_against_a_hand_computed_pair(bench):
    import torch

    bd = bench("bench_data_scaling")
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]).log()
    m = bd.exact_metrics(q, p, torch.tensor([0, 1]))
    kl0 = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert m["kl"] == pytest.approx(kl0 / 2, abs=1e-6)  # mean over the two sequences
    assert m["tv"] == pytest.approx(0.25 / 2, abs=1e-6)
    assert m["top1"] == pytest.approx(0.5)


@pytest.mark.slow
def test_data_scaling_bench_on_tiny_model(tmp_path, bench):
    from spindiff.config import compose
    from spindiff.training.train import train

    cfg = compose("train", ["experiment=quick", f"out={tmp_path / 'train'}", f"data.cache_dir={tmp_path / 'cache'}",
                            "trainer.max_steps=20", "trainer.enable_progress_bar=false", "wandb.mode=disabled"])
    ckpt = train(cfg)["paths"]["last"]
    bd = bench("bench_data_scaling")
    bd.main(["--model", "tiny-gpt2", "--ckpt", f"tiny={ckpt}", "--new-tokens", "4", "--n-prompts", "3",
             "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["arm"].split(" ")[0].rstrip(":"): r for r in data["rows"]}
    assert rows["limit"]["kl"] == pytest.approx(0.0, abs=1e-4) and rows["limit"]["top1"] == 1.0
    assert rows["tiny"]["n_sequences"] == cfg.data.n_sequences and rows["tiny"]["steps"] == 20
    assert 0 <= rows["tiny"]["tv"] <= 1 and rows["tiny"]["kl"] < rows["prior:field"]["kl"]
    assert "| tiny |" in (tmp_path / "out" / "report.md").read_text()
