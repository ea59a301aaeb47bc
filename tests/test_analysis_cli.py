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


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _run_command(tmp_path_factory, command, args, writes):
    """``main([command, *args, out=<a fresh directory>, *SMALL])`` -> (its result, that directory),
    after checking that every file of ``writes`` is in it."""
    out = tmp_path_factory.mktemp(command)
    res = main([command, *args, f"out={out}", *SMALL])
    missing = [f for f in writes if not (out / f).exists()]
    assert not missing, f"not written in {out}: {missing}"
    return res, out


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    # the default ablate=L3H5,L0H0 (GPT-2's Fig. 4 heads) does not fit tiny-gpt2's 2 layers: a note, the top heads
    return _run_command(tmp_path_factory, "all", ("model.name=tiny-gpt2", "model.dtype=float64", "prompts=paper",
                                                  "heldout=heldout", "scan_prompts=5", "t_steps=7"),
                        ("gaps.csv", "heads.csv", "ablation.csv", "scan.csv", "temperature.csv", "report.json",
                         "report.md", "config.yaml", "run.json", "fig1_scatter.png", "fig_heatmap_r.png",
                         "fig2_landscape.png", "fig3_temperature.png", "fig4_ablation.png", "fig_causal.png"))


def test_all_writes_every_output(all_run):
    res, out = all_run  # the fixture checked the file list
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


TEXT_COLUMNS = {"role", "mode", "ablated", "prompt", "good", "bad", "label", "predictor", "head_a", "head_b"}


def _numeric_cells_parse(path):
    rows = _csv(path)
    assert rows, path
    for col in rows[0]:
        if col in TEXT_COLUMNS:
            continue
        for r in rows:
            float(r[col])  # raises on np.float64(...) or an empty cell
    return rows


def test_every_csv_reads_back_with_float(all_run):
    res, out = all_run
    for f in sorted(out.glob("*.csv")):
        _numeric_cells_parse(f)
    heads = _csv(out / "heads.csv")
    st = res["stats"]
    for h in heads:  # full precision survives the round trip
        k = st.index_of(int(h["layer"]), int(h["head"]))
        assert float(h["p"]) == pytest.approx(st.p[k], rel=1e-9, abs=1e-300)
        assert float(h["r"]) == pytest.approx(st.r[k], rel=1e-8)
    assert "np." not in (out / "heads.csv").read_text()


def test_csv_writer_numpy_scalars_round_trip(tmp_path):
    """The heads.csv bug: numpy 2 writes np.float64(1.957e-28) for repr of a small np.float64."""
    import numpy as np

    from analysis.report import write_csv

    vals = [np.float64(1.957e-28), np.float32(3e-6), np.float64(0.25), np.int64(7), float("nan"), 1e-300]
    write_csv(tmp_path / "x.csv", [f"c{i}" for i in range(len(vals))], [vals])
    row = _numeric_cells_parse(tmp_path / "x.csv")[0]
    assert float(row["c0"]) == 1.957e-28 and float(row["c1"]) == pytest.approx(3e-6, rel=1e-6)
    assert row["c3"] == "7" and row["c4"] == "nan" and float(row["c5"]) == 1e-300


def test_default_ablate_that_does_not_fit_uses_top_heads(all_run):
    res, out = all_run
    rep = json.loads((out / "report.json").read_text())
    st = res["stats"]
    top = [f"L{int(st.layer[k])}H{int(st.head[k])}" for k in st.order[:2]]
    assert any("does not fit" in n and ",".join(top) in n for n in rep["notes"])
    ablated = {r["ablated"] for r in _csv(out / "ablation.csv")}
    assert ablated == {top[0], top[1], "+".join(top)}
    assert "does not fit" in (out / "report.md").read_text()


def test_explicit_ablate_outside_the_model_stays_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablate", "model.name=tiny-gpt2", "ablate=L3H5", f"out={tmp_path}", *SMALL])
    assert e.value.code == 2 and "outside the model" in capsys.readouterr().err


