"""Batched generation that records the attention field at every step (the repetition study).

:func:`generate_recorded` runs Hugging Face ``generate`` (KV cache, left-padded batches) with one
logits processor that gives every row its own temperature and top-k (:class:`RowSampler`), so a
whole temperature x top-k grid goes through the same batches. While it runs, a
:class:`FieldRecorder` reads the model's own forward passes (:mod:`spindiff.lm.hooks` points
``blocks.{l}.attn.z``, ``blocks.{l}.attn.out``, ``ln_final.in`` and ``logits``; it is also a
logits processor, which learns each emitted token from the next step's input ids), so the field
signals cost no extra forward pass (sum_h o_h is the output projections' outputs minus their
biases, as the model computed them). For step s (the forward whose logits choose generated token x_s):

    o_h      = z_h W_O[h]                                    (D,)  head h's output, last position
    N_s      = sum_h fn(o_h)                                 (D,)  the heads' summed field
    push_h,s = fn(o_h) . e(x_s)                              head h's direct logit push on x_s

with fn the final norm frozen at the step's residual (``ArchitectureAdapter.final_norm_scale``:
centring for LayerNorm, then the scale), e(v) the unembedding row of token v. push_h,s is
exactly the in_situ per-head logit attribution of :mod:`analysis.gaps` / ``ContextFieldProvider``
with the emitted token as the candidate (tested), and sum_h push_h,s = N_s . e(x_s).
Also recorded: the LM's own (T = 1) entropy, max-probability and log-probability of x_s (in the
logits' dtype). :class:`GenPool` runs the batches in worker processes (``repetition.workers``).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from spindiff.lm.adapter import ArchitectureAdapter
from spindiff.lm.hooks import hooks
from spindiff.lm.hooks import record as record_points
from spindiff.lm.interventions import HeadGains
from spindiff.lm.tokens import pad_left


class RowSampler(LogitsProcessor):
    """Per-row temperature and top-k: temps (B,) (0 = greedy: the argmax), ks (B,) (0 = the whole
    vocabulary). Put last and run ``generate`` greedily (``do_sample=False``): it draws each row's
    token itself (:func:`sample_rows`) and returns scores that are 0 at that token and -inf
    elsewhere: a draw from softmax(scores / T) over the top-k, ~8x cheaper on a CPU than
    ``torch.multinomial`` over a 49k vocabulary."""

    def __init__(self, temps: Sequence[float], ks: Sequence[int]):
        self.t = torch.tensor([float(t) for t in temps])
        self.k = torch.tensor([int(k) for k in ks])

    def filtered(self, scores: Tensor) -> Tensor:
        """scores / T with everything below each row's k-th largest at -inf (greedy rows: k = 1)."""
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

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        s = self.filtered(scores)
        choice = s.argmax(-1)
        samp = (self.t > 0).to(scores.device)
        if bool(samp.any()):
            choice[samp] = sample_rows(s[samp])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, choice[:, None], 0.0)
        return out


