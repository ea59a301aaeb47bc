"""Token-by-token generation (spindiff.generation.sample / spindiff.generation) on tiny-gpt2: the samplers of
the registry, the KV-cache loop against a full recompute, decoding, JSONL output, checkpoint
resolution, and every kind of bad input raising a SampleError that names the fix (CLI: exit 2)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from spindiff.config import compose
from spindiff.generation.sample import SampleError, sample
from spindiff.generation import (SAMPLERS, GenerationSession, build_sampler, decode_spins, find_checkpoint)

TINY = ["model.name=tiny-gpt2", "wandb.mode=disabled", "stream=false"]


@pytest.fixture(scope="module")
def session() -> GenerationSession:
    from spindiff.config import ModelConfig

    return GenerationSession.load(ModelConfig(name="tiny-gpt2"))


def _train_tiny(root: Path, objective: str = "posterior") -> Path:
    from spindiff.training.train import train

    cfg = compose("train", ["experiment=quick", f"objective={objective}", f"out={root / objective}",
                            f"data.cache_dir={root / 'cache'}", "trainer.max_steps=2",
                            "trainer.enable_progress_bar=false", "wandb.mode=disabled", "validate_at_start=false"])
    return Path(train(cfg)["paths"]["last"])


@pytest.fixture(scope="module")
def spin_ckpt(tmp_path_factory) -> Path:
    return _train_tiny(tmp_path_factory.mktemp("ckpt"), "posterior")


@pytest.fixture(scope="module")
def euclid_ckpt(tmp_path_factory) -> Path:
    return _train_tiny(tmp_path_factory.mktemp("ckpt_e"), "euclid_ddpm")


def _cfg(tmp_path: Path, *extra: str):
    return compose("sample", TINY + [f"out={tmp_path / 'run'}", *extra])


# ----------------------------------------------------------------------------- registry and decoding
def test_registry_names():
    assert {"spin", "ar", "euclid_ddpm"} <= set(SAMPLERS)
    for name, cls in SAMPLERS.items():
        assert cls.name == name


def test_decode_spins_is_argmax_cosine_with_margin():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g, dtype=torch.float64)
    table = table / table.norm(dim=-1, keepdim=True)
    spins = torch.randn(7, 8, generator=g, dtype=torch.float64)
    ids, cos, margin = decode_spins(spins, table, chunk=3)
    unit = spins / spins.norm(dim=-1, keepdim=True)
    ref = unit @ table.T
    assert torch.equal(ids, ref.argmax(-1))
    assert torch.allclose(cos, ref.max(-1).values)
    top2 = ref.topk(2, -1).values
    assert torch.allclose(margin, top2[:, 0] - top2[:, 1]) and (margin >= 0).all()
    # a very large kappa samples the argmax; a sampled non-nearest token has a negative margin
    ids_k, _, _ = decode_spins(spins, table, kappa=1e6, generator=g)
    assert torch.equal(ids_k, ids)
    _, _, m0 = decode_spins(spins, table, kappa=1e-6, generator=g)
    assert (m0 <= 1e-12).any()


# ----------------------------------------------------------------------------- generation
def test_field_only_sample_writes_jsonl(tmp_path):
    res = sample(_cfg(tmp_path, "ckpt=none", "max_new_tokens=5", "sampler.steps=4",
                      "prompt=The capital of France is"))
    assert res.sampler["field_only"] and "prior:field" in res.sampler["label"]
    lines = (res.out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["field_only"] is True and rec["sampler"] == "spin" and rec["ckpt"] is None
    assert 1 <= rec["n_tokens"] == len(rec["token_ids"]) == len(rec["diagnostics"]) <= 5
    d = rec["diagnostics"][0]
    assert {"token_id", "piece", "cos", "post_p", "dropped_mass", "field_norm", "lm_logprob", "steps"} <= set(d)
    assert d["steps"] == 4 and -1 <= d["cos"] <= 1 and 0 < d["post_p"] <= 1 and d["lm_logprob"] <= 0
    assert 0 <= d["dropped_mass"] < 1
    summary = json.loads((res.out / "summary.json").read_text())
    assert summary["n_tokens"] == rec["n_tokens"] and summary["field_only"] is True
    assert (res.out / "config.yaml").exists() and (res.out / "run.json").exists()


def test_same_seed_same_tokens_and_prompts_file(tmp_path, session):
    pf = tmp_path / "p.txt"
    pf.write_text("# comment\nA dog says\n\nThe opposite of hot is\nOne two three\n")
    a = sample(_cfg(tmp_path / "a", "ckpt=none", "max_new_tokens=4", f"prompts={pf}", "sampler.batch_size=2"),
               session=session)
    b = sample(_cfg(tmp_path / "b", "ckpt=none", "max_new_tokens=4", f"prompts={pf}", "sampler.batch_size=2"),
               session=session)
    assert [r["prompt"] for r in a.records] == ["A dog says", "The opposite of hot is", "One two three"]
    assert [r["token_ids"] for r in a.records] == [r["token_ids"] for r in b.records]


def test_kv_cache_loop_matches_full_recompute(session):
    """The per-token LM log-probs recorded by the cached loop equal a fresh forward over
    prompt + generated tokens (left padding, ragged prompts)."""
    cfg = compose("sample", TINY + ["ckpt=none", "sampler.steps=3", "stop_at_eos=false"])
    s = build_sampler(cfg, session)
    seqs = session.encode(["The capital of France is Paris. The capital of", "A cat"])
    ids, mask = session.batch(seqs)
    gb = s.generate(ids, mask, 5, torch.Generator().manual_seed(1))
    for b, prompt in enumerate(seqs):
        full = torch.tensor([prompt + gb.tokens[b].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(session.model(full).logits[0].double(), -1)
        L = len(prompt)
        ref = torch.stack([logp[L - 1 + i, gb.tokens[b, i]] for i in range(5)])
        assert torch.allclose(gb.diag["lm_logprob"][b].double(), ref, atol=1e-4)


def test_ar_sampler_and_greedy(tmp_path, session):
    res = sample(_cfg(tmp_path, "sampler.name=ar", "max_new_tokens=4", "prompt=A dog says"), session=session)
    rec = res.records[0]
    assert rec["sampler"] == "ar" and all(d["lm_logprob"] is not None for d in rec["diagnostics"])
    cfg = compose("sample", TINY + ["sampler.name=ar", "sampler.temperature=0"])
    s = build_sampler(cfg, session)
    ids, mask = session.batch(session.encode(["A dog says"]))
    gb = s.generate(ids, mask, 3, torch.Generator().manual_seed(0), stop_at_eos=False)
    with torch.no_grad():
        first = session.model(ids).logits[0, -1].argmax()
    assert int(gb.tokens[0, 0]) == int(first)
    assert torch.allclose(gb.diag["lm_logprob"][0, 0], torch.log_softmax(session.model(ids).logits[0, -1], -1).max(),
                          atol=1e-5)


def test_stops_at_eos(session):
    """A row that produces EOS stops there; later positions are invalid padding."""
    cfg = compose("sample", TINY + ["ckpt=none", "sampler.steps=2"])
    s = build_sampler(cfg, session)
    eos = session.eos_id
    orig = s.propose

    def forced(out, gen):
        res = orig(out, gen)
        res["token"] = res["token"].clone()
        res["token"][0] = eos
        return res

    s.propose = forced
    ids, mask = session.batch(session.encode(["A dog says", "A cat says"]))
    gb = s.generate(ids, mask, 4, torch.Generator().manual_seed(0))
    assert gb.stop[0] == "eos" and gb.valid[0].tolist() == [True, False, False, False]
    assert gb.valid[1].all()


def test_learned_spin_from_checkpoint(tmp_path, session, spin_ckpt):
    res = sample(_cfg(tmp_path, f"ckpt={spin_ckpt}", "max_new_tokens=3", "sampler.steps=3", "sampler.eta=0"),
                 session=session)
    assert not res.sampler["field_only"] and "learned" in res.sampler["label"]
    assert res.records[0]["ckpt"] == str(spin_ckpt) and res.records[0]["n_tokens"] >= 1


def test_euclid_ddpm_from_checkpoint(tmp_path, session, euclid_ckpt):
    res = sample(_cfg(tmp_path, "sampler.name=euclid_ddpm", f"ckpt={euclid_ckpt}", "max_new_tokens=3",
                      "sampler.steps=3"), session=session)
    assert res.sampler["sampler"] == "euclid_ddpm" and res.records[0]["n_tokens"] >= 1


def test_ckpt_auto_picks_newest_compatible(tmp_path, session, spin_ckpt, monkeypatch, capsys):
    root = tmp_path / "runs" / "train"
    good = root / "good" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    good.write_bytes(spin_ckpt.read_bytes())
    foreign = root / "other" / "checkpoints" / "last.ckpt"  # newer, but for another d
    foreign.parent.mkdir(parents=True)
    ck = torch.load(spin_ckpt, weights_only=True)
    ck["hyper_parameters"]["meta"]["dim"] = 32
    torch.save(ck, foreign)
    t = time.time()
    os.utime(good, (t - 100, t - 100))
    monkeypatch.chdir(tmp_path)
    path, notes = find_checkpoint(session, "posterior")
    assert path == str(Path("runs/train/good/checkpoints/last.ckpt")) and any("other" in n for n in notes)
    assert find_checkpoint(session, "euclid_ddpm")[0] is None
    res = sample(_cfg(tmp_path, "ckpt=auto", "max_new_tokens=2", "sampler.steps=2"), session=session)
    assert not res.sampler["field_only"]
    # nothing usable: field-only with a notice
    monkeypatch.chdir(tmp_path / "runs")
    res = sample(_cfg(tmp_path / "x", "ckpt=auto", "max_new_tokens=2", "sampler.steps=2"), session=session)
    assert res.sampler["field_only"] and "field-only" in capsys.readouterr().err  # notices go to stderr


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, match", [
    (["prompt="], "prompt is empty"),
    (["prompt=   "], "prompt is empty"),
    (["prompt=" + "hello " * 200], "context window"),
    (["sampler.eta=-1"], r"sampler.eta=-1.*>= 0"),
    (["sampler.steps=0"], r"sampler.steps=0.*at least 1"),
    (["sampler.lam=0"], r"sampler.lam=0.*> 0"),
    (["sampler.kappa=0"], "kappa"),
    (["sampler.name=nope"], "unknown sampler.name='nope'; choose one of ar, .*euclid_ddpm, spin"),
    (["sampler.grid=nope"], "sampler.grid='nope'.*uniform"),
    (["sampler.decode=argmax"], "sampler.decode='argmax'.*posterior, nearest"),
    (["sampler.top_k=-1"], "sampler.top_k=-1"),
    (["sampler.name=euclid_ddpm", "ckpt=none"], "objective=euclid_ddpm"),
    (["sampler.name=ar", "sampler.top_p=0"], "top_p"),
    (["max_new_tokens=0"], "max_new_tokens"),
    (["ckpt=/nonexistent/last.ckpt"], "no checkpoint at"),
])
def test_bad_input_raises_clear_error(tmp_path, session, extra, match):
    with pytest.raises(SampleError, match=match):
        sample(_cfg(tmp_path, "ckpt=none", *extra), session=session)


def test_checkpoint_for_another_model_or_dimension(tmp_path, spin_ckpt):
    from spindiff.config import ModelConfig

    llama = GenerationSession.load(ModelConfig(name="tiny-llama"))
    with pytest.raises(SampleError, match="trained on model 'tiny-gpt2'.*model.name=tiny-gpt2"):
        sample(_cfg(tmp_path, "model.name=tiny-llama", f"ckpt={spin_ckpt}"), session=llama)
    ck = torch.load(spin_ckpt, weights_only=True)
    ck["hyper_parameters"]["meta"]["dim"] = 32
    other = tmp_path / "d32.ckpt"
    torch.save(ck, other)
    with pytest.raises(SampleError, match="d=32.*d=64"):
        sample(_cfg(tmp_path, f"ckpt={other}"))


def test_cli_prints_error_and_exits_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_cli", Path(__file__).resolve().parent.parent / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(TINY + [f"out={tmp_path}", "sampler.steps=0"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: sampler.steps=0")
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + ["sampler.etaa=1"])
    assert e.value.code == 2
    rc = cli.main(TINY + [f"out={tmp_path / 'ok'}", "ckpt=none", "max_new_tokens=2", "sampler.steps=2"])
    assert rc == 0 and (tmp_path / "ok" / "samples.jsonl").exists()


# ----------------------------------------------------------------------------- fast paths
def test_bound_network_equals_the_network(session, euclid_ckpt):
    """The euclid sampler's per-token bound network (context share and time conditioning hoisted)
    is the network's own forward."""
    e = build_sampler(compose("sample", TINY + ["sampler.name=euclid_ddpm", f"ckpt={euclid_ckpt}"]), session)
    g = torch.Generator().manual_seed(0)
    ctx_dim = e.net.context_dim
    ctx = torch.randn(5, ctx_dim, generator=g) if ctx_dim else None
    x = torch.randn(5, session.dim, generator=g)
    bound = e.net.bind(ctx)
    for tv in (0.9, 0.31, 0.001):
        t = torch.full((5,), tv)
        with torch.no_grad():
            ref, got = e.net(x, t, ctx), bound(x, t)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert len(bound.time_cache) == 3  # one entry per time value


