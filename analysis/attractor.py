"""Batched generation that records the attention field at every step (the repetition study).

:func:`generate_recorded` runs Hugging Face ``generate`` (KV cache, left-padded batches) with one
logits processor that gives every row its own temperature and top-k (:class:`RowSampler`), so a
whole temperature x top-k grid goes through the same batches. While it runs, a
:class:`FieldRecorder` reads the model's own forward passes (:mod:`spindiff.lm.hooks` points
``blocks.{l}.attn.z``, ``ln_final.in`` and ``logits``; it is also a logits processor, which
learns each emitted token from the next step's input ids), so the field signals cost no extra
forward pass. For step s (the forward whose logits choose generated token x_s):

    o_h      = z_h W_O[h]                                    (D,)  head h's output, last position
    N_s      = sum_h fn(o_h)                                 (D,)  the heads' summed field
    push_h,s = fn(o_h) . e(x_s)                              head h's direct logit push on x_s

with fn the final norm frozen at the step's residual (``ArchitectureAdapter.final_norm_scale``:
centring for LayerNorm, then the scale), e(v) the unembedding row of token v. push_h,s is
exactly the in_situ per-head logit attribution of :mod:`analysis.gaps` / ``ContextFieldProvider``
with the emitted token as the candidate (tested), and sum_h push_h,s = N_s . e(x_s).
Also recorded: the LM's own (T = 1) entropy, max-probability and log-probability of x_s.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.hooks import hooks
from spindiff.lm.hooks import record as record_points
from spindiff.lm.tokens import pad_left


class RowSampler(LogitsProcessor):
    """Per-row temperature and top-k: temps (B,) (0 = greedy: only the argmax stays), ks (B,)
    (0 = the whole vocabulary). Put last; ``generate`` then samples from the result."""

    def __init__(self, temps: Sequence[float], ks: Sequence[int]):
        self.t = torch.tensor([float(t) for t in temps])
        self.k = torch.tensor([int(k) for k in ks])

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t, k = self.t.to(scores.device), self.k.to(scores.device)
        greedy = t <= 0
        s = scores / torch.where(greedy, torch.ones_like(t), t)[:, None].to(scores.dtype)
        kk = torch.where(greedy, torch.ones_like(k), k)
        if bool((kk > 0).any()):
            kmax = int(kk.max())
            top = s.topk(min(kmax, s.shape[-1]), -1).values  # (B, kmax) descending
            kth = top.gather(-1, (kk.clamp(1, top.shape[-1]) - 1)[:, None])
            s = torch.where((kk[:, None] > 0) & (s < kth), torch.full_like(s, float("-inf")), s)
        return s


class RowSubset(LogitsProcessor):
    """Apply a Hugging Face logits processor to the rows in ``rows`` (B,) bool only (several
    decoding arms in one batch)."""

    def __init__(self, proc: LogitsProcessor, rows: Tensor):
        self.proc, self.rows = proc, rows.bool()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        r = self.rows.to(scores.device)
        if bool(r.any()):
            scores = scores.clone()
            scores[r] = self.proc(input_ids[r], scores[r])
        return scores


@dataclass
class Record:
    """Per-step field signals of a batch: S steps.

    field: (B, S, D) N_s;  push: (B, S, L*H) push_h,s on the emitted token (head index l*H + h);
    entropy, maxprob, logp: (B, S) of the LM's own next-token distribution (nats; logp of x_s).
    """

    field: Tensor
    push: Tensor
    entropy: Tensor
    maxprob: Tensor
    logp: Tensor


class FieldRecorder(LogitsProcessor):
    """Hook points and a logits processor that turn every forward pass of ``model`` into one step
    of field signals (module docstring). Put it in ``generate``'s logits processors and use
    :meth:`recording` as a context manager around ``generate``; :meth:`finish` with the last
    generated tokens returns the :class:`Record`."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter):
        self.model, self.ad = model, adapter
        ad = adapter
        with torch.no_grad():
            W = torch.stack([ad.frozen_weights(l).W_O for l in range(ad.n_layers)])  # (L, H, dh, D)
        self.W_O = W.reshape(-1, W.shape[-2], W.shape[-1])  # (LH, dh, D)
        self.W_U = ad.unembedding().detach()  # (V, D)
        self.steps: list[tuple[Tensor, ...]] = []
        # z, resid, field, logp of the step awaiting its token / of the forward just run
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._current: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _fn(self, v: Tensor, resid: Tensor) -> Tensor:
        """The frozen final norm applied to additive pieces v (..., D) at residual resid (B, D)."""
        scale, center = self.ad.final_norm_scale(resid)
        if center:
            v = v - v.mean(-1, keepdim=True)
        return v * (scale if v.dim() == 2 else scale[:, None, :])

    def _finish_step(self, tokens: Tensor) -> None:
        z, resid, field, logp = self._pending
        # fn(o) . e = o . fn*(e) with the adjoint fn*(e) = centre(scale * e); per head o = z W_O[h]
        scale, center = self.ad.final_norm_scale(resid)
        c = self.W_U[tokens].to(z.dtype) * scale  # (B, D)
        if center:
            c = c - c.mean(-1, keepdim=True)
        g = torch.einsum("kcd,bd->bkc", self.W_O.to(z.dtype), c)  # (B, LH, dh)
        push = (z * g).sum(-1)  # (B, LH)
        lp = logp.gather(-1, tokens[:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)
        self.steps.append((field.float(), push.float(), ent.float(), logp.max(-1).values.exp().float(), lp.float()))
        self._pending = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """The logits-processor side (put in ``generate``'s list): at step s+1 ``input_ids`` ends
        with x_s, which completes step s; scores pass through unchanged."""
        if self._pending is not None:
            self._finish_step(input_ids[:, -1])
        self._pending, self._current = self._current, None
        return scores

    def _logits(self, out: Tensor, acts: dict[str, Tensor]) -> None:
        L = self.ad.n_layers
        z = torch.cat([acts[f"blocks.{l}.attn.z"] for l in range(L)], 1)  # (B, LH, dh)
        resid = acts["ln_final.in"]  # (B, D)
        o = torch.einsum("bkc,kcd->bd", z, self.W_O.to(z.dtype))  # sum over heads of z_h W_O[h]
        field = self._fn(o, resid)
        logp = out[:, -1].detach().double().log_softmax(-1)
        self._current = (z, resid, field, logp)

    @contextlib.contextmanager
    def recording(self) -> Iterator["FieldRecorder"]:
        """Record while the block runs; the recorder must also be one of ``generate``'s logits
        processors (it learns each step's emitted token from the next step's ``input_ids``)."""
        with record_points(self.ad, ["blocks.*.attn.z", "ln_final.in"], last_only=True) as acts, \
                hooks(self.ad, {"logits": lambda out, p: self._logits(out, acts)}):
            yield self

    def finish(self, last_tokens: Tensor) -> Record:
        if self._pending is not None:
            self._finish_step(last_tokens)
        cols = list(zip(*self.steps))
        self.steps = []
        return Record(*(torch.stack(c, 1) for c in cols))


@torch.no_grad()
def generate_recorded(model: nn.Module, adapter: ArchitectureAdapter, prompts: Sequence[Sequence[int]],
                      temps: Sequence[float], ks: Sequence[int], max_new_tokens: int, pad_id: int,
                      batch_size: int = 64, seed: int = 0, record: bool = True,
                      extra: Sequence[tuple[LogitsProcessor, Sequence[bool]]] = (),
                      progress: Any = None) -> dict[str, Any]:
    """Continue every prompt (token ids) with its own temperature / top-k; EOS is suppressed so
    every continuation has ``max_new_tokens`` tokens. Rows are batched by prompt length.

    Args:
        extra: (processor, rows mask (N,)) pairs applied before the sampler (decoding arms).
    Returns:
        {"tokens": (N, S) int64 continuations, and with ``record`` the :class:`Record` fields
        stacked over rows: field (N, S, D), push (N, S, L*H), entropy, maxprob, logp (N, S)}.
    """
    N = len(prompts)
    order = sorted(range(N), key=lambda i: len(prompts[i]))
    toks = torch.empty(N, max_new_tokens, dtype=torch.long)
    rec: dict[str, Tensor] = {}
    extra_m = [(p, torch.as_tensor(list(m), dtype=torch.bool)) for p, m in extra]
    for bi, s in enumerate(range(0, N, batch_size)):
        idx = order[s:s + batch_size]
        ids, mask = pad_left([prompts[i] for i in idx], pad_id)
        procs = [RowSubset(p, m[idx]) for p, m in extra_m]
        procs.append(RowSampler([temps[i] for i in idx], [ks[i] for i in idx]))
        torch.manual_seed(seed * 100003 + bi)
        recorder = FieldRecorder(model, adapter)
        if record:
            procs.insert(0, recorder)
        ctx = recorder.recording() if record else contextlib.nullcontext()
        with ctx:
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 logits_processor=LogitsProcessorList(procs), pad_token_id=pad_id)
        gen = (out.sequences if hasattr(out, "sequences") else out)[:, ids.shape[1]:]
        toks[idx] = gen.cpu()
        if record:
            r = recorder.finish(gen[:, -1])
            for name in ("field", "push", "entropy", "maxprob", "logp"):
                v = getattr(r, name).cpu()
                if name not in rec:
                    rec[name] = torch.empty((N,) + tuple(v.shape[1:]), dtype=v.dtype)
                rec[name][idx] = v
        if progress is not None:
            progress(min(s + batch_size, N), N)
    return {"tokens": toks, **rec}
