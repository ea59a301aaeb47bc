"""W&B never blocks: auto -> offline without a key, WANDB_MODE wins, offline runs land on disk."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from spindiff.config import WandbConfig
from spindiff.tracking import init_run, resolve_mode


def test_auto_is_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"


def test_bad_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ValueError, match="auto, offline, online or disabled"):
        resolve_mode("sometimes")


def test_offline_run_writes_locally(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = init_run(OmegaConf.structured(WandbConfig()), tmp_path, {"a": 1}, name="t")
    run.log({"x": 1.0})
    run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
