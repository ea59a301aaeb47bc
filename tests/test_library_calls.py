"""Library calls instead of hand-written helpers, and no process-wide side effects: the ``ar``
sampler's warping is transformers' own warpers, its streamer a transformers ``BaseStreamer``, and
``generate`` draws from a forked RNG (reproducible from the caller's generator, global RNG untouched)."""
from __future__ import annotations

import torch

from spindiff.config import ModelConfig, compose
from spindiff.generation import GenerationSession, build_sampler

TINY = ["model.name=tiny-gpt2", "wandb.mode=disabled", "stream=false"]


def _ar(session, *extra):
    return build_sampler(compose("sample", TINY + ["sampler.name=ar", *extra]), session)


def test_ar_generate_is_seeded_by_its_generator_and_leaves_the_global_rng_alone():
    session = GenerationSession.load(ModelConfig(name="tiny-gpt2"))
    s = _ar(session)
    ids, mask = session.batch(session.encode(["A dog says", "The sky is"]))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = s.generate(ids, mask, 5, torch.Generator().manual_seed(7), stop_at_eos=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the process's RNG was not reseeded
    b = s.generate(ids, mask, 5, torch.Generator().manual_seed(7), stop_at_eos=False)
    c = s.generate(ids, mask, 5, torch.Generator().manual_seed(8), stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_ar_draws_use_the_warpers_generate_uses():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    from transformers.generation.streamers import BaseStreamer

    from spindiff.generation.ar import _TokenCallback

    session = GenerationSession.load(ModelConfig(name="tiny-gpt2"))
    s = _ar(session, "sampler.temperature=0.7", "sampler.top_p=0.5")
    kinds = [type(w) for w in s.warpers()]
    assert kinds == [TemperatureLogitsWarper, TopPLogitsWarper]
    out = s.forward(*session.batch(session.encode(["A dog says"])))
    draws = s.draw_from(out, 400, torch.Generator().manual_seed(0))
    kept = torch.isfinite(s.warpers()(None, out.logits.float()))[0]
    assert kept.sum() < kept.numel() and kept[draws[0]].all()  # every draw inside the nucleus
    greedy = _ar(session, "sampler.temperature=0").draw_from(out, 5, torch.Generator())
    assert (greedy == out.logits.argmax(-1, keepdim=True)).all()
    assert issubclass(_TokenCallback, BaseStreamer)
    seen = []
    gb = s.generate(*session.batch(session.encode(["A cat says"])), 4, torch.Generator().manual_seed(1),
                    stop_at_eos=False, on_token=lambda i, t: seen.append(int(t)))
    assert seen == gb.tokens[0].tolist()  # streamed tokens are the generated ones
