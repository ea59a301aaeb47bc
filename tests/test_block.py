"""The ``block`` sampler's exactness: the acceptance rule on a toy with known p and r, and the joint
law of 3 generated tokens against the LM's own (float64, a tiny vocabulary, p enumerated exactly),
for a good and for deliberately bad drafters; the KV-cache rollback against a plain forward."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from spindiff.generation import block as block_mod
from spindiff.generation.block import BlockLM, block_generate
from spindiff.generation.drafters import DraftContext, FixedDrafter
from spindiff.generation.verify import residual, verify
from spindiff.lm.adapter import get_adapter
from spindiff.lm.field import ContextFieldProvider


# --------------------------------------------------------------------------- the acceptance rule
def test_residual_is_normalised_positive_part():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    r = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    res = residual(p, r)
    assert torch.allclose(res, torch.tensor([[0.4, 0.0, 0.1, 0.0]], dtype=torch.float64) / 0.5)


def test_acceptance_rule_with_given_uniforms():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)  # (1, K + 1 = 2, V = 2)
    r = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)
    d = torch.tensor([[1]])  # p/r = 0.5/0.75 = 2/3
    assert int(verify(p, r, d, uniforms=torch.tensor([[0.66]], dtype=torch.float64)).n_accepted) == 1
    v = verify(p, r, d, generator=torch.Generator().manual_seed(0), uniforms=torch.tensor([[0.67]], dtype=torch.float64))
    assert int(v.n_accepted) == 0 and int(v.next_token) == 0  # residual max(0, p - r) = (0.25, 0) -> token 0
    d0 = torch.tensor([[0]])  # p/r = 2 >= 1: always accepted, then the bonus is drawn from p_2
    assert int(verify(p, r, d0, uniforms=torch.tensor([[0.999]], dtype=torch.float64)).n_accepted) == 1


def test_acceptance_rule_toy_distribution():
    """One draft from r, verified against p: emitted token ~ p, P(accept) = sum min(p, r)."""
    g = torch.Generator().manual_seed(1)
    V, n = 5, 200_000
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    r1 = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5], dtype=torch.float64)  # a bad drafter with mass where p = 0
    p = torch.stack([p1, torch.full((V,), 1.0 / V, dtype=torch.float64)])[None].expand(n, -1, -1)
    r = r1[None, None].expand(n, 1, -1)
    d = torch.multinomial(r1, n, replacement=True, generator=g)[:, None]
    v = verify(p, r, d, generator=g)
    first = torch.where(v.n_accepted == 1, d[:, 0], v.next_token)
    counts = np.bincount(first.numpy(), minlength=V)
    assert counts[4] == 0  # never emits a token of probability 0
    assert stats.chisquare(counts[:4], p1[:4].numpy() * n).pvalue > 1e-3
    acc = float(v.n_accepted.double().mean())
    assert abs(acc - float(torch.minimum(p1, r1).sum())) < 4 * (0.3 / n) ** 0.5


# --------------------------------------------------------------------------- joint law of generated tokens
def _tiny_lm(vocab: int = 5, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, initializer_range=0.6)
        return LlamaForCausalLM(cfg).to(torch.float64).eval()


def _exact_joint(model, prompt: list[int], n_new: int, vocab: int) -> np.ndarray:
    """p(x_1 .. x_n | prompt) for every sequence, from ONE forward over all V^n continuations."""
    seqs = torch.tensor([prompt + list(c) for c in itertools.product(range(vocab), repeat=n_new)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seqs).logits, -1)  # (V^n, T, V)
    L = len(prompt)
    lp = logp[:, L - 1:L - 1 + n_new].gather(2, seqs[:, L:, None]).squeeze(-1).sum(-1)
    return lp.exp().numpy()


class _HiddenDrafter:
    """A context-dependent drafter: softmax of a fixed random map of the hidden state and the pending
    token (a 'trained-like' drafter with full support)."""

    name, needs_field = "hidden", False

    def __init__(self, dim: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(4, dim, vocab, generator=g, dtype=torch.float64)
        self.E = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)

    def draft(self, ctx: DraftContext, k: int, generator):
        r = torch.softmax(torch.einsum("bd,kdv->bkv", ctx.hidden, self.A[:k]) + self.E[ctx.token][:, None], -1)
        d = torch.multinomial(r.reshape(-1, r.shape[-1]), 1, generator=generator).view(r.shape[:2])
        return d, r


def _joint_counts(model, drafter, prompt, k, n_rows, vocab, seed, n_new=3):
    lm = BlockLM(model, get_adapter(model), window=64)
    ids = torch.tensor([prompt] * n_rows)
    run = block_generate(lm, drafter, ids, torch.ones_like(ids), k, n_new, torch.Generator().manual_seed(seed))
    assert run.tokens.shape == (n_rows, n_new) and bool(run.valid.all())
    code = (run.tokens * torch.tensor([vocab ** (n_new - 1 - i) for i in range(n_new)])).sum(1)
    return np.bincount(code.numpy(), minlength=vocab ** n_new), run


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    keep = probs * n >= 5  # pool the rare cells (chi-square validity)
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


V = 5
PROMPT = [1, 3]
N_ROWS = 100_000


@pytest.fixture(scope="module")
def tiny_lm():
    return _tiny_lm(V)


@pytest.fixture(scope="module")
def exact(tiny_lm):
    return _exact_joint(tiny_lm, PROMPT, 3, V)


@pytest.mark.parametrize("k,name", [(2, "hidden"), pytest.param(3, "bad_peaked", marks=pytest.mark.slow),
                                    (1, "bad_zero_mass"), pytest.param(2, "bad_uniform", marks=pytest.mark.slow)])
def test_joint_law_of_three_tokens_is_the_lm(tiny_lm, exact, k, name, one_thread):
    if name == "hidden":
        drafter = _HiddenDrafter(tiny_lm.config.hidden_size, V)
    elif name == "bad_peaked":  # almost always drafts token 4, the LM's least likely
        drafter = FixedDrafter(torch.tensor([0.01, 0.01, 0.01, 0.01, 0.96], dtype=torch.float64))
    elif name == "bad_zero_mass":  # no mass on tokens 0, 1: those can only come from the residual
        drafter = FixedDrafter(torch.tensor([0.0, 0.0, 0.5, 0.3, 0.2], dtype=torch.float64))
    else:
        drafter = FixedDrafter(torch.full((V,), 1.0 / V, dtype=torch.float64))
    counts, run = _joint_counts(tiny_lm, drafter, PROMPT, k, N_ROWS, V, seed=k)
    assert counts.sum() == N_ROWS
    assert _chi2_pvalue(counts, exact) > 1e-3
    assert run.forwards <= 3  # prefill + at most 2 verifications for 2 more tokens
    assert int(run.accepted.sum()) > 0


def test_joint_law_test_detects_a_wrong_rule(tiny_lm, exact, monkeypatch, one_thread):
    """The same check rejects speculative sampling with the acceptance rule removed (accept every
    draft): the chi-square test is not one that cannot fail."""
    def accept_all(p, r, drafts, generator=None, uniforms=None):
        return verify(p, r, drafts, generator, uniforms=torch.zeros(drafts.shape, dtype=p.dtype))

    monkeypatch.setattr(block_mod, "verify", accept_all)
    counts, _ = _joint_counts(tiny_lm, FixedDrafter(torch.full((V,), 1.0 / V, dtype=torch.float64)), PROMPT, 2,
                              20_000, V, seed=0)
    assert _chi2_pvalue(counts, exact) < 1e-6


# --------------------------------------------------------------------------- rollback and ragged rows
def test_rollback_with_holes_matches_a_plain_forward(tiny_gpt2, one_thread):
    """Ragged acceptance over a left-padded batch: every emitted token's log p from the cached,
    rolled-back forwards equals the one of a plain forward over prompt + continuation; the field
    of the last accepted position equals the provider's."""
    model, _ = tiny_gpt2
    prov = ContextFieldProvider(model, "all")
    lm = BlockLM(model, get_adapter(model), prov, with_field=True, window=128)
    Vt = model.config.vocab_size
    ids = torch.tensor([[3, 5, 6, 7], [0, 0, 8, 9], [0, 4, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    drafter = FixedDrafter(r_fn=lambda j: torch.softmax(torch.randn(Vt, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(j)), -1))
    run = block_generate(lm, drafter, ids, mask, 3, 12, torch.Generator().manual_seed(3))
    assert int(run.accepted.sum()) > 0 and run.forwards < 12
    seqs = torch.cat([ids, run.tokens], 1)
    m2 = torch.cat([mask, torch.ones_like(run.tokens)], 1)
    with torch.no_grad():
        lg = model(input_ids=seqs, attention_mask=m2, position_ids=(m2.cumsum(-1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(lg, -1)[:, ids.shape[1] - 1:-1].gather(2, run.tokens[:, :, None]).squeeze(-1)
    assert torch.allclose(lp.float(), run.diag["lm_logprob"], atol=1e-5)
    # the field read at a block position equals the provider's on the same prefix
    state, _, _, f0 = lm.prefill(ids, mask)
    logits, _, fs = lm.extend(state, run.tokens[:, :3])
    ref = prov(torch.cat([ids, run.tokens[:, :2]], 1), torch.cat([mask, torch.ones(3, 2, dtype=mask.dtype)], 1))
    assert torch.allclose(fs[:, 1], ref.field, atol=1e-8)
    assert torch.allclose(f0, prov(ids, mask).field, atol=1e-8)


def test_eos_and_max_tokens(tiny_gpt2, one_thread):
    model, tok = tiny_gpt2
    lm = BlockLM(model, get_adapter(model), window=128)
    Vt = model.config.vocab_size
    eos = tok.eos_token_id
    r = torch.zeros(Vt, dtype=torch.float64)
    r[eos] = 1.0  # drafts EOS every time: accepted with probability p(EOS)
    ids = torch.tensor([[3, 5, 6, 7]] * 64)
    run = block_generate(lm, FixedDrafter(r), ids, torch.ones_like(ids), 4, 9, torch.Generator().manual_seed(0),
                         eos_id=eos, pad_id=eos)
    assert run.tokens.shape[1] <= 9
    for b in range(64):
        toks = run.tokens[b][run.valid[b]].tolist()
        assert 1 <= len(toks) <= 9
        assert eos not in toks[:-1]
        assert toks[-1] == eos or len(toks) == 9


# --------------------------------------------------------------------------- continuation-level excess
def test_token_excess_is_zero_for_block_sampling_and_positive_when_greedy(tiny_gpt2, one_thread):
    """spindiff.evaluation's continuation metric: log p(x_t | prefix) + H(p) over every generated token
    has mean ~0 for block sampling at T = 1 (later block positions included) and > 0 for greedy."""
    from spindiff.evaluation.evaluate import excess_metrics, token_excess

    model, tok = tiny_gpt2
    lm = BlockLM(model, get_adapter(model), window=128)
    Vt = model.config.vocab_size
    drafter = FixedDrafter(torch.full((Vt,), 1.0 / Vt, dtype=torch.float64))
    prompt = [3, 5, 6, 7]
    ids = torch.tensor([prompt] * 300)
    run = block_generate(lm, drafter, ids, torch.ones_like(ids), 3, 6, torch.Generator().manual_seed(0))
    conts = [run.tokens[b].tolist() for b in range(300)]
    per_tok = token_excess(model, [prompt] * 300, conts, pad_id=0, batch_size=100)
    assert all(len(x) == 6 for x in per_tok)
    m = excess_metrics(per_tok)
    assert abs(m["gen/excess"]) < 3 * m["gen/excess_ci"] and m["gen/excess_ci"] < 0.3
    greedy = block_generate(lm, drafter, ids[:20], torch.ones_like(ids[:20]), 3, 6, None, temperature=0.0)
    g = excess_metrics(token_excess(model, [prompt] * 20, [r.tolist() for r in greedy.tokens], pad_id=0))
    assert g["gen/excess"] > 1.0  # the argmax is far above E[log p] in a random model
    # the rescoring agrees with the sampler's own record of log p
    lp = torch.tensor([per_tok[b][t] for b in range(5) for t in range(6)])
    assert torch.isfinite(lp).all()


def _random_heads(tiny_lm, seed: int):
    """Draft heads with large random weights (3 offsets, rank-2 couplings, float64) and the unit token
    table of ``tiny_lm``."""
    from spindiff.score.draft import DraftHeads

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = DraftHeads(tiny_lm.config.hidden_size, V, block=3, features="hidden", rank=2).double()
        for prm in heads.parameters():
            torch.nn.init.normal_(prm, std=0.5)
    W = tiny_lm.get_output_embeddings().weight.detach()
    return heads, W / W.norm(dim=-1, keepdim=True)


@pytest.mark.slow  # ~10 s idle, ~40 s on the loaded 2-core machine
@pytest.mark.parametrize("coupling", ["lowrank", "qk"])
def test_joint_law_with_a_coupled_potts_drafter(tiny_lm, exact, coupling, one_thread):
    """Drafter (b): positions drawn one after another from their Potts conditionals (random heads and
    couplings): the output is still exactly the LM's."""
    from types import SimpleNamespace

    from spindiff.generation.drafters import PottsDrafter

    heads, table = _random_heads(tiny_lm, 5)
    drafter = PottsDrafter(heads, table, 1.0, coupling, SimpleNamespace(adapter=get_adapter(tiny_lm)), candidates=3)
    counts, run = _joint_counts(tiny_lm, drafter, PROMPT, 2, N_ROWS, V, seed=11)
    assert _chi2_pvalue(counts, exact) > 1e-3 and int(run.accepted.sum()) > 0


@pytest.mark.slow
def test_joint_law_with_the_spin_drafter(tiny_lm, exact, one_thread):
    """Drafter (c): K spins relaxed jointly by the reverse SDE with the learned coupling in the drift,
    drafts read from their posteriors at the exit: still exactly the LM's law."""
    from spindiff.generation.drafters import SpinDrafter

    heads, table = _random_heads(tiny_lm, 6)
    drafter = SpinDrafter(heads, table, 1.0, steps=4, candidates=4)
    counts, run = _joint_counts(tiny_lm, drafter, PROMPT, 2, N_ROWS, V, seed=12)
    assert _chi2_pvalue(counts, exact) > 1e-3 and int(run.accepted.sum()) > 0


# --------------------------------------------------------------------------- sampling, draft vocabulary
def test_sample_categorical_is_the_distribution():
    """The two-level float64 inverse CDF draws each token with its probability (chi-square), never a
    zero-probability one, across block boundaries and a padded last block."""
    from spindiff.generation.verify import sample_categorical

    g = torch.Generator().manual_seed(0)
    p = torch.rand(11, generator=g, dtype=torch.float64)
    p[[0, 4, 5, 10]] = 0.0  # zeros at a block start, inside, at a block end (block = 3) and last
    n = 200_000
    x = sample_categorical(p[None].expand(n, -1), g, block=3)
    counts = np.bincount(x.numpy(), minlength=11)
    assert counts[[0, 4, 5, 10]].sum() == 0
    nz = (p > 0).numpy()
    assert stats.chisquare(counts[nz], (p / p.sum()).numpy()[nz] * n).pvalue > 1e-3
    # float32 rows of a realistic size (unnormalised): the mean of the draws matches
    q = torch.softmax(torch.randn(3, 1000, generator=g), -1) * 7.0
    draws = sample_categorical(q[:, None].expand(3, 20_000, 1000), g)
    assert draws.shape == (3, 20_000)
    mean = (q / q.sum(-1, keepdim=True) * torch.arange(1000)).sum(-1)
    assert torch.allclose(draws.double().mean(1), mean.double(), rtol=0.03)


def test_draft_vocab_restricts_drafts_and_keeps_the_joint_law(tiny_lm, exact, one_thread):
    """Heads with an MLP term drafting from a 3-token vocabulary (the heads' most frequent under a
    ranking): drafts stay in the set, r is 0 outside it, and the output is still exactly the LM's."""
    from spindiff.generation.drafters import DraftVocab, HeadsDrafter
    from spindiff.score.draft import DraftHeads

    with torch.random.fork_rng():
        torch.manual_seed(3)
        heads = DraftHeads(tiny_lm.config.hidden_size, V, block=3, features="hidden", ranked=True, hidden=8).double()
        for name, prm in heads.named_parameters():
            torch.nn.init.normal_(prm, std=0.5)
    # a ranking from soft targets: token 2 most frequent, then 4, then 0
    ids = torch.tensor([[2, 4], [2, 0], [4, 2]])
    logp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.1], [0.4, 0.3]], dtype=torch.float64))
    mass = heads.set_vocab_rank(ids, logp)
    assert heads.vocab_rank[:3].tolist() == [2, 4, 0] and abs(float(mass.sum()) - 2.2) < 1e-12
    assert heads.draft_vocab(3).tolist() == [0, 2, 4] and heads.draft_vocab(0) is None
    W = tiny_lm.get_output_embeddings().weight.detach()
    drafter = HeadsDrafter(heads, W / W.norm(dim=-1, keepdim=True), 1.0, vocab=3)
    assert drafter.vocab.size == 3 and isinstance(drafter.vocab, DraftVocab)
    ctx = DraftContext(torch.randn(50, tiny_lm.config.hidden_size, dtype=torch.float64), None,
                       torch.randint(0, V, (50,)))
    d, r = drafter.draft(ctx, 3, torch.Generator().manual_seed(0))
    assert set(d.unique().tolist()) <= {0, 2, 4} and float(r[..., [1, 3]].abs().sum()) == 0.0
    assert torch.allclose(r.sum(-1), torch.ones(50, 3, dtype=torch.float64))
    counts, run = _joint_counts(tiny_lm, drafter, PROMPT, 2, N_ROWS, V, seed=21)
    assert _chi2_pvalue(counts, exact) > 1e-3 and int(run.accepted.sum()) > 0


# --------------------------------------------------------------------------- continuous batching
PROMPT_LONG = [2, 0, 4, 1, 1, 3, 0, 2]  # longer than the running cache when it is admitted


def test_joint_law_with_continuous_batching(tiny_lm, exact, one_thread):
    """Refill and eviction active (100000 prompts through 20000 rows; short prompts first, then
    long and short ones alternating, so admitted prompts are both shorter and longer than the
    running cache): the joint law of 3 tokens is the LM's for each prompt, in the prompts' order."""
    exact_long = _exact_joint(tiny_lm, PROMPT_LONG, 3, V)
    seqs = [PROMPT] * 20_000 + [PROMPT_LONG, PROMPT] * 40_000
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[0] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    lm = BlockLM(tiny_lm, get_adapter(tiny_lm), window=64)
    run = block_generate(lm, _HiddenDrafter(tiny_lm.config.hidden_size, V), ids, mask, 2, 3,
                         torch.Generator().manual_seed(31), batch_size=20_000)
    assert run.tokens.shape == (len(seqs), 3) and bool(run.valid.all())
    assert run.stats["prefills"] > 2 and run.stats["rows_per_forward"] <= 20_000  # refills happened
    code = (run.tokens * torch.tensor([V ** 2, V, 1])).sum(1).numpy()
    is_long = np.array([s is PROMPT_LONG for s in seqs])
    for sel, probs in ((~is_long, exact), (is_long, exact_long)):
        counts = np.bincount(code[sel], minlength=V ** 3)
        assert _chi2_pvalue(counts, probs) > 1e-3
    assert int(run.accepted.sum()) > 0


def test_refilled_rows_match_a_plain_forward(tiny_gpt2, one_thread):
    """Continuous batching on ragged prompts (7 prompts through 2 rows, lengths 1 to 9, K = 3): every
    emitted token's log p from the cached, rolled-back, evicted and spliced forwards equals the one of
    a plain forward over that prompt + its continuation, for every prompt (refilled rows included);
    the prompts' order is kept."""
    model, _ = tiny_gpt2
    lm = BlockLM(model, get_adapter(model), window=128)
    Vt = model.config.vocab_size
    seqs = [[3, 5, 6, 7], [8, 9], [4], [1, 2, 3, 4, 5, 6, 7, 8, 9], [2, 2], [7, 6, 5, 4, 3], [9, 9, 9]]
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[0] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    drafter = FixedDrafter(r_fn=lambda j: torch.softmax(torch.randn(Vt, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(j)), -1))
    n_new = 10
    run = block_generate(lm, drafter, ids, mask, 3, n_new, torch.Generator().manual_seed(5), batch_size=2)
    assert run.tokens.shape == (len(seqs), n_new) and bool(run.valid.all())
    assert run.stats["prefills"] == 4 and int(run.accepted.sum()) > 0  # batches of 2 prefilled ahead: 2 + 2 + 2 + 1
    for b, s in enumerate(seqs):
        seq = torch.tensor([s + run.tokens[b].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq).logits, -1)[0, len(s) - 1:-1]
        ref = lp.gather(1, run.tokens[b][:, None]).squeeze(1)
        assert torch.allclose(ref.float(), run.diag["lm_logprob"][b], atol=1e-5), b
    # a static batch (no refill, no eviction) of the first two prompts: the same machinery, same law
    static = block_generate(lm, drafter, ids[:2], mask[:2], 3, n_new, torch.Generator().manual_seed(5), evict=False)
    assert static.tokens.shape == (2, n_new) and static.stats["prefills"] == 1


@pytest.mark.parametrize("n_new", [1, 5])
def test_continuous_batching_with_eos(tiny_gpt2, one_thread, n_new):
    """Rows that stop at an EOS (some at their free first token, n_new = 1: every prompt is done
    before it gets a slot) leave and their slots take the next prompts; every prompt gets its tokens."""
    model, tok = tiny_gpt2
    lm = BlockLM(model, get_adapter(model), window=128)
    eos = tok.eos_token_id
    bias = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    bias[eos] = 4.0  # EOS is likely at every position
    r = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    r[eos] = 1.0
    ids = torch.tensor([[3, 5, 6, 7], [0, 0, 8, 9]] * 20)
    mask = (ids > 0).long()
    run = block_generate(lm, FixedDrafter(r), ids, mask, 2, n_new, torch.Generator().manual_seed(0), eos_id=eos,
                         pad_id=eos, logit_bias=bias, batch_size=6)
    lens = run.valid.sum(1)
    assert run.tokens.shape[0] == 40 and bool((lens >= 1).all()) and bool((lens <= n_new).all())
    for b in range(40):
        toks = run.tokens[b][run.valid[b]].tolist()
        assert eos not in toks[:-1] and (toks[-1] == eos or len(toks) == n_new)
    assert run.stats["prefills"] >= 2
