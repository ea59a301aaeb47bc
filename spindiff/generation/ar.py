"""The ``ar`` sampler: the LM's own sampling through ``model.generate``.

Temperature and nucleus filtering are transformers' own logits warpers (the ones ``generate``
applies), so ``draw_from`` and ``generate`` sample the same distribution; ``generate`` draws from
a forked global RNG seeded from the caller's generator (the process's RNG is left as it was);
streaming goes through a transformers ``BaseStreamer``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from spindiff.lm.field import FieldOutput
from spindiff.generation.base import Sampler, _fmt, register_sampler
from spindiff.generation.session import DIAG_KEYS, GenerationBatch, SampleError


@register_sampler("ar")
class ARSampler(Sampler):
    """The LM's own sampling through ``model.generate`` (temperature, top-p; temperature 0 = greedy).

    With a steering field (``steer.*``, prior form) the logits are tilted by g B . e_v before the
    warpers (a LogitsProcessor; spindiff.generation.steering)."""

    steering_modes = ("prior",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.temperature < 0 or not math.isfinite(cfg.temperature):
            raise SampleError(f"sampler.temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < cfg.top_p <= 1:
            raise SampleError(f"sampler.top_p={cfg.top_p}: must be in (0, 1]")

    @property
    def label(self) -> str:
        if self.cfg.temperature <= 0:
            return "ar(greedy)"
        return f"ar(T={_fmt(float(self.cfg.temperature))},top_p={_fmt(float(self.cfg.top_p))})"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "temperature": float(self.cfg.temperature), "top_p": float(self.cfg.top_p)}

    @torch.no_grad()
    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator) -> Tensor:
        logits = out.logits.float()
        if self.steering is not None:
            logits = logits + self.steering.logit_bias(self.session.token_table).float()  # (V,) tilt
        if float(self.cfg.temperature) <= 0:  # greedy: every draw is the argmax
            return logits.argmax(-1, keepdim=True).expand(-1, n).contiguous()  # (B, n)
        logits = self.warpers()(None, logits)  # (B, V): what generate samples from
        return torch.multinomial(torch.softmax(logits, -1), n, replacement=True, generator=generator)  # (B, n)

    def warpers(self) -> LogitsProcessorList:
        """transformers' temperature and top-p warpers for these settings (sampling; T > 0)."""
        procs: list[Any] = []
        if float(self.cfg.temperature) != 1.0:
            procs.append(TemperatureLogitsWarper(float(self.cfg.temperature)))
        if float(self.cfg.top_p) < 1.0:
            procs.append(TopPLogitsWarper(float(self.cfg.top_p)))
        return LogitsProcessorList(procs)

    @torch.no_grad()
    def generate(self, ids, mask, max_new_tokens, generator, stop_at_eos=True, on_token=None):
        sess = self.session
        B = ids.shape[0]
        greedy = float(self.cfg.temperature) <= 0
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # generate's draws follow our generator
        kw: dict[str, Any] = dict(do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=sess.pad_id,
                                  return_dict_in_generate=True, output_logits=True, top_k=0)
        if not greedy:
            kw.update(temperature=float(self.cfg.temperature), top_p=float(self.cfg.top_p))
        else:
            kw.update(temperature=None, top_p=None)
        if stop_at_eos:
            kw["eos_token_id"] = sess.eos_id
        else:
            kw.update(eos_token_id=None, min_new_tokens=max_new_tokens)
        if on_token is not None and B == 1:
            kw["streamer"] = _TokenCallback(on_token)
        if self.steering is not None:  # weighted decoding: logits + g B.e_v (output_logits stay the LM's own)
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList([self.steering.processor(sess.token_table)])
        t0 = time.perf_counter()
        # generate samples from the global RNG: fork it (restored afterwards) and seed the fork
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
            torch.manual_seed(seed)
            res = sess.model.generate(input_ids=ids, attention_mask=mask, **kw)
        seconds = time.perf_counter() - t0
        new = res.sequences[:, ids.shape[1]:].cpu()  # (B, T)
        T = new.shape[1]
        valid = torch.ones_like(new, dtype=torch.bool)
        stop = ["max_tokens"] * B
        if stop_at_eos and sess.eos_id is not None:
            for b in range(B):
                hits = (new[b] == sess.eos_id).nonzero()
                if len(hits):
                    valid[b, int(hits[0]) + 1:] = False
                    stop[b] = "eos"
        diag = {k: torch.full((B, T), float("nan")) for k in DIAG_KEYS}
        if res.logits:
            logp = torch.stack([torch.log_softmax(l.float(), -1).cpu() for l in res.logits], 1)  # (B, T, V)
            lp = logp.gather(2, new[:, :, None]).squeeze(-1)
            diag["lm_logprob"] = torch.where(valid, lp, torch.tensor(float("nan")))
        return GenerationBatch(new, valid, diag, seconds, stop, 0)


class _TokenCallback(BaseStreamer):
    """``generate``'s streamer interface forwarding each new token to ``on_token(i, ids (1,))``
    (the samplers' common per-token callback)."""

    def __init__(self, on_token: Callable[[int, Tensor], None]) -> None:
        self.on_token, self.i, self.prompt_seen = on_token, 0, False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.on_token(self.i, value.reshape(-1)[:1])
        self.i += 1

    def end(self) -> None:
        pass