def test_coarse_bfloat16_search_gives_the_exact_argmax():
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(6000, 32, generator=g), dim=-1)
    rows = table[torch.randint(0, 6000, (300,), generator=g)]
    spins = torch.cat([rows + 0.2 * torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)])
    exact = decode_spins(spins, table)
    fast = decode_spins(spins, table, coarse=table.to(torch.bfloat16))
    assert torch.equal(exact[0], fast[0])
    assert torch.allclose(exact[1], fast[1], atol=1e-6) and torch.allclose(exact[2], fast[2], atol=1e-6)


def test_registries_refuse_a_duplicate_name():
    """Issue 19: registering another class under a taken sampler name (or another schema under a
    taken entry name) is an error naming both, never a silent overwrite."""
    from spindiff.config import ENTRIES, register_entry
    from spindiff.generation.base import SAMPLERS, Sampler, register_sampler

    before = SAMPLERS["ar"]
    with pytest.raises(ValueError, match=r"sampler name 'ar' is already registered by .*ARSampler|already registered"):
        @register_sampler("ar")
        class Impostor(Sampler):  # noqa: F841
            pass
    assert SAMPLERS["ar"] is before
    register_sampler("ar")(before)  # the same class again (a module re-imported) is fine

    class OtherSchema:
        pass
    with pytest.raises(ValueError, match="entry point 'train' is already registered"):
        register_entry("train", OtherSchema)
    assert ENTRIES["train"].schema.__name__ == "TrainConfig"