def sample_rows(s: Tensor, block: int = 256) -> Tensor:
    """One draw per row from softmax(s) (b, V) (-inf = excluded) by inverse CDF in two levels:
    a block of ``block`` tokens by the float64 cumulative sum of the block masses, then a token
    inside it; one uniform per row from the global generator. Returns (b,) token indices."""
    b, V = s.shape
    nb = -(-V // block)
    p = s.float().softmax(-1)
    if nb * block > V:
        p = torch.cat([p, p.new_zeros(b, nb * block - V)], -1)
    p = p.view(b, nb, block)
    mass = p.sum(-1).double()  # (b, nb); a float32 sum of 256 terms is exact to ~1e-6 relative
    cb = mass.cumsum(-1)
    u = torch.rand(b, 1, dtype=torch.float64).to(s.device) * cb[:, -1:]
    j = torch.searchsorted(cb, u, right=True)[:, 0].clamp(max=nb - 1)  # the block
    while True:  # a block of zero mass (u at a boundary, by rounding): step back to a non-empty one
        bad = (mass.gather(-1, j[:, None])[:, 0] <= 0) & (j > 0)
        if not bool(bad.any()):
            break
        j = torch.where(bad, j - 1, j)
    rows = torch.arange(b, device=s.device)
    inner = p[rows, j].double()  # (b, block)
    ci = inner.cumsum(-1)
    ui = (u[:, 0] - (cb[rows, j] - mass[rows, j])).clamp(min=0)[:, None].clamp(max=ci[:, -1:] * (1 - 1e-12))
    k = torch.searchsorted(ci, ui, right=True)[:, 0].clamp(max=block - 1)
    return (j * block + k).clamp(max=V - 1)


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
            fw = [ad.frozen_weights(l) for l in range(ad.n_layers)]
            W = torch.stack([w.W_O for w in fw])  # (L, H, dh, D)
            self.W_O = W.reshape(-1, W.shape[-2], W.shape[-1])  # (LH, dh, D)
            self.b_O = sum((w.b_O for w in fw if w.b_O is not None), torch.zeros(W.shape[-1], dtype=W.dtype))  # (D,)
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
        # sum over heads of z_h W_O[h]: the output projections' outputs (already computed) minus biases
        o = torch.stack([acts[f"blocks.{l}.attn.out"] for l in range(L)]).sum(0) - self.b_O.to(z.dtype)
        field = self._fn(o, resid)
        lg = out[:, -1].detach()
        logp = (lg if lg.dtype in (torch.float32, torch.float64) else lg.float()).log_softmax(-1)
        self._current = (z, resid, field, logp)

    @contextlib.contextmanager
    def recording(self) -> Iterator["FieldRecorder"]:
        """Record while the block runs; the recorder must also be one of ``generate``'s logits
        processors (it learns each step's emitted token from the next step's ``input_ids``)."""
        with record_points(self.ad, ["blocks.*.attn.z", "blocks.*.attn.out", "ln_final.in"], last_only=True) as acts, \
                hooks(self.ad, {"logits": lambda out, p: self._logits(out, acts)}):
            yield self

    def finish(self, last_tokens: Tensor) -> Record:
        if self._pending is not None:
            self._finish_step(last_tokens)
        cols = list(zip(*self.steps))
        self.steps = []
        return Record(*(torch.stack(c, 1) for c in cols))


def batch_plan(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Rows of each batch: sorted by prompt length, in an even number of equal batches of at most
    ``batch_size`` (so two workers finish together; at least two batches from 16 rows on);
    independent of the number of workers, so every row sees the same batch (and seed) with any
    ``workers``."""
    N = len(prompts)
    order = sorted(range(N), key=lambda i: len(prompts[i]))
    nb = -(-N // max(batch_size, 1))
    if N >= 16:
        nb = max(nb, 2)
    nb += nb % 2 if nb > 1 else 0
    size = -(-N // max(nb, 1))
    return [order[s:s + size] for s in range(0, N, size)]


@torch.no_grad()
def _generate_batch(model: nn.Module, adapter: ArchitectureAdapter, bi: int, prompts: Sequence[Sequence[int]],
                    temps: Sequence[float], ks: Sequence[int], max_new_tokens: int, pad_id: int, seed: int,
                    record: bool, extra: Sequence[tuple[LogitsProcessor, Tensor]],
                    gains: dict[tuple[int, int], float] | None) -> dict[str, Tensor]:
    """One batch (rows of :func:`batch_plan` number ``bi``): {"tokens": (B, S)} and with ``record``
    the :class:`Record` fields."""
    ids, mask = pad_left(list(prompts), pad_id)
    procs: list[LogitsProcessor] = [RowSubset(p, m) for p, m in extra]
    procs.append(RowSampler(temps, ks))
    torch.manual_seed(seed * 100003 + bi)
    recorder = FieldRecorder(model, adapter)
    if record:
        procs.insert(0, recorder)
    with contextlib.ExitStack() as stack:
        if record:
            stack.enter_context(recorder.recording())
        if gains:
            stack.enter_context(HeadGains(adapter, gains))
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList(procs),
                             pad_token_id=pad_id, temperature=None, top_k=None, top_p=None)
    gen = (out.sequences if hasattr(out, "sequences") else out)[:, ids.shape[1]:].cpu()
    res = {"tokens": gen}
    if record:
        r = recorder.finish(gen[:, -1])
        res.update({name: getattr(r, name).cpu() for name in ("field", "push", "entropy", "maxprob", "logp")})
    return res


@torch.no_grad()
def generate_recorded(model: nn.Module, adapter: ArchitectureAdapter, prompts: Sequence[Sequence[int]],
                      temps: Sequence[float], ks: Sequence[int], max_new_tokens: int, pad_id: int,
                      batch_size: int = 64, seed: int = 0, record: bool = True,
                      extra: Sequence[tuple[LogitsProcessor, Sequence[bool]]] = (),
                      progress: Any = None, gains: dict[tuple[int, int], float] | None = None,
                      pool: "GenPool | None" = None) -> dict[str, Any]:
    """Continue every prompt (token ids) with its own temperature / top-k; EOS is suppressed so
    every continuation has ``max_new_tokens`` tokens. Rows are batched by prompt length
    (:func:`batch_plan`); batch b draws from seed ``seed * 100003 + b``.

    Args:
        extra: (processor, rows mask (N,)) pairs applied before the sampler (decoding arms).
        gains: {(layer, head): gain} applied while generating (``HeadGains``).
        pool: a :class:`GenPool` whose worker processes generate the batches (same tokens as
            in-process, up to float noise); None: in this process with ``model``.
    Returns:
        {"tokens": (N, S) int64 continuations, and with ``record`` the :class:`Record` fields
        stacked over rows: field (N, S, D), push (N, S, L*H), entropy, maxprob, logp (N, S)}.
    """
    N = len(prompts)
    toks = torch.empty(N, max_new_tokens, dtype=torch.long)
    rec: dict[str, Tensor] = {}
    extra_m = [(p, torch.as_tensor(list(m), dtype=torch.bool)) for p, m in extra]
    plan = batch_plan(prompts, batch_size)
    jobs = [(bi, [prompts[i] for i in idx], [temps[i] for i in idx], [ks[i] for i in idx], max_new_tokens, pad_id,
             seed, record, [(p, m[idx]) for p, m in extra_m], gains) for bi, idx in enumerate(plan)]
    results = (pool.map(jobs) if pool is not None
               else ((job[0], _generate_batch(model, adapter, *job)) for job in jobs))
    done = 0
    for bi, r in results:
        idx = plan[bi]
        for name, v in r.items():
            if name == "tokens":
                toks[idx] = v
                continue
            if name not in rec:
                rec[name] = torch.empty((N,) + tuple(v.shape[1:]), dtype=v.dtype)
            rec[name][idx] = v
        done += len(idx)
        if progress is not None:
            progress(done, N)
    return {"tokens": toks, **rec}


# --------------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(model_cfg: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    from spindiff.lm.adapter import get_adapter
    from spindiff.lm.models import load_model
    lm = load_model(OmegaConf.create(model_cfg))
    _WORKER.update(model=lm.model, adapter=get_adapter(lm.model, lm.name))


def _worker_batch(job: tuple) -> tuple[int, dict[str, np.ndarray]]:
    r = _generate_batch(_WORKER["model"], _WORKER["adapter"], *job)
    return job[0], {k: v.numpy() for k, v in r.items()}  # numpy: pickled by value, no shared-memory handles


class GenPool:
    """``workers`` processes (spawned; ``threads`` torch threads each), each loading the model
    named by ``model_cfg`` (a ``model`` config section; give the name actually loaded, fallback
    off) once, that generate :func:`generate_recorded`'s batches. Use as a context manager."""

    def __init__(self, model_cfg: dict, workers: int, threads: int = 1):
        self.ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                      initargs=(model_cfg, threads))

    def map(self, jobs: Sequence[tuple]) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Results in completion order: (batch index, {name: tensor})."""
        futs = [self.ex.submit(_worker_batch, j) for j in jobs]
        for f in as_completed(futs):
            bi, r = f.result()
            yield bi, {k: torch.from_numpy(v) for k, v in r.items()}

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "GenPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
