"""``objective=block`` training and ``sampler.name=block`` through the entry points on tiny-gpt2: the
checkpoint describes its draft heads, sampling writes the per-token block diagnostics, and bad input
(K < 1, K above the heads, a checkpoint without draft heads, a steering mode it does not apply)
exits with status 2 and one ``error:`` line, writing nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # subprocesses (train.py, sample.py): ~30 s each on a loaded 2-core machine
QUICK = ["experiment=quick", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("block")
    out = root / "train"
    r = run(["train.py", *QUICK, "objective=block", "score_net.block=3", "trainer.max_steps=4",
             "trainer.val_check_interval=2", f"out={out}", f"data.cache_dir={root / 'cache'}"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    val = summary["val"]
    assert {"val/accept@1", "val/accept@3", "val/kl@2", "val/accept_lb@1"} <= set(val)
    last = lambda key: [x for x in (val[key] if isinstance(val[key], list) else [val[key]]) if x is not None][-1]  # noqa: E731
    for k in (1, 2, 3):  # the acceptance bounds are ordered: top-k alone <= top-k + rest bin
        assert 0.0 <= last(f"val/accept_lb@{k}") <= last(f"val/accept@{k}") <= 1.0
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_rebuilds_the_draft_heads(block_ckpt):
    from spindiff.score.build import load_score
    from spindiff.score.draft import DraftHeads

    sc = load_score(str(block_ckpt))
    assert sc.objective == "block" and isinstance(sc.score_net, DraftHeads)
    assert sc.score_net.block == 3 and sc.meta["score_net"]["features"] == "field+hidden"
    # the drafter's vocabulary ranking came from the training targets: a permutation, not the identity
    rank = sc.score_net.vocab_rank
    assert sc.score_net.ranked and sorted(rank.tolist()) == list(range(sc.score_net.vocab))
    assert not torch.equal(rank, torch.arange(sc.score_net.vocab))


def test_sample_writes_block_diagnostics(block_ckpt, tmp_path):
    out = tmp_path / "s"
    r = run(["sample.py", "sampler.name=block", "sampler.block=3", f"ckpt={block_ckpt}", f"out={out}",
             "max_new_tokens=12", "prompt=The capital of"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert rec["sampler"] == "block" and rec["n_tokens"] == 12
    d = rec["diagnostics"]
    assert d[0]["block_offset"] == 0 and all(x["lm_p"] > 0 for x in d)
    assert all(1 <= x["block_offset"] <= 4 for x in d[1:])
    for x in d:
        if x["accepted"] is not None:
            assert x["draft_r"] is not None and 0 < x["draft_r"] <= 1
        assert abs(x["lm_p"] - np.exp(x["lm_logprob"])) < 2e-6  # T = 1: p(x) is the LM's (both written to 6 decimals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lm_forwards"] >= 1 and len(summary["acceptance_by_offset"]) == 3


def test_sample_continuous_batching_keeps_prompt_order(block_ckpt, tmp_path):
    """More prompts than sampler.batch_size: sample.py runs the block sampler's continuous batching
    (one queue, prompts prefilled 2 at a time) and writes one record per prompt, in the file's order."""
    prompts = ["The capital of", "Once upon a time there was a", "In 1905", "Water boils at"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "q"
    r = run(["sample.py", "sampler.name=block", "sampler.block=2", f"ckpt={block_ckpt}", f"out={out}",
             "max_new_tokens=9", "stop_at_eos=false", "sampler.batch_size=2", f"prompts={tmp_path / 'p.txt'}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in recs] == prompts and all(x["n_tokens"] == 9 for x in recs)
    assert all(x["diagnostics"][0]["block_offset"] == 0 for x in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prefills"] == 2 and summary["rows_per_forward"] <= 2


@pytest.mark.parametrize("args,pattern", [
    (["sampler.block=0"], r"sampler\.block=0.*>= 1"),
    (["sampler.block=5"], r"draft heads for 3 offsets"),
    (["sampler.block=2", "steer.words=cat", "steer.strength=1", "steer.mode=dynamics"], r"steer\.mode=dynamics"),
    (["sampler.block=2", "sampler.drafter=nope"], r"sampler\.drafter='nope'"),
    (["sampler.block=2", "sampler.draft_vocab=-1"], r"sampler\.draft_vocab=-1.*>= 0"),
])
def test_bad_input_is_one_error_line(block_ckpt, tmp_path, args, pattern):
    import re

    out = tmp_path / "bad"
    r = run(["sample.py", "sampler.name=block", *args, f"ckpt={block_ckpt}", f"out={out}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and re.search(pattern, errs[0]), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


def test_checkpoint_without_draft_heads_is_refused(tmp_path):
    """A posterior (spin) checkpoint has no draft heads: one error line naming experiment=block."""
    from spindiff.generation.base import build_sampler
    from spindiff.generation.block import BlockSampler
    from spindiff.generation.session import SampleError

    with pytest.raises(SampleError, match="draft heads"):
        BlockSampler.check_module(type("C", (), {"block": 2})(), type("M", (), {"score_net": torch.nn.Linear(2, 2)})())
    assert build_sampler  # the objective mismatch itself is build_sampler's (tested for every sampler)


def test_bench_block_quick_on_tiny(block_ckpt, tmp_path, bench):
    """bench/bench_block.py end to end on tiny-gpt2 (every arm, ceiling, exactness, memory, figure)."""
    res = bench("bench_block").main(["--ckpt", str(block_ckpt), "--quick", "--model", "tiny-gpt2", "--ks", "2,4",
                                     "--drafters", "heads,potts_qk,heads:0", "--out", str(tmp_path / "b")])
    assert {"ar T=1,B=8", "block[heads](K=2) T=1,B=8", "block[potts_qk](K=2) T=1,B=8", "block[heads:0](K=2) T=1,B=8",
            "ar T=0,B=1", "prompt_lookup(K=2) T=1,B=1"} <= set(res["arms"])
    assert not any("K=4" in k for k in res["arms"] if k.startswith("block"))  # heads for 3 offsets: K = 4 skipped
    assert res["ceiling"]["batch8"]["ceiling_speedup_K2"] > 0
    assert res["arms"]["ar T=1,B=8"]["speedup_vs_ar"] == 1.0
    assert "block[heads](K=2) T=1,B=8" in res["exactness"] and res["memory"]["draft_heads_mb"] > 0
    assert (tmp_path / "b" / "speedup.png").exists() and (tmp_path / "b" / "report.md").exists()
