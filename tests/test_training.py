"""Training: a short run writes self-describing checkpoints and logs, an interrupted run resumed
from last.ckpt ends with the weights of an uninterrupted one, a non-finite loss stops naming the
step, trainer keys are validated, both objectives train, DDP runs on 2 CPU processes (slow)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from spindiff.config import CONFIG_DIR, ConfigError, TrainConfig, compose, to_object
from spindiff.training.cache import FeatureStore
from spindiff.training.data import PairDataset
from spindiff.training.module import PosteriorObjective, ScoreModule, load_score_module
from spindiff.training.train import train, trainer_kwargs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def quick(tmp_path: Path, cache_dir: Path, *extra: str):
    return compose("train", ["experiment=quick", f"out={tmp_path}", f"data.cache_dir={cache_dir}",
                             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                             "wandb.mode=disabled", *extra])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "experiment").glob("*.yaml")) + [CONFIG_DIR / "train.yaml"],
                         ids=lambda p: p.stem)
def test_shipped_train_configs_instantiate(path):
    cfg = compose("train", [] if path.stem == "train" else [f"experiment={path.stem}"])
    assert isinstance(to_object(cfg), TrainConfig)
    trainer_kwargs(cfg.trainer)  # every shipped trainer key is a lightning.Trainer argument


def test_short_run_writes_checkpoints_logs_and_rebuilds(tmp_path, cache_dir):
    res = train(quick(tmp_path / "run", cache_dir, "trainer.max_steps=12"))
    out = Path(res["paths"]["out"])
    assert res["global_step"] == 12 and res["paths"]["best"] and res["paths"]["last"]
    assert (out / "checkpoints" / "best.ckpt").exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "config.yaml").exists() and (out / "run.json").exists() and (out / "results.json").exists()
    m = res["metrics"]
    assert m["train_loss_start"] is not None and m["val_end"]["val/loss"] > 0
    for key in ("val/tv", "val/top1"):
        assert 0 <= m["val_end"][key] <= 1, key
    assert m["val_end"]["val/loss"] < m["val_end"]["val/kl_prior"]  # 12 steps already beat the prior alone
    rows = _read_csv(Path(res["paths"]["metrics_csv"]))
    cols = set(rows[0])
    assert {"train/loss", "val/loss", "val/tv", "val/nll"} <= cols and {"lr-AdamW/scales", "lr-AdamW/lm_head_path"} <= cols

    # the checkpoint alone rebuilds the module: same loss on the same batch and noise
    store = FeatureStore.open(res["paths"]["features"])
    table = torch.from_numpy(store.arrays["token_table"].copy())
    module = load_score_module(res["paths"]["last"], expect_model="tiny-gpt2", expect_dim=64, token_table=table)
    meta = module.hparams.meta
    assert meta["model_name"] == "tiny-gpt2" and meta["dim"] == 64 and meta["vocab_size"] > 0
    assert module.hparams.config["objective"] == "posterior"
    batch = PairDataset(store, range(32)).__getitems__(list(range(32)))
    ckpt = torch.load(res["paths"]["last"], weights_only=True)
    fresh = load_score_module(res["paths"]["last"], token_table=table)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(module(batch, g1), fresh(batch, g2))
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in module.state_dict().items())


class Crash(Callback):
    """Simulates an interruption right after step ``at`` was checkpointed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated interruption")


