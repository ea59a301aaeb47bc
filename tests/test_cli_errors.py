"""A new user's first hour (issue 10), through the real entry points in subprocesses: every bad
input exits with status 2 and ONE ``error:`` line naming the fix -- no traceback, nothing written
(no stub run directory, no cache folder) and nothing lost; streamed sample text carries no warning
text; outputs are group/other readable under umask 022; ckpt=auto finds the quick start's
checkpoint and says so; a resumed run shows one metric history; library chatter stays silent."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
QUICK = ["experiment=quick", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
NOISE = re.compile(r"Traceback|Warning|warnings\.warn|deprecated|LeafSpec|anonymous setting|litlogger|Tip:|"
                   r"past_key_values|tb<=t1")


def run(args: list[str], cwd: Path, wandb: str = "disabled", timeout: int = 600, **env_extra: str
        ) -> subprocess.CompletedProcess:
    """``python <REPO>/<args[0]> args[1:]`` (or ``python -m`` for a dotted module) under umask 022,
    with a fresh empty $HOME that must still be empty afterwards (tests never write under $HOME;
    the caches point at the session folder, tests/conftest.py)."""
    home = Path(tempfile.mkdtemp(prefix="home-"))
    env = {**os.environ, "WANDB_MODE": wandb, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_SILENT": "false", "HOME": str(home), **env_extra}
    head = ["-m", args[0]] if "." in args[0] and not args[0].endswith(".py") else [str(REPO / args[0])]
    try:
        r = subprocess.run([sys.executable, *head, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=lambda: os.umask(0o022))
        written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        assert not written, f"{args[0]} wrote under $HOME: {written[:10]}"
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return r


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clean_error(r: subprocess.CompletedProcess, *patterns: str) -> str:
    """Exit 2, exactly one line on stderr and it is ``error: ...`` matching ``patterns``; no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny training run through train.py (W&B offline, progress lines, umask 022)."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "runs" / "train" / "tiny"
    r = run(["train.py", *QUICK, "trainer.max_steps=6", "ckpt_every_n_steps=3", "trainer.val_check_interval=3",
             "trainer.log_every_n_steps=1", "print_every_n_steps=2", f"out={out}",
             f"data.cache_dir={root / 'cache'}"], cwd=root, wandb="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "out": out, "ckpt": out / "checkpoints" / "last.ckpt", "proc": r,
            "summary": json.loads(r.stdout)}  # stdout is the JSON summary and nothing else


# ----------------------------------------------------------------------------- bad input: exit 2, nothing written
@pytest.mark.parametrize("kind", ["junk", "truncated", "missing", "directory"])
def test_unreadable_checkpoint_is_one_clean_error(tmp_path, trained, kind):
    path = tmp_path / "x.ckpt"
    if kind == "junk":
        path.write_text("junk\n")  # reached the unpickler as `KeyError: 174812789` (a 38-line traceback)
    elif kind == "truncated":
        path.write_bytes(trained["ckpt"].read_bytes()[:3000])
    elif kind == "directory":
        path = trained["out"] / "checkpoints"
    before = files(tmp_path)
    r = run(["sample.py", f"ckpt={path}", "model.name=tiny-gpt2", f"out={tmp_path / 'out'}"], cwd=tmp_path)
    line = assert_clean_error(r, rf"ckpt={re.escape(str(path))}")
    fix = {"junk": r"corrupt or truncated.*python train.py", "truncated": r"corrupt or truncated.*best.ckpt / last.ckpt",
           "missing": r"no checkpoint at .*python train.py", "directory": r"is a directory.*last.ckpt"}[kind]
    assert re.search(fix, line), line
    assert files(tmp_path) == before  # no run directory, nothing else


@pytest.mark.parametrize("args, patterns", [
    (["trainer.max_steps=-5"], [r"trainer.max_steps=-5: must be an integer >= 0 \(or -1 = no limit; e.g. trainer.max_steps=400\)"]),
    (["trainer.max_stepz=5"], [r"unknown trainer key 'trainer.max_stepz'", r"Did you mean trainer.max_steps"]),
    (["data.batch_size=0"], [r"data.batch_size=0: must be >= 1"]),
    (["optim.scheduler=cosin"], [r"optim.scheduler='cosin': choose one of cosine, constant"]),
    (["objective=euclid_ddpm", "score_net.hidden=0"], [r"score_net.hidden=0: the Euclidean DDPM's noise-prediction MLP",
                                                        r"experiment=euclid_ddpm"]),
])
def test_train_rejects_bad_settings_before_loading_anything(tmp_path, args, patterns):
    r = run(["train.py", *QUICK, f"data.cache_dir={tmp_path / 'cache'}", *args], cwd=tmp_path)
    assert_clean_error(r, *patterns)
    assert not list(tmp_path.iterdir())  # no runs/train/<time> stub, no feature cache


