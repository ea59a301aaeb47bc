"""Checkpoints a user hands in: a good one loads (weights_only=True) and rebuilds the module; a
missing, corrupt, truncated, foreign, unsafe, non-finite or mismatched one raises CheckpointError
with a message naming the problem and the fix."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spindiff.checkpoint import CheckpointError, checkpoint_summary, load_checkpoint
from spindiff.config import compose
from spindiff.training.module import load_score_module
from spindiff.training.train import train


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    cfg = compose("train", ["experiment=quick", f"out={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                            "trainer.max_steps=2", "trainer.enable_progress_bar=false", "wandb.mode=disabled",
                            "validate_at_start=false"])
    return Path(train(cfg)["paths"]["last"])


def test_good_checkpoint_loads_and_describes_itself(ckpt_path):
    ckpt = load_checkpoint(ckpt_path, expect_model="tiny-gpt2", expect_dim=64)
    s = checkpoint_summary(ckpt)
    assert s["model"] == "tiny-gpt2" and s["dim"] == 64 and s["objective"] == "posterior" and s["global_step"] == 2
    module = load_score_module(str(ckpt_path))
    assert not module.training and module.hparams.meta["context_dim"] == 128


class Foreign:  # a class a malicious or foreign pickle would need to construct
    def __reduce__(self):
        return (os.getcwd, ())


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", "no checkpoint at .*python train.py"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("truncated", "corrupt or truncated.*best.ckpt / last.ckpt"),
    ("garbage", "corrupt"),
    ("text", "corrupt or truncated, or not a torch checkpoint at all .*KeyError"),  # `echo junk > x.ckpt`
    ("unsafe", "Python objects .*getcwd.*refused unread.*weights_only=True"),
    ("state_dict_only", "not a Lightning checkpoint.*no 'state_dict'"),
    ("lightning_foreign", "not a spindiff score checkpoint"),
    ("future_version", "format version 99"),
    ("no_score_net", "no score network weights"),
    ("nan", "non-finite .*best.ckpt"),
])
def test_bad_checkpoints_raise_clear_errors(ckpt_path, tmp_path, case, match):
    good = torch.load(ckpt_path, weights_only=True)
    raw = ckpt_path.read_bytes()
    if case == "missing":
        path = tmp_path / "nope.ckpt"
    elif case == "directory":
        path = ckpt_path.parent
    elif case == "empty":
        path = tmp_path / "e.ckpt"
        path.write_bytes(b"")
    elif case == "truncated":
        path = tmp_path / "t.ckpt"
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "garbage":
        path = tmp_path / "g.ckpt"
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif case == "text":
        path = tmp_path / "j.ckpt"
        path.write_text("junk\n")
    elif case == "unsafe":
        path = _save(tmp_path / "u.ckpt", {**good, "payload": Foreign()})
    elif case == "state_dict_only":
        path = _save(tmp_path / "s.ckpt", good["state_dict"])
    elif case == "lightning_foreign":
        path = _save(tmp_path / "f.ckpt", {**good, "hyper_parameters": {"lr": 0.1}})
    elif case == "future_version":
        meta = {**good["hyper_parameters"]["meta"], "format_version": 99}
        path = _save(tmp_path / "v.ckpt", {**good, "hyper_parameters": {**good["hyper_parameters"], "meta": meta}})
    elif case == "no_score_net":
        path = _save(tmp_path / "n.ckpt", {**good, "state_dict": {"other.weight": torch.zeros(2)}})
    elif case == "nan":
        sd = dict(good["state_dict"])
        k = next(iter(sd))
        sd[k] = torch.full_like(sd[k], float("nan"))
        path = _save(tmp_path / "nan.ckpt", {**good, "state_dict": sd})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_model_and_dim_mismatch(ckpt_path):
    with pytest.raises(CheckpointError, match="trained on model 'tiny-gpt2' but model 'smollm2-135m'.*model.name=tiny-gpt2"):
        load_checkpoint(ckpt_path, expect_model="smollm2-135m")
    with pytest.raises(CheckpointError, match="d=64 but d=576"):
        load_checkpoint(ckpt_path, expect_dim=576)


def test_weights_that_do_not_fit_the_described_network(ckpt_path, tmp_path):
    good = torch.load(ckpt_path, weights_only=True)
    meta = {**good["hyper_parameters"]["meta"]}
    meta["score_net"] = {**meta["score_net"], "hidden": 32}
    path = _save(tmp_path / "w.ckpt", {**good, "hyper_parameters": {**good["hyper_parameters"], "meta": meta}})
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_score_module(str(path))


def test_resume_from_a_corrupt_last_checkpoint_is_a_clear_error(ckpt_path, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(ckpt_path.read_bytes()[:1000])
    cfg = compose("train", ["experiment=quick", f"out={out}", f"data.cache_dir={ckpt_path.parent.parent.parent / 'cache'}",
                            "trainer.max_steps=2", "wandb.mode=disabled", "resume=true"])
    with pytest.raises(CheckpointError, match="last.ckpt is corrupt or truncated"):
        train(cfg)