def test_internal_value_error_keeps_its_traceback(tmp_path, monkeypatch):
    from analysis.pipeline import Analysis

    def boom(self):
        raise ValueError("an internal bug")
    monkeypatch.setattr(Analysis, "step_gaps", boom)
    monkeypatch.setitem(__import__("analysis.cli", fromlist=["STAGES"]).STAGES, "gaps", boom)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["gaps", "model.name=tiny-gpt2", "prompts=paper", f"out={tmp_path}", *SMALL])


def test_bad_choice_is_caught_when_composing(capsys):
    from spindiff.config import ConfigError, compose

    with pytest.raises(ConfigError, match="ablation=half: use one of zero, mean"):
        compose("analysis", ["ablation=half"])
    with pytest.raises(ConfigError, match="pair_top_k=1"):
        compose("analysis", ["pair_top_k=1"])


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


def test_reproduce_takes_ablation_case_from_config(tmp_path):
    res = main(["reproduce", "model.name=tiny-gpt2", "ablate=L1H2,L0H1", "ablation_prompt=The opposite of hot is",
                "ablation_good=cold", "ablation_bad=warm", f"out={tmp_path}", *SMALL])
    assert {r["ablated"] for r in res["ablation"]} == {"L1H2", "L0H1", "L1H2+L0H1"}
    md = (tmp_path / "report.md").read_text()
    assert "'The opposite of hot is' cold vs warm" in md and "L1H2 ablated" in md
    assert {r["ablated"] for r in _csv(tmp_path / "ablation.csv")} == {"L1H2", "L0H1", "L1H2+L0H1"}


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
def test_reproduce_gpt2_falls_back_to_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = main(["reproduce", "model.name=gpt2", f"out={tmp_path}", *SMALL, "batch_size=20", "n_permutations=20",
                "n_bootstrap=20"])
    assert "falling back" in capsys.readouterr().err  # one warning line (spindiff.lm.models)
    assert res["model"] == "smollm2-135m"
    md = (tmp_path / "report.md").read_text()
    assert "model used = **smollm2-135m**" in md and "requested 'gpt2'" in md
    rows = {r["head"]: r for r in res["rows"]}
    assert set(rows) == {"L3H5", "L0H2", "L0H7"}
    # SmolLM2 is Llama-family: the reference W_O slice is the right block, so paper == paper_fixed
    assert rows["L3H5"]["r_paper"] == pytest.approx(rows["L3H5"]["r_paper_fixed"], abs=1e-9)
    abl = {r["ablated"]: r for r in res["ablation"]}
    assert abl["L3H5"]["dl_base"] == pytest.approx(0.70, abs=0.02)  # MEASURED.md: +0.70


@pytest.fixture(scope="module")
def beyond_run(tmp_path_factory):
    return _run_command(tmp_path_factory, "beyond", ("model.name=tiny-llama", "model.dtype=float64", "prompts=paper",
                                                     "scan_prompts=6", "pair_top_k=3", "hybrid_layers=1"),
                        ("predictors.csv", "paths.csv", "pairs.csv", "gaps.csv", "report.json", "report.md",
                         "run.json", "fig_predictors.png", "fig_paths.png", "fig_pairs.png"))


