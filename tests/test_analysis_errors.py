"""``python -m analysis errors`` (analysis/errors.py): the decomposition dL = attention heads + MLPs +
rest is exact and its rest is the embedding / bias term; right-vs-wrong statistics; the CLI
writes errors.csv / errors.json / the figure and rejects bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from analysis.cli import main
from analysis.errors import decompose, summarize
from analysis.pipeline import Analysis
from spindiff.config import compose
from spindiff.lm.hooks import record
from spindiff.lm.models import LoadedModel, build_tiny_model

SMALL = ["n_bootstrap=40", "progress=false", "batch_size=8", "model.dtype=float64"]


@pytest.fixture(scope="module")
def tiny_analysis(tmp_path_factory):
    model, tok = build_tiny_model("tiny-llama", seed=2, dtype=torch.float64)
    lm = LoadedModel(model, tok, "tiny-llama", "tiny-llama", "llama", "built in-process")
    cfg = compose("analysis", ["model.name=tiny-llama", "prompts=paper", f"out={tmp_path_factory.mktemp('err')}",
                               *SMALL])
    return Analysis(cfg, lm)


def test_decomposition_is_exact_and_rest_is_embedding_and_biases(tiny_analysis):
    A = tiny_analysis
    d = decompose(A, "paper")
    assert np.allclose(d["attn"] + d["mlp"] + d["rest"], d["dl"])
    ts = A.tset("paper")
    ad = A.ad
    W_U, W_E = ad.unembedding(), ad.embedding()
    bias = sum(ad.out_proj(l).bias for l in range(ad.n_layers))  # tiny-llama has attention biases
    with record(ad, ["ln_final.in"], last_only=True) as acts:
        for j, pid in enumerate(d["ids"]):
            ids = torch.tensor([ts.ids[pid]])
            with torch.no_grad():
                A.model(input_ids=ids)
            scale, _ = ad.final_norm_scale(acts["ln_final.in"][0])
            de = W_U[ts.good_first[pid]] - W_U[ts.bad_first[pid]]
            want = float((((W_E[ids[0, -1]] + bias) * scale) @ de).detach())
            # 1e-6: LlamaRMSNorm computes its statistic in float32 even in a float64 model
            assert d["rest"][j] == pytest.approx(want, abs=1e-6)
    assert np.abs(d["mlp"]).sum() > 0 and np.abs(d["attn"]).sum() > 0


def test_summary_groups_and_shares():
    rng = np.random.default_rng(0)
    attn, mlp = rng.normal(size=60), rng.normal(size=60) - 0.5
    rest = np.zeros(60)
    d = {"set": "s", "dl": attn + mlp + rest, "attn": attn, "mlp": mlp, "rest": rest}
    s = summarize(d, 100, 0)
    assert s["n_wrong"] == int((d["dl"] < 0).sum())
    assert sum(v[0] for v in s["variance_share"].values()) == pytest.approx(1.0)
    w = d["dl"] < 0
    assert s["wrong"]["mlp"][0] == pytest.approx(mlp[w].mean())
    assert s["wrong_points_at_bad"]["attn"]["fraction"] == pytest.approx((attn[w] < 0).mean())


def test_errors_cli_writes_outputs(tmp_path):
    out = tmp_path / "e"
    main(["errors", "model.name=tiny-gpt2", "prompts=paper", "heldout=heldout", f"out={out}", *SMALL])
    for f in ("errors.csv", "errors.json", "fig_errors.png", "config.yaml", "run.json"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader(open(out / "errors.csv")))
    assert {r["set"] for r in rows} == {"paper", "heldout"}
    for r in rows:
        assert float(r["attn"]) + float(r["mlp"]) + float(r["rest"]) == pytest.approx(float(r["dl_actual"]), abs=1e-6)
        assert (r["wrong"] == "True") == (float(r["dl_actual"]) < 0)
    rep = json.loads((out / "errors.json").read_text())
    assert rep["answers"] and len(rep["sets"]) == 2


def test_errors_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["errors", "model.name=tiny-gpt2", "prompts=nosuchset", f"out={tmp_path / 'x'}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "x").exists()
