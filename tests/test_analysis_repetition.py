"""Repetition study (analysis/loops.py, attractor.py, induction.py, repetition.py): loop detection on
constructed sequences, the recorded attractor push = the per-head logit attribution of the emitted
token, the induction score on a hand-built induction circuit and on a random model, and the
``repetition`` command end to end on a tiny model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from analysis.attractor import RowSampler, generate_recorded
from analysis.induction import induction_scores
from analysis.loops import auc, detect_loop, distinct_n, rep_w, seq_rep_n, wilson
from spindiff.lm.adapter import get_adapter
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.models import build_tiny_model


# --------------------------------------------------------------------------- loop detection
def test_detect_loop_period_and_onset():
    pre = [11, 12, 13, 14, 15]
    seq = pre + [1, 2, 3] * 5  # the 3-gram starts at 5, repeats to the end
    lp = detect_loop(seq, max_period=8, min_copies=3, min_repeated=8)
    assert lp.loop and lp.period == 3 and lp.onset == 8 and lp.copies == pytest.approx(5)


def test_detect_loop_period_one_and_smallest_period():
    lp = detect_loop([5, 6, 7] + [9] * 12, min_repeated=8)
    assert lp.loop and lp.period == 1 and lp.onset == 4
    # 2-periodic tail is also 4-periodic: the earliest onset (period 2) is reported
    lp = detect_loop([1, 2, 3, 4, 5] + [7, 8] * 8, min_repeated=8)
    assert lp.period == 2 and lp.onset == 7


def test_detect_loop_rejects_short_or_broken_tails():
    assert not detect_loop(list(range(30))).loop  # no repetition
    assert not detect_loop(list(range(10)) + [1, 2, 3] * 2, min_copies=3).loop  # 2 copies only
    assert not detect_loop([4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1], min_repeated=4).loop  # broken at the end
    assert not detect_loop([1, 2, 3, 4] * 3 + [9], max_period=8).loop
    assert not detect_loop([3] * 6, min_repeated=8).loop  # too few repeated tokens


def test_repetition_metrics_and_stats():
    assert seq_rep_n([1, 2, 3, 4, 5, 6], 4) == 0.0
    assert seq_rep_n([1, 2, 1, 2, 1, 2, 1, 2], 4) == pytest.approx(1 - 2 / 5)
    assert distinct_n([1, 1, 1, 1], 2) == pytest.approx(1 / 3)
    assert rep_w([1, 2, 1, 3], 16) == pytest.approx(1 / 3)
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi


def test_row_sampler_greedy_and_top_k():
    s = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    f = RowSampler([0.0, 1.0, 0.5], [0, 2, 0]).filtered(s)
    assert torch.isfinite(f[0]).sum() == 1 and f[0, 1] == 3.0  # greedy: the argmax only
    assert torch.isfinite(f[1]).tolist() == [False, True, False, True]  # top-2
    assert torch.allclose(f[2], s[2] / 0.5)  # temperature, whole vocabulary
    out = RowSampler([0.0, 1.0, 0.5], [0, 2, 0])(None, s)
    assert (torch.isfinite(out).sum(-1) == 1).all() and out[0, 1] == 0.0  # one token per row, greedy = argmax


def test_row_sampler_draws_from_tempered_top_k():
    torch.manual_seed(0)
    n = 20000
    s = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(n, 1)
    for T, k in ((1.0, 0), (0.5, 3)):
        out = RowSampler([T] * n, [k] * n)(None, s)
        freq = torch.bincount(out.argmax(-1), minlength=5).double() / n
        want = (s[0] / T).masked_fill(s[0] < (s[0].topk(k).values[-1] if k else -1e9), float("-inf")).double().softmax(-1)
        assert torch.allclose(freq, want, atol=4 * (0.25 / n) ** 0.5), (T, k, freq, want)


# --------------------------------------------------------------------------- attractor push
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_recorded_push_is_per_head_logit_attribution(name):
    model, tok = build_tiny_model(name, seed=1, dtype=torch.float64)
    ad = get_adapter(model)
    prompts = [tok("the cat sat", add_special_tokens=False)["input_ids"],
               tok("a dog", add_special_tokens=False)["input_ids"]]
    pad = tok.pad_token_id
    res = generate_recorded(model, ad, prompts, [1.0, 0.0], [0, 5], 6, pad, batch_size=2, seed=3)
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    prov = ContextFieldProvider(model, heads, "in_situ", normalize=False, final_norm=True, adapter=ad)
    W_U = ad.unembedding()
    for b, p in enumerate(prompts):
        for s in range(6):
            ctx = torch.tensor([p + res["tokens"][b, :s].tolist()])
            out = prov(ctx)
            tok_s = res["tokens"][b, s]
            want = out.per_head[0] @ W_U[tok_s]  # (K,) per-head logit attribution of the emitted token
            assert torch.allclose(res["push"][b, s].double(), want, atol=1e-5), (b, s)
            assert torch.allclose(res["field"][b, s].double(), out.per_head[0].sum(0), atol=1e-5)
            lp = out.logits[0].log_softmax(-1)
            assert float(res["logp"][b, s]) == pytest.approx(float(lp[tok_s]), abs=1e-5)
    # the summed push is the field's projection on the emitted token
    tot = (res["field"] * W_U[res["tokens"]].float()).sum(-1)
    assert torch.allclose(res["push"].sum(-1), tot, atol=1e-4)


# --------------------------------------------------------------------------- induction score
def induction_circuit(V: int = 16, P: int = 32):
    """A 2-layer GPT-2 wired by hand: L0H0 copies the previous token into a residual slot (query =
    position i, key = position i - 1), L1H0 attends from token x_i to the position whose
    previous-token slot holds x_i (K-composition): the induction head. Every other head, MLP and
    bias is zero. Residual = [token one-hot (V) | position one-hot (P) | previous-token slot (V)]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    D, H = 2 * V + P, 2
    dh = D // H
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=H, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    m = GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for blk in m.transformer.h:
            blk.ln_1.weight.fill_(1.0), blk.ln_2.weight.fill_(1.0)
        m.transformer.ln_f.weight.fill_(1.0)
        m.transformer.wte.weight[:, :V] = torch.eye(V)
        m.transformer.wpe.weight[:, V:V + P] = torch.eye(P)
        a0, a1 = m.transformer.h[0].attn, m.transformer.h[1].attn
        Wq, Wk, Wv = (a0.c_attn.weight[:, i * D:i * D + dh] for i in range(3))  # head 0 blocks (views)
        for i in range(P - 1):  # query position i+1 matches key position i
            Wq[V + i + 1, i] = 3.0
            Wk[V + i, i] = 3.0
        Wv[:V, :V] = torch.eye(V)
        a0.c_proj.weight[:V, V + P:] = torch.eye(V) * 0.2  # head 0 rows -> previous-token slot
        Wq, Wk, Wv = (a1.c_attn.weight[:, i * D:i * D + dh] for i in range(3))
        Wq[:V, :V] = torch.eye(V) * 3.0  # current token
        Wk[V + P:, :V] = torch.eye(V) * 3.0  # previous-token slot
        Wv[:V, :V] = torch.eye(V)
    return m


