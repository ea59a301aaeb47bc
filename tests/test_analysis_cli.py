"""CLI smoke tests through ``analysis.cli.main([...])``: every output file, the report's
``heads_ranked`` read back by the field provider, clear errors for bad input, reproduce."""
from __future__ import annotations

import csv
import json
import re

import pytest

from analysis import ContextFieldProvider
from analysis.cli import main

SMALL = ["n_permutations=60", "n_bootstrap=40", "n_splits=20", "progress=false", "batch_size=8"]
pytestmark = pytest.mark.filterwarnings("ignore:.*(several tokens|share their first token).*:UserWarning")


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("all")
    with pytest.warns(UserWarning):
        res = main(["all", "model.name=tiny-gpt2", "model.dtype=float64", "prompts=paper", "heldout=heldout",
                    "ablate=L1H0,L0H0", "scan_prompts=5", "t_steps=7", f"out={out}", *SMALL])
    return res, out


def test_all_writes_every_output(all_run):
    res, out = all_run
    for f in ("gaps.csv", "heads.csv", "ablation.csv", "scan.csv", "temperature.csv", "report.json", "report.md",
              "config.yaml", "run.json", "fig1_scatter.png", "fig_heatmap_r.png", "fig2_landscape.png",
              "fig3_temperature.png", "fig4_ablation.png", "fig_causal.png"):
        assert (out / f).exists(), f
    gaps = _csv(out / "gaps.csv")
    assert list(gaps[0]) == ["prompt_id", "layer", "head", "dl_theory", "dl_actual"]
    assert len(gaps) == 20 * 2 * 4 and {r["prompt_id"] for r in gaps} == {str(i) for i in range(20)}
    gt = res["gaps"]
    assert float(gaps[9]["dl_theory"]) == pytest.approx(gt.dl_theory[1, 0, 1], rel=1e-9)
    heads = _csv(out / "heads.csv")
    assert len(heads) == 8
    assert {"layer", "head", "r", "p", "q_bh", "r_ci_low", "r_ci_high", "p_fwer", "r_heldout"} <= set(heads[0])
    assert len(_csv(out / "temperature.csv")) == 7
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["used"] == "tiny-gpt2" and "versions" in run and run["seed"] == 0


def test_report_contents_and_topk(all_run, tiny_gpt2):
    res, out = all_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["model_used"] == "tiny-gpt2" and rep["protocol"] == "in_situ" and rep["n_prompts"] == 17
    ranked = rep["heads_ranked"]
    assert len(ranked) == 8 and set(ranked[0]) == {"layer", "head", "r"}
    assert [abs(r["r"]) for r in ranked] == sorted((abs(r["r"]) for r in ranked), reverse=True)
    assert 0 < rep["family_wise"]["p_family"] <= 1 and "replication" in rep and "scan" in rep
    assert rep["seeds"]["permutation"] == 0 and "torch" in rep["versions"]
    prov = ContextFieldProvider(tiny_gpt2[0], "topk:3", report=str(out / "report.json"))
    assert prov.heads == [(r["layer"], r["head"]) for r in ranked[:3]]
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "family-wise" in md.lower() and "held-out" in md
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / png).exists()
    assert len(re.findall(r"!\[", md)) >= 6


@pytest.mark.parametrize("protocol", ["paper", "paper_fixed"])
def test_stats_llama_full_candidates(tmp_path, protocol):
    res = main(["stats", "model.name=tiny-llama", f"protocol={protocol}", "prompts=paper", "heldout=",
                "also_paper=false", "candidates=full", f"out={tmp_path}", *SMALL])
    assert res["model"] == "tiny-llama" and res["stats"].r.shape == (8,)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["candidates"] == "full" and "log P" in rep["candidate_rule"]


def test_head_family_restricts_statistics(tmp_path):
    res = main(["stats", "model.name=tiny-gpt2", "prompts=paper", "heads=L1", "heldout=none", "also_paper=false",
                f"out={tmp_path}", *SMALL])
    heads = _csv(tmp_path / "heads.csv")
    assert len(heads) == 4 and {h["layer"] for h in heads} == {"1"}
    assert res["report"]["family_wise"]["n_heads"] == 4 and "replication" not in res["report"]


