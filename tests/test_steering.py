"""The steering field B (spindiff.generation.steering): its three sources, the prior form (logit
bias g B.e_v, exact through ``generate``'s LogitsProcessor), the dynamics form (damping plus
precession, tangent, linear in g), and bad input through the real CLI (exit 2, one error line)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spindiff.config import ModelConfig, compose
from spindiff.generation import GenerationSession, SampleError, build_sampler
from spindiff.generation.sample import sample
from spindiff.generation.steering import (Steering, SteeringLogitsProcessor, build_steering, check_steer_config,
                                          contrast_direction, word_direction)
from spindiff.sphere.geometry import SphereGeometry
from spindiff.sphere.sde import llg_field_drift

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.name=tiny-gpt2", "model.dtype=float64", "wandb.mode=disabled", "stream=false"]
WORDS = "the,and,two"  # single tokens (with a leading space) for the tiny BPE tokenizer


@pytest.fixture(scope="module")
def session() -> GenerationSession:
    return GenerationSession.load(ModelConfig(name="tiny-gpt2", dtype="float64"))


def _cfg(*extra: str):
    return compose("sample", TINY + list(extra))


def test_word_field_is_the_normalised_mean_unit_embedding(session):
    st = build_steering(_cfg(f"steer.words={WORDS}", "steer.strength=3").steer, session)
    ids = [session.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORDS.split(",")]
    W = session.adapter.unembedding().detach()
    mean = torch.stack([W[i] / W[i].norm() for i in ids]).mean(0) - (W / W.norm(dim=-1, keepdim=True)).mean(0)
    assert torch.allclose(st.direction, mean / mean.norm(), atol=1e-12)
    assert st.words == tuple(WORDS.split(",")) and st.strength == 3.0
    # the field favours the words: each word's B.e_v is above the vocabulary's mean
    fl = st.field_logits(session.token_table)
    assert all(float(fl[i]) > float(fl.mean()) + 2 * float(fl.std()) for i in ids)


def test_logit_bias_is_exactly_g_B_dot_e_and_cached(session):
    g = 2.5
    st = Steering(torch.randn(session.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), g)
    table = session.token_table
    bias = st.logit_bias(table)
    assert torch.allclose(bias, g * (table @ st.direction), atol=1e-12)
    assert st.logit_bias(table) is bias  # cached
    scores = torch.randn(3, table.shape[0], dtype=torch.float64)
    out = SteeringLogitsProcessor(bias)(torch.zeros(3, 1, dtype=torch.long), scores)
    assert torch.allclose(out - scores, bias.expand_as(scores), atol=1e-12)
    t2 = table.clone()
    t2[0] += 1.0  # an edited table gives a new bias
    assert not torch.allclose(st.logit_bias(t2)[0], bias[0])
    assert torch.equal(Steering(st.direction, g, mode="dynamics").logit_bias(table), torch.zeros_like(bias))


def test_ar_generate_applies_the_bias_at_every_step(session):
    """Greedy ar with the steering processor = a manual greedy loop on logits + g B.e_v."""
    cfg = _cfg("sampler.name=ar", "sampler.temperature=0", f"steer.words={WORDS}", "steer.strength=6")
    sm = build_sampler(cfg, session)
    assert sm.steering is not None and sm.describe()["steering"]["strength"] == 6.0
    ids, mask = session.batch(session.encode(["Paris is", "The capital of"]))
    gb = sm.generate(ids, mask, 6, torch.Generator().manual_seed(0), stop_at_eos=False)
    bias = sm.steering.logit_bias(session.token_table)
    cur, m = ids.clone(), mask.clone()
    from spindiff.lm.adapter import last_positions

    manual = []
    with torch.no_grad():
        for _ in range(6):
            logits = session.model(input_ids=cur, attention_mask=m, position_ids=last_positions(m)).logits[:, -1]
            tok = (logits + bias).argmax(-1)
            manual.append(tok)
            cur, m = torch.cat([cur, tok[:, None]], 1), torch.cat([m, torch.ones_like(tok)[:, None]], 1)
    assert torch.equal(gb.tokens, torch.stack(manual, 1))
    plain = build_sampler(_cfg("sampler.name=ar", "sampler.temperature=0"), session)
    base = plain.generate(ids, mask, 6, torch.Generator().manual_seed(0), stop_at_eos=False)
    assert not torch.equal(base.tokens, gb.tokens)  # the bias changes the greedy path here
    # lm_logprob stays the unsteered LM's own log-probability of the chosen tokens
    assert torch.isfinite(gb.diag["lm_logprob"]).all()


def test_ar_draws_are_from_the_tilted_distribution(session):
    cfg = _cfg("sampler.name=ar", f"steer.words={WORDS}", "steer.strength=4")
    sm = build_sampler(cfg, session)
    ids, mask = session.batch(session.encode(["Paris is"]))
    out = sm.forward(ids, mask)
    draws = sm.draw_from(out, 20000, torch.Generator().manual_seed(0))[0]
    p = torch.softmax(out.logits[0].double() + sm.steering.logit_bias(session.token_table), -1)
    emp = torch.bincount(draws, minlength=p.shape[0]).double() / draws.numel()
    assert 0.5 * (emp - p).abs().sum() < 0.05


def test_drift_is_damping_plus_precession(one_thread):
    geo = SphereGeometry()
    gen = torch.Generator().manual_seed(1)
    d, B = 8, 5
    spin = geo.random_uniform(B, d, dtype=torch.float64, generator=gen)
    direction = torch.randn(d, dtype=torch.float64, generator=gen)
    unit = direction / direction.norm()
    st = Steering(direction, 1.7, mode="dynamics", lam=2.0)
    dr = st.drift(spin, 0.3)
    ref = llg_field_drift(spin, unit.expand(B, d), 1.7, 2.0, geo)
    assert torch.allclose(dr, ref, atol=1e-12)
    assert (spin * dr).sum(-1).abs().max() < 1e-12  # tangent
    neg = Steering(direction, -1.7, mode="dynamics", lam=2.0).drift(spin, 0.3)
    assert torch.allclose(neg, -dr, atol=1e-12)  # linear in g (negative = towards -B)
    # d = 3: the precession is the exact -S x B
    s3 = geo.random_uniform(4, 3, dtype=torch.float64, generator=gen)
    b3 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    st3 = Steering(b3, 1.0, mode="both", lam=1.0)
    pre = st3.drift(s3, 0.0) - geo.proju(s3, b3.expand(4, 3))
    assert torch.allclose(pre, -torch.linalg.cross(s3, b3.expand(4, 3), dim=-1), atol=1e-12)
    # damping is the Riemannian gradient of the tilt g S.B (the prior form's exponent at S = e_v)
    s = spin.clone().requires_grad_(True)
    (1.7 * (s @ unit)).sum().backward()
    assert torch.allclose(Steering(direction, 1.7, mode="dynamics").drift(spin, 0.3), geo.proju(spin, s.grad), atol=1e-12)
    # profiles and modes
    late = Steering(direction, 2.0, mode="dynamics", profile="late", T=1.0)
    assert torch.equal(late.drift(spin, 1.0), torch.zeros_like(spin))
    assert torch.allclose(late.drift(spin, torch.full((B,), 0.25, dtype=torch.float64)),
                          0.75 * Steering(direction, 2.0, mode="dynamics").drift(spin, 0.0), atol=1e-12)
    assert torch.equal(Steering(direction, 2.0, mode="prior").drift(spin, 0.5), torch.zeros_like(spin))


def test_contrast_field_is_the_difference_of_context_fields(session):
    from spindiff.lm.field import ContextFieldProvider

    pos, neg = "Paris is up", "two and the"
    st = build_steering(_cfg(f"steer.positive={pos}", f"steer.negative={neg}", "steer.strength=1").steer, session)
    prov = ContextFieldProvider(session.model, "all", normalize=False, final_norm=True)

    def field(p):
        ids, mask = session.batch(session.encode([p]))
        return prov(ids, mask).field[0]
    diff = field(pos) - field(neg)
    assert torch.allclose(st.direction, diff / diff.norm(), atol=1e-10)
    with pytest.raises(SampleError, match="zero norm"):
        build_steering(_cfg(f"steer.positive={pos}", f"steer.negative={pos}", "steer.strength=1").steer, session)


def test_vector_file_field(tmp_path, session):
    v = np.linspace(-1, 1, session.dim)
    np.save(tmp_path / "b.npy", v)
    st = build_steering(_cfg(f"steer.vector={tmp_path / 'b.npy'}", "steer.strength=2").steer, session)
    assert torch.allclose(st.direction, torch.from_numpy(v / np.linalg.norm(v)), atol=1e-12)
    torch.save(torch.zeros(session.dim), tmp_path / "z.pt")
    with pytest.raises(SampleError, match="zero norm"):
        build_steering(_cfg(f"steer.vector={tmp_path / 'z.pt'}", "steer.strength=2").steer, session)
    np.save(tmp_path / "short.npy", v[:5])
    with pytest.raises(SampleError, match="shape"):
        build_steering(_cfg(f"steer.vector={tmp_path / 'short.npy'}", "steer.strength=2").steer, session)


def test_model_free_checks():
    for extra, match in [(["steer.strength=nan"], "not finite"), (["steer.strength=3"], "needs a steering field"),
                         (["steer.words=the", "steer.vector=x.npy", "steer.strength=1"], "several sources"),
                         (["steer.mode=sideways"], "steer.mode"), (["steer.profile=wobbly"], "steer.profile"),
                         (["steer.positive=a", "steer.strength=1"], "both"), (["steer.actadd.scale=inf"], "not finite")]:
        with pytest.raises(SampleError, match=match):
            check_steer_config(_cfg(*extra).steer)
    check_steer_config(_cfg().steer)  # defaults: off
    assert build_steering(_cfg().steer, None) is None


def test_sample_records_steering_and_interventions(tmp_path, session):
    res = sample(_cfg("sampler.name=ar", f"steer.words={WORDS}", "steer.strength=2", "steer.head_gains=L0H1:0.5",
                      "prompt=Paris is", "max_new_tokens=4", f"out={tmp_path}"), session)
    assert res.summary["steering"]["words"] == WORDS.split(",")
    assert res.summary["interventions"][0]["gains"] == {"L0H1": 0.5}
    # the hooks are gone afterwards
    assert not any(session.adapter.out_proj(l)._forward_pre_hooks for l in range(session.adapter.n_layers))


def test_spin_sampler_refuses_a_field_it_does_not_apply(session):
    from spindiff.generation import get_sampler_class

    cls = get_sampler_class("euclid_ddpm")
    assert cls.steering_modes == ()
    spin = get_sampler_class("spin")
    cfg = _cfg("sampler.name=spin", "ckpt=none", f"steer.words={WORDS}", "steer.strength=2", "steer.mode=dynamics")
    if "dynamics" in spin.steering_modes:
        sm = build_sampler(cfg, session)
        assert sm.steering is not None and sm.steering.mode == "dynamics"
    else:
        with pytest.raises(SampleError, match="does not apply steer.mode=dynamics"):
            build_sampler(cfg, session)


# --------------------------------------------------------------------------- the real CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "sample.py"), "model.name=tiny-gpt2", "sampler.name=ar",
                           "max_new_tokens=2", "stream=false", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


SLOW = pytest.mark.slow  # one subprocess each (~8 s); two of them run in the quick suite


@pytest.mark.parametrize("args, match", [
    (["steer.words=zzqqxxv", "steer.strength=2"], "not a single token"),  # unknown / out of vocabulary
    pytest.param(["steer.words=the,hello", "steer.strength=2"], "'hello' is not a single token", marks=SLOW),
    pytest.param(["steer.positive=Paris is", "steer.negative=Paris is", "steer.strength=2"], "zero norm", marks=SLOW),
    (["steer.head_gains=L5H0:0.5"], "outside the model"),
    pytest.param(["steer.head_gains=L0H9:2"], "outside the model", marks=SLOW),
    pytest.param(["steer.words=the", "steer.strength=inf"], "not finite", marks=SLOW),
    pytest.param(["steer.words=the", "steer.strength=nan"], "not finite", marks=SLOW),
    pytest.param(["steer.actadd.layer=9", "steer.actadd.scale=1", "steer.words=the"], "outside", marks=SLOW),
])
def test_cli_bad_steering_input_exits_2_with_one_error_line(tmp_path, args, match):
    r = _cli(f"out={tmp_path}", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


# --------------------------------------------------------------------------- the benchmark's scoring
def test_bench_scoring_helpers(bench):
    bs = bench("bench_steering")
    assert bs.held_out_hit("We watched the Games last night.", ["games"])
    assert not bs.held_out_hit("The gamers were late.", ["game", "games"])  # whole words only
    for t, v in bs.TOPICS.items():  # held-out words are never steering words
        assert not {w.lower() for w in v["steer"]} & {w.lower() for w in v["heldout"]}, t
    assert len(bs.NEUTRAL_PROMPTS) == 40 and len(set(bs.NEUTRAL_PROMPTS)) == 40
    # success at matched log-perplexity: linear between the strengths that bracket the target
    pts = [(0.0, 3.0, 0.1), (1.0, 4.0, 0.5), (2.0, 5.0, 0.9)]
    assert bs.success_at(pts, 3.5) == pytest.approx(0.3)
    assert bs.success_at(pts, 4.5) == pytest.approx(0.7)
    assert math.isnan(bs.success_at(pts, 5.5))
    # within a fluency budget: the best success on the curve at log-ppl <= budget (and distinct-2 >= floor)
    pts = [(0.0, 3.0, 0.1, 0.9), (1.0, 4.0, 0.5, 0.8), (2.0, 5.0, 0.9, 0.4)]
    assert bs.best_within(pts, 4.5) == pytest.approx(0.7)  # crossing inside the last segment
    assert bs.best_within(pts, 9.0) == pytest.approx(0.9)  # never reaches the budget: its strongest point
    assert bs.best_within(pts, 2.0) != bs.best_within(pts, 2.0)  # nothing inside: NaN
    assert bs.best_within(pts, 9.0, min_distinct2=0.6) == pytest.approx(0.7)  # diversity floor cuts at d = 0.6
    assert bs.best_within(pts, 3.5, min_distinct2=0.85) == pytest.approx(0.3)  # ppl and d both bind: d first
    # gap statistics: contrast = mean over male-coded minus female-coded occupations
    gaps = np.array([2.0, 2.2, 1.8, 2.0, -1.0, -1.2, -0.8, -1.0])
    labels = np.array(["male"] * 4 + ["female"] * 4)
    occ = ["a", "a", "b", "b", "c", "c", "d", "d"]
    st = bs.gap_stats(gaps, labels, occ)
    assert st["contrast"][0] == pytest.approx(3.0) and st["mean_gap"][0] == pytest.approx(0.5)
    assert st["mean_abs_gap"][0] == pytest.approx(1.5)


@pytest.mark.smollm2
def test_bench_topic_words_are_single_tokens_for_smollm2(bench):
    from spindiff.lm.models import load_model
    from spindiff.generation.steering import word_ids

    bs = bench("bench_steering")
    tok = load_model(ModelConfig(name="smollm2-135m")).tokenizer
    for t, v in bs.TOPICS.items():
        assert len(word_ids(tok, v["steer"], "smollm2-135m")) == len(v["steer"])
