"""Evaluation metrics (plain functions, known values) and the evaluation runner on tiny-gpt2."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from spindiff.evaluation import evaluate as ev
from spindiff.config import ModelConfig, compose
from spindiff.generation import GenerationSession, build_sampler

TINY = ["model.name=tiny-gpt2", "wandb.mode=disabled", "stream=false"]


@pytest.fixture(scope="module")
def session() -> GenerationSession:
    return GenerationSession.load(ModelConfig(name="tiny-gpt2"))


# ----------------------------------------------------------------------------- distributions
def test_tv_kl_known_values():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    assert torch.allclose(ev.total_variation(p, q), torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(ev.kl_divergence(p, q), torch.tensor([math.log(2), 0.0], dtype=torch.float64))
    r = torch.softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    s = torch.softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    assert (ev.kl_divergence(r, s) >= 0).all() and torch.allclose(ev.kl_divergence(r, r), torch.zeros(4, dtype=torch.float64))


def test_empirical_distribution_top1_and_logprob():
    draws = torch.tensor([[0, 0, 1, 2], [2, 2, 2, 2]])
    emp = ev.empirical_distribution(draws, 3)
    assert emp.tolist() == [[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert ev.top1_agreement(draws, probs).tolist() == [0.5, 1.0]
    lp = probs.log()
    assert torch.allclose(ev.mean_draw_logprob(draws, lp)[1], torch.tensor(math.log(0.8), dtype=torch.float64))
    assert ev.perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)
    assert math.isnan(ev.perplexity([]))


def test_exact_sampling_has_small_tv_and_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=g)
    draws = torch.multinomial(torch.softmax(logits, -1), 20000, replacement=True, generator=g)
    m = ev.fidelity_metrics(draws, logits)
    assert m["fidelity/tv"] < 0.03 and m["fidelity/kl"] < 0.01
    assert abs(m["fidelity/logprob_excess"]) < 0.03  # exact draws: 0 in expectation
    # a colder sampler (temperature 0.5) has a positive excess, a hotter one (2) a negative one
    for temp, sign in ((0.5, 1), (2.0, -1)):
        d = torch.multinomial(torch.softmax(logits / temp, -1), 20000, replacement=True, generator=g)
        assert sign * ev.fidelity_metrics(d, logits)["fidelity/logprob_excess"] > 0.1


# ----------------------------------------------------------------------------- diversity
def test_distinct_and_repetition():
    seqs = [[1, 2, 3, 1, 2, 3], [4, 5, 6]]
    assert ev.distinct_n(seqs, 1) == pytest.approx(6 / 9)
    assert ev.distinct_n(seqs, 2) == pytest.approx(5 / 7)  # (1,2),(2,3),(3,1),(4,5),(5,6); (1,2),(2,3) repeat
    assert ev.repetition_rate(seqs, 2) == pytest.approx((1 - 3 / 5 + 0) / 2)
    assert math.isnan(ev.distinct_n([[1]], 2))


def test_bleu_and_self_bleu():
    a = [1, 2, 3, 4, 5, 6]
    assert ev.bleu(a, [a]) == pytest.approx(1.0)
    assert ev.bleu(a, [[7, 8, 9, 10, 11, 12]]) == 0.0
    partial = ev.bleu([1, 2, 3, 4, 9, 9], [a])
    assert 0 < partial < 1
    assert ev.bleu([1, 2], [a]) < ev.bleu([1, 2, 3, 4, 5], [a])  # brevity penalty
    assert ev.self_bleu([a, a, a]) == pytest.approx(1.0)
    assert ev.self_bleu([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]) == 0.0
    assert math.isnan(ev.self_bleu([a]))


def test_mean_ci_matches_student_t():
    x = [1.0, 2.0, 4.0, 7.0]
    m, h = ev.mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert m == pytest.approx(np.mean(x)) and h == pytest.approx((hi - lo) / 2)
    assert math.isnan(ev.mean_ci([3.0])[1]) and ev.mean_ci([3.0, float("nan")])[0] == 3.0


# ----------------------------------------------------------------------------- prompts
def test_eval_prompts_are_held_out():
    from spindiff.training.sequences import DEFAULT_PROMPTS

    prompts = ev.default_eval_prompts()
    assert len(prompts) == 40 and all(p.strip() for p in prompts) and len(set(prompts)) == 40
    assert not set(prompts) & set(DEFAULT_PROMPTS)
    assert "The capital of France is Paris. The capital of Germany is" not in prompts  # paper set
    assert any("\n" in p for p in prompts)  # code prompts keep their newlines
    assert ev.load_eval_prompts("", 5) == prompts[:5]


# ----------------------------------------------------------------------------- runner
def test_evaluate_sampler_ar_beats_field_only_on_fidelity(session):
    prompts = ev.default_eval_prompts()[:4]
    cache = ev.EvalCache()
    res = {}
    for extra in (["sampler.name=ar"], ["ckpt=none", "sampler.steps=5", "sampler.eta=2"]):
        s = build_sampler(compose("sample", TINY + extra), session)
        res[s.name] = ev.evaluate_sampler(s, prompts, seeds=[0, 1], n_draws=400, max_new_tokens=4, batch_size=2,
                                          cache=cache)
    assert len(cache._store) == 1  # the prompt forward is shared
    ar, spin = res["ar"], res["spin"]
    assert ar.mean["fidelity/tv"] < spin.mean["fidelity/tv"]
    assert ar.mean["fidelity/logprob"] > spin.mean["fidelity/logprob"]
    for r in (ar, spin):
        assert len(r.per_seed) == 2 and math.isfinite(r.ci["fidelity/tv"])
        assert r.mean["gen/mean_len"] <= 4 and r.mean["cost/tokens_per_s"] > 0
        assert 0 <= r.mean["gen/distinct_1"] <= 1 and r.mean["gen/perplexity"] >= 1
    assert spin.mean["cost/sde_steps_per_token"] == 5 and ar.mean["cost/sde_steps_per_token"] == 0
    flat = spin.flat()
    assert flat["label"].startswith("spin[prior:field") and "fidelity/tv_ci" in flat


def test_evaluate_writes_metrics_and_cli(tmp_path, session, capsys):
    cfg = compose("evaluate", TINY + ["ckpt=none", "sampler.steps=3", "eval.n_prompts=3", "eval.seeds=[0,1]",
                                    "eval.n_draws=8", "max_new_tokens=3", f"out={tmp_path / 'e'}"])
    res = ev.evaluate(cfg, session=session)
    data = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert data["sampler"]["n_prompts"] == 3 and len(data["per_seed"]) == 2
    assert data["mean"]["fidelity/tv"] == pytest.approx(res.mean["fidelity/tv"])
    rc = ev.main(TINY + ["ckpt=none", "sampler.eta=-2", f"out={tmp_path / 'bad'}"])
    assert rc == 2 and "sampler.eta=-2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval.seeds"):
        ev.evaluate(compose("evaluate", TINY + ["ckpt=none", "eval.seeds=[]"]), session=session, log=False)


def test_evaluate_stdout_is_the_result_only(tmp_path, capsys):
    """The table and the JSON of means on stdout; per-seed progress and the 'wrote' line on stderr."""
    rc = ev.main(TINY + ["ckpt=none", "sampler.steps=2", "eval.n_prompts=2", "eval.seeds=[0]", "eval.n_draws=4",
                         "max_new_tokens=2", "wandb.mode=disabled", f"out={tmp_path / 'e'}"])
    cap = capsys.readouterr()
    assert rc == 0 and "wrote" not in cap.out and "seed 0:" not in cap.out
    assert "wrote" in cap.err
    assert json.loads(cap.out[cap.out.index("{"):])["fidelity/tv"] >= 0