def test_induction_score_one_on_hand_built_circuit_zero_on_random():
    m = induction_circuit()
    ad = get_adapter(m)
    sc = induction_scores(m, ad, R=8, batch=4, vocab=range(16), bos=None, seed=0)
    assert sc.shape == (2, 2)
    assert sc[1, 0] > 0.9, sc  # the induction head
    assert sc[0, 0] < 0.1 and sc[1, 1] < 0.2  # previous-token head and an idle (uniform) head
    rnd, tok = build_tiny_model("tiny-gpt2", seed=0, dtype=torch.float64, n_layers=2)
    rs = induction_scores(rnd, get_adapter(rnd), R=30, batch=4, vocab=range(10, len(tok)), bos=None, seed=0)
    assert rs.max() < 0.25 and rs.mean() < 0.1, rs


# --------------------------------------------------------------------------- measurements on synthetic records
def _synthetic(seed=0, n=40, S=30, K=6):
    """Rows 0..n/2 loop from onset 10 (period 2); head 3 pushes the emitted token only inside loops."""
    rng = np.random.default_rng(seed)
    onsets = np.array([10 if i < n // 2 else -1 for i in range(n)])
    periods = np.where(onsets >= 0, 2, -1)
    push = rng.normal(0, 0.1, (n, S, K))
    prob = rng.uniform(0.2, 0.4, (n, S))
    for i in range(n // 2):
        push[i, 10:, 3] += 2.0
        prob[i, 10:] = np.linspace(0.5, 0.99, S - 10)  # p rises with every copy
    return onsets, periods, push, prob


def test_attractor_heads_find_the_loop_head_and_compare_induction():
    from analysis.attractor_stats import attractor_heads

    onsets, _, push, _ = _synthetic()
    ind = np.array([0.0, 0.1, 0.05, 0.9, 0.2, 0.0]).reshape(2, 3)
    res = attractor_heads(push, onsets, ind, n_heads=3, top=1, n_boot=50)
    assert res["top_attractor"][0]["head"] == "L1H0"  # flat index 3 = layer 1, head 0
    assert res["score"][3] == pytest.approx(2.0, abs=0.1)
    assert res["top_overlap"] == 1


def test_self_reinforcement_and_time_course_and_prediction():
    from analysis.attractor_stats import onset_prediction, self_reinforcement, time_course

    onsets, periods, push, prob = _synthetic()
    sr = self_reinforcement(prob, onsets, periods, 4, n_boot=50)
    assert sr["copy3_minus_copy1"][0] > 0.05 and sr["copy3_minus_copy1"][1] > 0
    sig = {"push": push.sum(-1), "self_push": push.sum(-1), "seen_push": np.zeros_like(prob), "cos_prev": prob,
           "prob": prob, "entropy": -prob, "maxprob": prob}
    tc = time_course(sig, onsets, 4, n_boot=50)
    assert tc["n_loops"] == 20 and tc["push"]["after_minus_before"][0] == pytest.approx(2.0, abs=0.1)
    pred = onset_prediction(sig, onsets, [1, 4], n_boot=20)
    assert pred["1"]["n_positive"] == 20  # one onset step per loop
    assert 0 <= pred["4"]["single"]["maxprob"][0] <= 1


def test_repetition_cli_small_run_and_bad_input(tmp_path, capsys):
    from analysis.cli import main

    out = tmp_path / "r"
    main(["repetition", "model.name=tiny-gpt2", "model.dtype=float64", "quick=true", "progress=false",
          "n_bootstrap=30", "repetition.prompts_per_cell=3", "repetition.dense_prompts=4",
          "repetition.max_new_tokens=12", "repetition.induction_len=8", "repetition.workers=1", f"out={out}"])
    for f in ("loops.csv", "repetition.json", "fig_phase.png", "fig_attractor_time_course.png"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader(open(out / "loops.csv")))
    assert len(rows) == 4 + 2 * 3  # greedy (T <= dense_temperature: dense_prompts) + T=1 x 2 top-k cells
    assert sum(float(r["temperature"]) == 0 for r in rows) == 4
    assert {"prompt_id", "temperature", "top_k", "loop", "onset"} <= set(rows[0])
    # the same prompt id is the same prompt text in every cell
    text = {}
    for r in rows:
        assert text.setdefault(r["prompt_id"], r["prompt"]) == r["prompt"]
    rep = json.loads((out / "repetition.json").read_text())
    assert rep["quick"] and rep["phase"]["n_continuations"] == 10
    with pytest.raises(SystemExit) as e:
        main(["repetition", "model.name=tiny-gpt2", "repetition.temperatures=[-1]", f"out={tmp_path / 'bad'}"])
    assert e.value.code == 2 and "repetition.temperatures" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_intervention_arms_reuse_the_grid_base_and_read_back(tmp_path):
    """intervention(): the base arm passed in is used as is (not regenerated), every other arm
    continues the same prompts, costs are relative to the base perplexity, and head gain 0 on
    every head of a tiny model changes its reference perplexity."""
    from types import SimpleNamespace

    from analysis.loops import RepetitionConfig
    from analysis.repetition import intervention

    model, tok = build_tiny_model("tiny-gpt2", seed=1, dtype=torch.float64)
    ad = get_adapter(model)
    A = SimpleNamespace(model=model, ad=ad, tok=tok, pad_id=tok.pad_token_id, cfg=SimpleNamespace(progress=False))
    rc = RepetitionConfig(max_new_tokens=10, int_temperature=0.0, int_top_k=0, int_gains=[0.0], penalties=[1.05, 2.0],
                          ngram_sizes=[2], min_repeated=2, max_period=2, batch_size=4)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the cat", "a dog sat", "one two")]
    base_toks = torch.tensor([[5, 6] * 5, [7] * 10, list(range(10, 20))])  # 2 loops of 3
    ref = [(prompts[0], list(range(20, 28))), (prompts[1], list(range(30, 36)))]
    heads = [(l, h) for l in range(ad.n_layers) for h in range(ad.n_heads)]
    res = intervention(A, rc, heads, ref, seed=0, n_boot=50, base=(prompts, base_toks))
    t = {r["arm"]: r for r in res["table"]}
    assert res["base_from_grid"] and res["n_prompts"] == 3
    assert t["base"]["loop_rate"] == pytest.approx(2 / 3) and t["base"]["ppl_cost"] == 0.0
    assert t["base"]["seq_rep_4"][0] == pytest.approx(np.mean([seq_rep_n(b.tolist(), 4) for b in base_toks]))
    assert set(res["arms"]) == {"head_gains", "penalty_matched", "penalty_budget", "no_repeat"}
    assert "head_gain=0" in t and res["reference_ppl"]["head_gain=0"] != pytest.approx(res["reference_ppl"]["base"])
    assert np.isinf(res["reference_ppl"]["no_repeat_ngram_size=2"]) or res["reference_ppl"]["no_repeat_ngram_size=2"] > 0
    for arm, r in t.items():
        assert 0 <= r["loop_rate"] <= 1 and r["loop_ci"][0] <= r["loop_rate"] <= r["loop_ci"][1], arm
        if arm != "base":
            assert r["loop_reduction"] == pytest.approx(1 - r["loop_rate"] / (2 / 3))
    # given prompts (int_loop_prone) and another length: every arm generated, on those prompts
    rc.int_max_new_tokens = 12
    res2 = intervention(A, rc, heads, ref, seed=0, n_boot=20, enc=prompts[:2])
    assert not res2["base_from_grid"] and res2["n_prompts"] == 2


def test_loop_prone_intervention_keys_checked():
    from analysis.loops import RepetitionConfig, check_rep
    from spindiff.config import ConfigError

    with pytest.raises(ConfigError, match="int_max_new_tokens"):
        check_rep(RepetitionConfig(int_max_new_tokens=4))
    with pytest.raises(ConfigError, match="int_loop_prone"):
        check_rep(RepetitionConfig(int_loop_prone=True, temperatures=[0.7]))
    check_rep(RepetitionConfig(int_loop_prone=True, int_max_new_tokens=384, int_temperature=0.7))


@pytest.mark.slow  # spawns two processes (~20-30 s)
def test_worker_pool_gives_the_in_process_continuations():
    """generate_recorded with a 2-process GenPool: the same tokens (greedy and sampled: each batch
    has its own seed) and the same recorded signals as in-process, also under head gains."""
    from omegaconf import OmegaConf

    from analysis.attractor import GenPool
    from spindiff.config import compose

    mcfg = OmegaConf.to_container(compose("analysis", ["model.name=tiny-llama", "model.dtype=float64"]).model)
    model, tok = build_tiny_model("tiny-llama", seed=mcfg["tiny_seed"], dtype=torch.float64)
    ad = get_adapter(model)
    texts = ["the cat sat", "a dog", "one two three four", "hello", "the end of it", "x y"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    temps, ks = [0.0, 1.0, 0.7, 0.0, 1.0, 0.4], [0, 0, 5, 0, 3, 0]
    args = (prompts, temps, ks, 8, tok.pad_token_id, 2, 5)
    gains = {(0, 1): 0.0, (1, 0): 0.5}
    ref = generate_recorded(model, ad, *args)
    ref_g = generate_recorded(model, ad, *args, record=False, gains=gains)
    with GenPool(mcfg, 2) as pool:
        got = generate_recorded(None, None, *args, pool=pool)
        got_g = generate_recorded(None, None, *args, record=False, gains=gains, pool=pool)
    assert torch.equal(ref["tokens"], got["tokens"]) and torch.equal(ref_g["tokens"], got_g["tokens"])
    assert not torch.equal(ref["tokens"], ref_g["tokens"])  # the gains act
    for k in ("field", "push", "entropy", "logp"):
        assert torch.allclose(ref[k], got[k], atol=1e-6), k


def test_answers_induction_verdict_follows_the_spearman_ci():
    """yes needs a strong rank agreement (CI above 0.5); a moderate one (SmolLM2: 0.34 [0.32, 0.35]) is partly."""
    from analysis.repetition import answers

    def res(lo, hi):
        nan = [float("nan")] * 3
        return {"phase": {}, "time_course": {"push": {"after_minus_before": [1.0, 0.5, 1.5]},
                                             "n_loops_with_4_pre_onset_steps": 3},
                "self_reinforcement": {"copy3_minus_copy1": nan},
                "constructed_reinforcement": {"last_minus_first_repeat": [0.4, 0.3, 0.5]},
                "heads": {"spearman": (lo + hi) / 2, "spearman_ci": [lo, hi], "top_overlap": 4,
                          "top_overlap_chance": 0.37, "top_overlap_p": 1.8e-4}}
    key = "attractor heads are induction heads"
    assert answers(res(0.32, 0.35))[key].startswith("partly")
    assert answers(res(0.6, 0.7))[key].startswith("yes")
    assert answers(res(-0.1, 0.1))[key].startswith("no")