def test_beyond_writes_tables_figures_and_the_answer(beyond_run):
    import matplotlib.image as mpimg

    res, out = beyond_run  # the fixture checked the file list
    for png in out.glob("*.png"):
        assert mpimg.imread(png).shape[0] > 100
    rep = json.loads((out / "report.json").read_text())
    by = rep["beyond"]
    preds = _numeric_cells_parse(out / "predictors.csv")
    assert {(r["mode"], r["predictor"]) for r in preds} == {
        (m, k) for m in ("zero", "mean") for k in ("direct", "direct_norm", "+heads", "+q", "+k", "+v", "+heads+mlps",
                                                    "atp_star", "hybrid", "ig", "ig_layer", "relp", "lookahead")}
    for r in preds:
        rec = by["modes"][r["mode"]]["predictors"][r["predictor"]]
        assert float(r["r"]) == pytest.approx(rec["r"], rel=1e-8) and -1 <= float(r["r"]) <= 1
        assert float(r["r_ci_low"]) <= float(r["r_ci_high"]) and float(r["seconds"]) > 0
    assert by["answer"].startswith("**") and "0.9" in by["answer"] and by["best"] != "hybrid"
    zero = by["modes"]["zero"]["predictors"]
    assert zero["hybrid"]["seconds"] > zero["+heads+mlps"]["seconds"] and "layers 0-0" in zero["hybrid"]["label"]
    assert by["direct_equals_minus_dl_theory_max_abs_diff"] < 1e-10
    md = (out / "report.md").read_text()
    assert "Does adding three-body terms substantially improve the correlation?" in md
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / png).exists()


def test_beyond_paths_csv_is_consistent(beyond_run):
    import numpy as np

    res, out = beyond_run
    rows = _numeric_cells_parse(out / "paths.csv")
    A = res["analysis"]
    assert len(rows) == 2 * len(A.scan_ids()) * 8
    f = lambda r, k: float(r[k])  # noqa: E731
    for r in rows:  # the path terms sum to the first-order effect; Q + K + V = the head paths
        assert f(r, "direct") + f(r, "via_heads") + f(r, "via_mlps") == pytest.approx(f(r, "total"), abs=1e-9)
        assert f(r, "via_q") + f(r, "via_k") + f(r, "via_v") == pytest.approx(f(r, "via_heads"), abs=1e-6)
    # the exact column is the exact scan's effect
    scan = A.exact_scan("zero")
    heads = A.scan_heads()
    zero = [r for r in rows if r["mode"] == "zero"]
    got = np.array([f(r, "exact") for r in zero]).reshape(len(A.scan_ids()), len(heads))
    np.testing.assert_allclose(got, scan.effect, rtol=1e-9, atol=1e-12)


def test_beyond_pairs_csv(beyond_run):
    res, out = beyond_run
    pairs = _numeric_cells_parse(out / "pairs.csv")
    assert len(pairs) == 3 and {p["role"] for p in pairs} <= {"cooperative", "antagonistic", "additive"}
    for p in pairs:
        assert float(p["interaction"]) == pytest.approx(
            float(p["effect_ab"]) - float(p["effect_a"]) - float(p["effect_b"]), abs=1e-8)
    top = json.loads((out / "report.json").read_text())["pairs"]["heads"]
    scan = res["analysis"].exact_scan("zero")
    import numpy as np

    order = np.argsort(-np.abs(scan.effect).mean(0))[:3]
    assert top == [f"L{scan.heads[k][0]}H{scan.heads[k][1]}" for k in order]


def test_single_beyond_stages(tmp_path):
    common = ["model.name=tiny-gpt2", "prompts=paper", "scan_prompts=4", *SMALL]
    res = main(["attribution", f"out={tmp_path / 'a'}", "qk_fix=false", *common])
    rows = _numeric_cells_parse(tmp_path / "a" / "attribution.csv")
    assert len(rows) == len(res["analysis"].scan_ids()) * 8 and all(r["atp_star_zero"] == "nan" for r in rows)
    main(["paths", f"out={tmp_path / 'p'}", "qkv_split=false", *common])
    rows = _numeric_cells_parse(tmp_path / "p" / "paths.csv")
    assert "via_q" not in rows[0] and (tmp_path / "p" / "report.md").exists()
    main(["pairs", f"out={tmp_path / 'q'}", "pair_top_k=2", *common])
    assert len(_csv(tmp_path / "q" / "pairs.csv")) == 1 and (tmp_path / "q" / "fig_pairs.png").exists()