def test_bad_head_spec_leaves_no_run_directory_and_no_cache(tmp_path):
    r = run(["train.py", *QUICK, "field.heads=L9H0", f"out={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
            cwd=tmp_path)
    assert_clean_error(r, r"field.heads=L9H0: head spec 'L9H0' is outside the model", r"valid: L0H0")
    assert not list(tmp_path.iterdir())


def test_a_failed_rerun_changes_nothing_in_an_existing_run(trained):
    before = files(trained["out"])
    r = run(["train.py", *QUICK, f"out={trained['out']}", "trainer.max_steps=-5"], cwd=trained["root"])
    assert_clean_error(r, "trainer.max_steps=-5")
    assert files(trained["out"]) == before


@pytest.mark.parametrize("args, patterns", [
    (["sample.py", "sampler.steps=0"], [r"sampler.steps=0.*at least 1.*sampler.steps=20"]),
    (["sample.py", "sampler.stpes=3"], [r"Did you mean sampler.steps", r"Keys of sampler: "]),
    (["sample.py", "eval.n_draws=8"], [r"eval.\* configures the evaluation.*python -m spindiff.evaluate"]),
    (["spindiff.evaluate", "eval.n_draws=-1"], [r"eval.n_draws=-1: must be >= 0"]),
])
def test_sample_and_evaluate_reject_bad_settings(tmp_path, args, patterns):
    r = run([*args, "model.name=tiny-gpt2"], cwd=tmp_path)
    line = assert_clean_error(r, *patterns)
    assert "wandb" not in line and "steer." not in line  # the nearest section's keys, not all of them
    assert not list(tmp_path.iterdir())


def test_bad_sweep_file_writes_nothing(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("method: grid\nparameters:\n  sampler.etaa:\n    values: [1]\n")
    r = run(["spindiff.sweep", str(sweep), "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert_clean_error(r, r"sampler.etaa", r"Did you mean sampler.eta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


# ----------------------------------------------------------------------------- quiet, readable, paths that find each other
def test_training_output_is_quiet_shows_progress_and_accuracy(trained):
    r = trained["proc"]
    assert not NOISE.search(r.stderr), r.stderr  # W&B anonymous, LeafSpec, litlogger tip, UserWarnings: silent
    assert re.search(r"^step 2/6: train/loss \d", r.stderr, flags=re.M) and re.search(r"^step 6/6", r.stderr, flags=re.M)
    # one switch (trainer.enable_progress_bar=false): no bar, no hardware inventory, no summary table
    assert not re.search(r"sampling sequences|context features|GPU available|TPU available|Total FLOPs|it/s\]",
                         r.stderr), r.stderr
    s = trained["summary"]
    assert s["steps"] == 6 and None not in s["val_loss"] and s["metrics_csv"].endswith("metrics.csv")
    assert "val/loss" in s["val"] and len(s["val"]) >= 2  # README: the validation accuracies at the end, not only losses
    assert all(None not in v for v in s["val"].values())
    assert list((trained["out"] / "wandb").glob("offline-run-*"))  # W&B still logs, offline


def test_outputs_are_readable_by_group_and_others_under_umask_022(trained, tmp_path):
    r = run(["sample.py", f"ckpt={trained['ckpt']}", f"out={tmp_path / 's'}", "max_new_tokens=3", "sampler.steps=2"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for root in (trained["out"], tmp_path / "s"):
        mine = [p for p in root.rglob("*") if "wandb" not in p.parts]
        assert len(mine) >= 4
        for p in mine:
            mode = stat.S_IMODE(p.stat().st_mode)
            need = 0o055 if p.is_dir() else 0o044
            assert mode & need == need, f"{p} has mode {oct(mode)}"


def test_streamed_sample_text_is_clean_and_uses_the_checkpoints_model(trained, tmp_path):
    """model.name is not given: the checkpoint trained on tiny-gpt2 brings its model (a note on
    stderr says so); stdout is the header, the text and the summary line, nothing else."""
    r = run(["sample.py", f"ckpt={trained['ckpt']}", f"out={tmp_path / 's'}", "max_new_tokens=6", "sampler.steps=3"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not NOISE.search(r.stdout) and "note:" not in r.stdout and "warning:" not in r.stdout, r.stdout
    rec = json.loads((tmp_path / "s" / "samples.jsonl").read_text())
    assert r.stdout == rec["prompt"] + rec["text"] + "\n"  # the text, exactly: header and timing on stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err[0].startswith("note: ") and "using tiny-gpt2" in err[0], r.stderr
    assert re.fullmatch(r"# spin.* on tiny-gpt2", err[1]) and err[-1].startswith("# 6 tokens in"), r.stderr
    assert all(ln.startswith(("note: ", "# ")) for ln in err), r.stderr
    r = run(["sample.py", "sampler.name=ar", "model.name=tiny-gpt2", f"out={tmp_path / 'ar'}", "max_new_tokens=6"],
            cwd=tmp_path)
    assert r.returncode == 0 and not NOISE.search(r.stdout + r.stderr), r.stdout + r.stderr


@pytest.mark.parametrize("layout", ["runs/train/quickstart", "runs/quickstart/train"])
def test_ckpt_auto_finds_the_quick_start_checkpoint_and_says_which(trained, tmp_path, layout):
    """The quick start trains into runs/train/<name>; the old layout runs/<name>/train is found too."""
    dst = tmp_path / layout / "checkpoints" / "last.ckpt"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(trained["ckpt"].read_bytes())
    r = run(["sample.py", "model.name=tiny-gpt2", "max_new_tokens=2", "sampler.steps=2", "stream=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: ckpt=auto picked {layout}/checkpoints/last.ckpt" in r.stderr
    rec = json.loads(next((tmp_path / "runs" / "sample").glob("*/samples.jsonl")).read_text().splitlines()[0])
    assert rec["ckpt"] == f"{layout}/checkpoints/last.ckpt" and not rec["field_only"]


def test_a_resumed_run_has_one_metric_history(trained):
    first = trained["summary"]
    hist0 = list(csv.DictReader((trained["out"] / "metrics.csv").open()))
    quick_bar = [a for a in QUICK if "enable_progress_bar" not in a]  # this time with the progress bar
    r = run(["train.py", *quick_bar, "trainer.max_steps=9", "ckpt_every_n_steps=3", "trainer.val_check_interval=3",
             "trainer.log_every_n_steps=1", f"out={trained['out']}", f"data.cache_dir={trained['root'] / 'cache'}"],
            cwd=trained["root"], wandb="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)  # the bar is on stderr; stdout is the JSON summary only
    assert s["steps"] == 9 and s["resumed_from"]
    assert "/-2" not in r.stderr and "Epoch 1/-" not in r.stderr, r.stderr[-2000:]  # rich's "Epoch 3/-2"
    assert "note: resuming from" in r.stderr and "Restored all states" not in r.stderr
    # one W&B run across the resume: both offline folders carry the same run id
    ids = {d.name.rsplit("-", 1)[-1] for d in (trained["out"] / "wandb").glob("offline-run-*")}
    assert len(list((trained["out"] / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids
    # the final weights are validated once: no second row with the same validation
    val_rows = [r_ for r_ in csv.DictReader((trained["out"] / "metrics.csv").open()) if r_.get("val/loss")]
    assert len({r_["val/loss"] for r_ in val_rows}) == len(val_rows), [(r_["step"], r_["val/loss"]) for r_ in val_rows]
    assert s["val_loss"][1] == pytest.approx(float(val_rows[-1]["val/loss"]), rel=1e-3)
    assert s["val_loss"][0] == first["val_loss"][0] and None not in s["val_loss"]  # was [null, 13.05]
    rows = list(csv.DictReader((trained["out"] / "metrics.csv").open()))
    assert {r_["segment"] for r_ in rows} == {"0", "1"} and len(rows) > len(hist0)
    train_steps = [int(r_["step"]) for r_ in rows if r_.get("train/loss")]
    assert train_steps == sorted(set(train_steps))  # no step logged twice across the segments
    assert rows[: len([x for x in hist0 if int(x["step"]) < 6])] == [x for x in hist0 if int(x["step"]) < 6]
    assert not (trained["out"] / "csv").exists()
    torch.load(trained["ckpt"], weights_only=True)


@pytest.mark.smollm2
@pytest.mark.slow
def test_hub_fallback_warns_once_in_one_style(tmp_path):
    r = run(["sample.py", "model.name=no-such-org/no-such-model", "ckpt=none", "max_new_tokens=2", "sampler.steps=2",
             f"out={tmp_path / 's'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    warns = [ln for ln in r.stderr.splitlines() if "falling back" in ln]
    assert len(warns) == 1 and warns[0].startswith("warning: "), r.stderr
    assert "UserWarning" not in r.stderr and "falling back" not in r.stdout
    assert "Loading weights" not in r.stderr  # transformers' bar for a sub-second local load


# ----------------------------------------------------------------------------- stdout is the text (issue 22)
def test_sample_stdout_is_exactly_the_text_through_a_pipe(trained, tmp_path):
    """Two prompts, streamed one by one and batched: what reaches a pipe is each prompt and its
    continuation, one blank line between prompts -- no header, no '>>> ', no timing line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nA cat says\n")
    for bs in (1, 2):
        out = tmp_path / f"s{bs}"
        cmd = (f"{sys.executable} {REPO / 'sample.py'} ckpt={trained['ckpt']} prompts={prompts} out={out} "
               f"max_new_tokens=4 sampler.steps=2 sampler.batch_size={bs} | cat > {tmp_path / f'piped{bs}.txt'}")
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        recs = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
        expect = "\n".join(rec["prompt"] + rec["text"] + "\n" for rec in recs)
        assert (tmp_path / f"piped{bs}.txt").read_bytes().decode() == expect  # no newline translation: a '\r' stays
        assert re.search(r"^# \d+ tokens in", r.stderr, flags=re.M)


def test_train_stdout_is_the_json_summary_rounded(trained):
    s = trained["summary"]  # json.loads(stdout) of the whole stdout succeeded in the fixture
    for pair in [s["train_loss"], s["val_loss"], *s["val"].values()]:
        for v in pair:
            assert v == float(f"{v:.4g}"), pair  # 4 significant digits; results.json keeps all of them


# ----------------------------------------------------------------------------- analysis: say no before loading
TINY_PAPER = ("model.name=tiny-gpt2", "prompts=paper")


@pytest.mark.parametrize("args,pattern", [
    # syntax and prompt files: on the default model.name=gpt2 (offline: it would fall back to
    # SmolLM2 with a warning) the error is the only line, so nothing was loaded
    (("heads=L9x",), r"heads=L9x: cannot parse head spec"),
    (("head=L1",), r"head=L1 must name exactly one head"),
    (("prompts=missing.jsonl",), r"'missing.jsonl' is neither a bundled set .* nor an existing file"),
    (("prompts=bad.jsonl",), r"bad.jsonl, line 2: not valid JSON"),
    # input that depends on the model: checked once it is loaded, before any run directory
    ((*TINY_PAPER, "heads=L99H3"), r"outside the model: tiny-gpt2 has 2 layers x 4 heads"),
    ((*TINY_PAPER, "scan_heads=L5"), r"outside the model"),
    ((*TINY_PAPER, "ablate=L0H9"), r"outside the model"),
    ((*TINY_PAPER, "landscape_prompt=99"), r"landscape_prompt=99 is outside the prompt set"),
])
def test_analysis_says_no_before_any_run_directory(tmp_path, args, pattern):
    """One ``error:`` line, exit 2, nothing written in the working folder (no run directory)."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Up is", "good": "up", "bad": "down"}\n{bad\n')
    before = files(tmp_path)
    r = run(["analysis", "gaps", *args], cwd=tmp_path)
    assert_clean_error(r, pattern)
    assert files(tmp_path) == before and not (tmp_path / "runs").exists()


def test_analysis_stdout_carries_results_only(tmp_path):
    r = run(["analysis", "gaps", *TINY_PAPER, "progress=false", f"out={tmp_path / 'a'}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [ln for ln in r.stdout.splitlines() if ln.startswith("gaps: ")] and r.stdout
    assert "model: tiny-gpt2" in r.stderr and "note:" not in r.stdout