def test_resume_reaches_the_uninterrupted_result(tmp_path, cache_dir):
    """2N steps in one go == N steps, interruption, resume=true for the rest (mid-epoch, across
    an epoch boundary, with a validation in between): identical final weights."""
    n = 7  # the quick data has 12 train batches per epoch: step 7 is mid-epoch, 14 is in epoch 2
    extra = ("trainer.max_steps=14", f"ckpt_every_n_steps={n}", "trainer.val_check_interval=10")
    full = train(quick(tmp_path / "full", cache_dir, *extra))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train(quick(tmp_path / "split", cache_dir, *extra), callbacks=[Crash(n)])
    mid = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert mid["global_step"] == n
    resumed = train(quick(tmp_path / "split", cache_dir, *extra, "resume=true"))
    assert resumed["resumed_from"] and resumed["global_step"] == full["global_step"] == 14
    a = torch.load(full["paths"]["last"], weights_only=True)["state_dict"]
    b = torch.load(resumed["paths"]["last"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert any(not torch.equal(a[k], mid["state_dict"][k]) for k in a)  # training did continue


def test_non_finite_loss_stops_naming_the_step(tmp_path, cache_dir, monkeypatch):
    calls = {"n": 0}
    original = PosteriorObjective.loss

    def poisoned(self, *args, **kw):
        loss = original(self, *args, **kw)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(PosteriorObjective, "loss", poisoned)
    cfg = quick(tmp_path / "nan", cache_dir, "trainer.max_steps=10", "validate_at_start=false",
                "trainer.val_check_interval=10")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 2 "):
        train(cfg)


def test_trainer_keys_are_validated():
    kw = {"max_steps": 3, "accelerator": "cpu"}
    assert trainer_kwargs(OmegaConf.create(kw)) == kw
    with pytest.raises(ConfigError) as e:
        trainer_kwargs(OmegaConf.create({"max_step": 3}))
    assert "trainer.max_step" in str(e.value) and "trainer.max_steps" in str(e.value) and "strategy" in str(e.value)
    with pytest.raises(ConfigError, match="trainer.logger cannot be set"):
        trainer_kwargs(OmegaConf.create({"logger": False}))
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        trainer_kwargs(OmegaConf.create({"gradient_clip_val": 1.0}))


def test_euclid_ddpm_objective_trains_and_reloads(tmp_path, cache_dir):
    res = train(quick(tmp_path / "eu", cache_dir, "experiment=euclid_ddpm", "trainer.max_steps=6"))
    assert res["objective"] == "euclid_ddpm" and res["metrics"]["val_end"]["val/loss"] > 0
    module = load_score_module(res["paths"]["last"])
    spin_run = compose("train", ["experiment=quick"])
    # the experiment's noise MLP width (the posterior's default read-out has no MLP: hidden=0)
    assert module.hparams.meta["score_net"]["hidden"] == compose("train", ["experiment=euclid_ddpm"]).score_net.hidden > 0
    assert module.hparams.meta["context_features"] == spin_run.score_net.features  # same features
    assert module.score_net.tangent is False and type(module.sde).__name__ == "VPSDE"


def test_cli_main_and_help(tmp_path, cache_dir, capsys):
    sys.path.insert(0, str(REPO))
    try:
        import train as cli
    finally:
        sys.path.remove(str(REPO))
    res = cli.main(["experiment=quick", "trainer.max_steps=3", f"out={tmp_path / 'cli'}",
                    f"data.cache_dir={cache_dir}", "trainer.enable_progress_bar=false", "wandb.mode=disabled"])
    assert res["global_step"] == 3 and Path(res["paths"]["last"]).exists()
    assert '"checkpoint"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "trainer:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["experiment=quick", "trainer.max_step=3", f"out={tmp_path / 'bad'}"])
    assert e.value.code == 2 and "trainer.max_step" in capsys.readouterr().err


def _run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("SPINDIFF_TRAIN_OUT", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    r = _run_cli(["experiment=quick", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                  "trainer.max_steps=6", f"out={out}", f"data.cache_dir={cache_dir}",
                  "trainer.enable_progress_bar=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


@pytest.mark.slow
@pytest.mark.smollm2
def test_cli_short_run_on_bundled_model(tmp_path):
    r = _run_cli(["trainer.max_steps=20", f"out={tmp_path / 'smol'}", "data.n_sequences=8", "data.seq_len=16",
                  "trainer.enable_progress_bar=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    module = load_score_module(str(tmp_path / "smol" / "checkpoints" / "last.ckpt"), expect_model="smollm2-135m",
                               expect_dim=576)
    assert module.hparams.meta["vocab_size"] == 49152
    assert isinstance(module, ScoreModule)


def test_resume_with_different_settings_is_refused(tmp_path, cache_dir):
    train(quick(tmp_path / "r", cache_dir, "trainer.max_steps=2", "validate_at_start=false"))
    with pytest.raises(ConfigError, match=r"different settings \(score_net.hidden\).*resume=false"):
        train(quick(tmp_path / "r", cache_dir, "trainer.max_steps=4", "score_net.hidden=32"))
    res = train(quick(tmp_path / "r", cache_dir, "trainer.max_steps=4", "validate_at_start=false"))  # trainer.* may change
    assert res["resumed_from"] and res["global_step"] == 4


def test_runtime_threads_applies_and_the_data_build_runs_on_one_thread(tmp_path, monkeypatch):
    """runtime.threads sets torch's intra-op threads for the run (recorded in run.json), while the
    training data (LM sampling + feature pass) is always built on one thread: reductions differ
    with the thread count, and a flipped draw changes a whole sampled sequence (README:
    Reproducibility)."""
    import json

    import spindiff.training.cache as cache_mod

    seen = []
    real = cache_mod.load_or_build_features

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "load_or_build_features", spy)
    old = torch.get_num_threads()
    try:
        res = train(quick(tmp_path / "run", tmp_path / "cache", "trainer.max_steps=2", "runtime.threads=2"))
        assert seen == [1]
        assert json.loads((Path(res["paths"]["out"]) / "run.json").read_text())["host"]["threads"] == 2
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ConfigError, match=r"runtime.threads=-1: must be >= 0 .*e.g. runtime.threads=1"):
        quick(tmp_path / "bad", tmp_path / "cache", "runtime.threads=-1")


def test_thread_count_rule(monkeypatch):
    """runtime.threads > $OMP_NUM_THREADS > the entry's default (train.py: 1) > torch's default."""
    from spindiff.runtime import thread_count
    from spindiff.training.train import FIT_THREADS

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert FIT_THREADS == 1 and thread_count(0, FIT_THREADS) == 1 and thread_count(3, FIT_THREADS) == 3
    assert thread_count(0, 0) == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count(0, FIT_THREADS) == 2 and thread_count(1, FIT_THREADS) == 1