def test_subcommands_run_alone(tmp_path):
    common = ["model.name=tiny-llama", "prompts=paper", f"out={tmp_path}", *SMALL]
    assert main(["temperature", *common])["temperature"].entropy_bits.shape == (30,)
    ls = main(["landscape", "head=L1H3", "landscape_prompt=2", *common])["landscape"]
    assert (ls.layer, ls.head, ls.prompt_id) == (1, 3, 2)
    rows = main(["ablate", "ablate=L0H1", "ablation_prompt=The opposite of hot is", "ablation_good=cold",
                 "ablation_bad=warm", *common])["ablation"]
    assert {r["mode"] for r in rows} == {"zero", "mean"}
    scan = main(["scan", "scan_prompts=3", "scan_heads=L1", "ablation=mean", *common])["scan"]
    assert scan.effect.shape == (3, 4) and scan.mode == "mean"


@pytest.mark.parametrize("args,match", [
    (["ablate", "ablate=L99H3"], r"outside the model: tiny-gpt2 has 2 layers x 4 heads"),
    (["landscape", "head=L0H9"], r"tiny-gpt2 has 2 layers x 4 heads"),
    (["gaps", "protocol=paperish"], r"protocol=paperish: use one of paper, paper_fixed, in_situ"),
    (["gaps", "candidates=word"], r"candidates=word"),
    (["gaps", "prompts=nowhere.jsonl"], r"neither a bundled set"),
    (["landscape", "landscape_prompt=99", "head=L0H0"], r"outside the prompt set"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main([args[0], "model.name=tiny-gpt2", "prompts=paper", f"out={tmp_path}", *SMALL, *args[1:]])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_bad_prompt_files(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "The opposite of up is", "good": "down", "bad": "left"}\n'
                 '{"prompt": "", "good": "a", "bad": "b"}\n')
    with pytest.raises(SystemExit):
        main(["gaps", "model.name=tiny-gpt2", f"prompts={f}", f"out={tmp_path}", *SMALL])
    assert "line 2: empty prompt" in capsys.readouterr().err
    f.write_text(json.dumps({"prompt": "word " * 300, "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(SystemExit):
        main(["gaps", "model.name=tiny-gpt2", f"prompts={f}", f"out={tmp_path}", *SMALL])
    assert "context window of 128" in capsys.readouterr().err


def test_unknown_command_and_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["gapz"])
    assert e.value.code == 2 and "unknown command 'gapz'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gaps", "protocl=paper"])
    assert "protocol" in capsys.readouterr().err


def test_help_prints_usage_and_tree(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "reproduce" in out and "n_permutations" in out


def test_reproduce_tiny_gpt2(tmp_path):
    res = main(["reproduce", "model.name=tiny-gpt2", f"out={tmp_path}", *SMALL])
    md = (tmp_path / "report.md").read_text()
    assert "model used = **tiny-gpt2**" in md
    assert "L3H5" in md and "outside the model" in md  # the paper's heads do not exist here
    assert set(res["stats"]) == {"paper", "paper_fixed", "in_situ"}
    # the GPT-2 W_O slice makes paper and paper_fixed differ
    assert abs(res["stats"]["paper"].r - res["stats"]["paper_fixed"].r).max() > 1e-3


@pytest.mark.smollm2
@pytest.mark.slow
def test_reproduce_gpt2_falls_back_to_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="falling back"):
        res = main(["reproduce", "model.name=gpt2", f"out={tmp_path}", *SMALL, "batch_size=20", "n_permutations=20",
                    "n_bootstrap=20"])
    assert res["model"] == "smollm2-135m"
    md = (tmp_path / "report.md").read_text()
    assert "model used = **smollm2-135m**" in md and "requested 'gpt2'" in md
    rows = {r["head"]: r for r in res["rows"]}
    assert set(rows) == {"L3H5", "L0H2", "L0H7"}
    # SmolLM2 is Llama-family: the reference W_O slice is the right block, so paper == paper_fixed
    assert rows["L3H5"]["r_paper"] == pytest.approx(rows["L3H5"]["r_paper_fixed"], abs=1e-9)
    abl = {r["ablated"]: r for r in res["ablation"]}
    assert abl["L3H5"]["dl_base"] == pytest.approx(0.70, abs=0.02)  # MEASURED.md: +0.70
