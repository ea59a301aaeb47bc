"""The ``block`` sampler: K tokens drafted at once and verified by ONE cached LM forward; exactly
the LM's distribution, fewer LM forwards than tokens.

Per round, for every row (B rows at once):

1. the pending token z (an exact draw from the LM: the prompt's last forward, or the previous
   round's verification) and the drafter's K drafts x_1 .. x_K (:mod:`spindiff.generation.drafters`;
   drafted from the last accepted position's hidden state / field and z);
2. one forward over [z, x_1, .., x_K] through the KV cache gives p(. | prefix, z, x_<k) for
   k = 1 .. K + 1;
3. :func:`spindiff.generation.verify.verify` accepts x_1 .. x_n (n per row) and draws the next
   pending token from the residual max(0, p - r) (or from p when all K were accepted);
4. KV-cache rollback: the rejected positions are removed. Rows accept different n, so the cache
   keeps per-row lengths with attention-mask HOLES: a row's rejected positions stay in the cache
   with mask 0 (never attended again) and every row carries explicit position_ids (its own count
   of kept tokens), so every round feeds exactly K + 1 tokens to every row, nothing is re-fed,
   and the positions rejected by every row are cropped off the cache (``DynamicCache.crop``); at
   batch 1 that is the whole rollback.

Scheduling (:func:`block_generate` with ``batch_size`` < the number of prompts): continuous
batching. A finished row leaves the batch and its slot takes the next waiting prompt (prefilled
``batch_size`` at a time ahead of need; its KV spliced into the row with its own mask and position
ids, :meth:`BlockLM.splice`), so the forwards follow the mean row, not the slowest.

Tokens per LM forward = n + 1 per row. Per-token diagnostics (samples.jsonl): ``block_offset``
(0 = the prompt's free draw; k = 1 .. K drafted position; K + 1 = bonus), ``accepted`` (1 an
accepted draft, 0 a residual draw after a rejection, NaN otherwise), ``draft_r`` = r_k(x),
``lm_p`` = p(x) (the sampled distribution), ``lm_logprob`` (log p at T = 1).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field as _field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spindiff.generation.base import Sampler, _fmt, register_sampler
from spindiff.generation.drafters import DRAFTERS, DraftContext, Drafter
from spindiff.generation.session import DIAG_KEYS, GenerationBatch, SampleError
from spindiff.generation.verify import sample_categorical, target_probs, verify
from spindiff.lm.field import FieldOutput
from spindiff.lm.hooks import record


BLOCK_DIAG = ("block_offset", "accepted", "draft_r", "lm_p")


# --------------------------------------------------------------------------- the LM with a rollback cache
@dataclass
class BlockState:
    """The KV cache and per-row bookkeeping of a batch under generation.

    mask: (B, C) attention mask over the C cached positions (0 = left padding or a rejected draft).
    next_pos: (B,) position id of the next fed token (= kept tokens of the row).
    """

    cache: Any
    mask: Tensor
    next_pos: Tensor
    forwards: int = 0


class BlockLM:
    """One causal LM, fed blocks through a KV cache with per-row rollback.

    ``provider`` (a :class:`spindiff.lm.field.ContextFieldProvider`) supplies the context field of
    every fed position when ``with_field`` (drafters that read N)."""

    def __init__(self, model: Any, adapter: Any, provider: Any = None, with_field: bool = False,
                 window: int = 0) -> None:
        self.model, self.adapter, self.provider = model, adapter, provider
        self.with_field = bool(with_field and provider is not None)
        self.window = int(window)

    def _run(self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, last_only: bool):
        ad, prov = self.adapter, self.provider
        if self.window:
            pos = pos.clamp(max=self.window - 1)  # only positions past max_new_tokens (discarded) can reach it
        kw = {"logits_to_keep": 1} if last_only else {}
        with contextlib.ExitStack() as st:
            # the residual entering the final norm and its output (the hidden state), and the heads' z
            acts = st.enter_context(record(ad, ["ln_final.in", "ln_final.out"]))
            zs = st.enter_context(ad.capture_z(prov.layers)) if self.with_field else None
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, **kw)
        sl = slice(-1, None) if last_only else slice(None)
        grab = {"x": acts["ln_final.in"][:, sl], "h": acts["ln_final.out"][:, sl]}
        fld = None
        if self.with_field:  # the provider's field at every returned position (its in_situ definition)
            z = torch.cat([zs[l][:, sl] if prov._sel[l] is None else zs[l][:, sl].index_select(2, prov._sel[l])
                           for l in prov.layers], dim=2).to(prov._W_all.dtype)  # (B, n, Kh, dh)
            B, n, Kh, dh = z.shape
            total = z.reshape(B * n, Kh * dh) @ prov._W_all.reshape(Kh * dh, -1)  # (B n, D) summed over heads
            total = total.view(B, n, -1)
            if prov.final_norm:
                scale, center = ad.final_norm_scale(grab["x"])
                total = (total - total.mean(-1, keepdim=True) if center else total) * scale
            fld = F.normalize(total, dim=-1) if prov.normalize else total
        return out.logits, grab["h"], fld, out.cache

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor) -> tuple[BlockState, Tensor, Tensor, Tensor | None]:
        """Forward the (left-padded) prompts: state, last logits (B, V), hidden (B, d), field (B, d) | None."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits, h, f, cache = self._run(ids, mask, pos, None, last_only=True)
        state = BlockState(cache, mask.clone(), mask.long().sum(-1), 1)
        return state, logits[:, -1], h[:, -1], None if f is None else f[:, -1]

    @torch.no_grad()
    def extend(self, state: BlockState, new: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Feed ``new`` (B, n) to every row: logits (B, n, V), hidden (B, n, d), field (B, n, d) | None."""
        B, n = new.shape
        mask = torch.cat([state.mask, torch.ones((B, n), dtype=state.mask.dtype, device=new.device)], 1)
        pos = state.next_pos[:, None] + torch.arange(n, device=new.device)
        logits, h, f, cache = self._run(new, mask, pos, state.cache, last_only=False)
        state.cache, state.mask = cache, mask
        state.forwards += 1
        return logits, h, f

    def rollback(self, state: BlockState, fed: int, keep: Tensor) -> None:
        """Of the last ``fed`` positions keep the first ``keep[b]`` (B,) of row b: the rest become
        holes (mask 0), and the positions no row keeps are cropped off the cache."""
        C = state.mask.shape[1]
        cols = torch.arange(fed, device=keep.device)
        state.mask[:, C - fed:] = (cols[None] < keep[:, None]).to(state.mask.dtype)
        state.next_pos = state.next_pos + keep
        drop = fed - int(keep.max())
        if drop > 0:
            state.cache.crop(-drop)
            state.mask = state.mask[:, :C - drop]

    # -- continuous batching: rows leave (evict) and new prompts take their slots (splice)
    @staticmethod
    def _layers(state: BlockState) -> list[Any]:
        return [ly for ly in state.cache.layers if getattr(ly, "keys", None) is not None and ly.keys.numel()]

    def evict(self, state: BlockState, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (n,) int64 of the batch (cache, mask, positions)."""
        for ly in self._layers(state):
            ly.keys, ly.values = ly.keys[keep], ly.values[keep]
        state.mask, state.next_pos = state.mask[keep], state.next_pos[keep]

    def trim(self, state: BlockState) -> int:
        """Drop the leading cache columns no row attends (every row's mask 0 there: a finished row's
        prompt after its slot was refilled, or left padding); returns how many were dropped."""
        first = int(state.mask.any(0).to(torch.int8).argmax())
        if first > 0:
            for ly in self._layers(state):
                ly.keys, ly.values = ly.keys[:, :, first:], ly.values[:, :, first:]
            state.mask = state.mask[:, first:]
        return first

    def splice(self, state: BlockState, slots: Tensor, src: BlockState, rows: Tensor) -> None:
        """Move rows ``rows`` (m,) of the prefilled prompts ``src`` (:meth:`prefill`) into rows
        ``slots`` (m,) of the running cache, right-aligned with its C columns (the cache is
        left-padded with masked columns first when the prompts are longer); the slot's old columns
        get mask 0 and its position ids continue from its prompt's (RoPE / position embeddings were
        applied at the prompt's own positions, so where the columns sit does not matter)."""
        mask = src.mask[rows]
        first = int(mask.bool().any(0).to(torch.int8).argmax())  # the columns padding in every moved row
        mask = mask[:, first:]
        L, C = mask.shape[1], state.mask.shape[1]
        if L > C:
            for ly in self._layers(state):
                pad = ly.keys.new_zeros(*ly.keys.shape[:2], L - C, ly.keys.shape[-1])
                ly.keys, ly.values = torch.cat([pad, ly.keys], 2), torch.cat([pad, ly.values], 2)
            state.mask = torch.cat([state.mask.new_zeros(state.mask.shape[0], L - C), state.mask], 1)
            C = L
        for ly, nl in zip(self._layers(state), self._layers(src)):
            for name in ("keys", "values"):
                dst = getattr(ly, name)
                dst[slots] = 0
                dst[slots, :, C - L:] = getattr(nl, name)[rows, :, first:].to(dst.dtype)
        state.mask[slots] = 0
        state.mask[slots, C - L:] = mask.to(state.mask.dtype)
        state.next_pos[slots] = src.next_pos[rows]


def _trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row of (B, L) ids / mask."""
    first = int(mask.bool().any(0).to(torch.int8).argmax())
    return ids[:, first:], mask[:, first:]


# --------------------------------------------------------------------------- the generation loop
@dataclass
class BlockRun:
    """Raw result of :func:`block_generate`: tokens (N, T), valid (N, T), diagnostics name -> (N, T)
    (one row per prompt, in the order given), counters (LM forwards, drafted / accepted per offset)
    and ``stats`` (prefills, verification rounds, mean rows per verification forward)."""

    tokens: Tensor
    valid: Tensor
    diag: dict[str, Tensor]
    forwards: int
    drafted: Tensor  # (K,) drafts verified at offset k
    accepted: Tensor  # (K,) of them accepted
    stats: dict[str, float] = _field(default_factory=dict)


@torch.no_grad()
def block_generate(lm: BlockLM, drafter: Drafter, ids: Tensor, mask: Tensor, k: int, max_new_tokens: int,
                   generator: torch.Generator | None, temperature: float = 1.0, top_p: float = 1.0,
                   eos_id: int | None = None, pad_id: int = 0, logit_bias: Tensor | None = None,
                   on_token: Callable[[int, Tensor], None] | None = None, batch_size: int = 0,
                   evict: bool = True) -> BlockRun:
    """Generate up to ``max_new_tokens`` for every prompt row of ``ids`` / ``mask`` (N, L) (left
    padded) with K = ``k`` drafts per round (module docstring). The LM's distribution is
    softmax((logits + logit_bias) / temperature) (top-p filtered).

    Scheduling: ``batch_size`` rows run at once (0 = all N, a static batch). A row that has its
    tokens (or its EOS) leaves the batch (``evict``: later forwards are narrower) and, while
    prompts wait (N > batch_size), its slot takes the next one: continuous batching, so the
    number of verification forwards follows the mean row, not the slowest row of each batch.
    ``evict=False`` with ``batch_size=0`` is the plain static batch (finished rows keep being fed)."""
    N = ids.shape[0]
    bs = N if batch_size <= 0 else min(int(batch_size), N)
    dev = ids.device
    W = max_new_tokens + k + 2
    tokens = torch.full((N, W), pad_id, dtype=torch.long, device=dev)
    diag = {key: torch.full((N, W), float("nan"), dtype=torch.float64) for key in (*BLOCK_DIAG, "lm_logprob")}
    count = torch.zeros(N, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    drafted, accepted_k = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    rounds, rows_fed = 0, 0

    def probs(logits: Tensor) -> Tensor:
        logits = logits if logit_bias is None else logits + logit_bias.to(logits.dtype)
        return target_probs(logits, temperature, top_p)

    def emit(who: Tensor, toks: Tensor, n_emit: Tensor, values: dict[str, Tensor]) -> None:
        """Write toks[:, :n_emit[b]] (B, m) of batch row b at prompt who[b]'s count (prompts not done)."""
        m = toks.shape[1]
        j = torch.arange(m, device=dev)[None]
        c = count[who]
        ok = (j < n_emit[:, None]) & ~done[who][:, None] & (c[:, None] + j < max_new_tokens)
        rows, cols = ok.nonzero(as_tuple=True)
        at = c[rows] + cols
        tgt = who[rows]
        tokens[tgt, at] = toks[rows, cols]
        for key, v in values.items():
            diag[key][tgt, at] = v[rows, cols].to(device=diag[key].device, dtype=torch.float64)
        if on_token is not None and N == 1:
            for col in cols.tolist():
                on_token(int(c[0]) + col, toks[0, col:col + 1])
        hit = (ok & (toks == eos_id)).any(1) if eos_id is not None else torch.zeros_like(ok[:, 0])
        count[who] = c + ok.sum(1)
        done[who] = done[who] | hit | (count[who] >= max_new_tokens)

    def first_token(who: Tensor, logits: Tensor) -> Tensor:
        """The free exact first draw of newly prefilled prompts ``who`` from their last logits (m, V)."""
        p0 = probs(logits)
        z0 = sample_categorical(p0, generator)
        emit(who, z0[:, None], torch.ones_like(z0), {
            "block_offset": torch.zeros(len(who), 1), "lm_p": p0.gather(1, z0[:, None]),
            "lm_logprob": _logprob(logits, z0)[:, None]})
        return z0

    def prefill(sel: Tensor) -> tuple[BlockState, Tensor, Tensor | None, Tensor]:
        """One forward over the prompts ``sel`` and their free first tokens: (state, hidden, field, z)."""
        st, lg, h, f = lm.prefill(*_trim_left(ids[sel], mask[sel]))
        return st, h, f, first_token(sel, lg)

    who = torch.arange(bs, device=dev)  # the prompt each batch row is generating
    state, hidden, fld, z = prefill(who)
    waiting = bs  # the next prompt to prefill
    pool: list[Any] = []  # prompts prefilled ahead, waiting for a slot: [state, hidden, field, z, who, next row]
    extra_prefills = 0
    while True:
        fin = done[who]
        if bool(fin.any()) and (pool or waiting < N):  # continuous batching: finished rows take waiting prompts
            if not pool:  # prefill the next batch_size prompts in ONE forward (as a static batch would)
                sel = torch.arange(waiting, min(waiting + bs, N), device=dev)
                waiting += len(sel)
                pool = [*prefill(sel), sel, 0]
                extra_prefills += 1
            pst, ph, pf, pz, pwho, at = pool
            ready = (~done[pwho[at:]]).nonzero(as_tuple=True)[0] + at  # prompts done at their first token leave
            slots = fin.nonzero(as_tuple=True)[0][: len(ready)]
            rows = ready[: len(slots)]
            pool[5] = int(rows[-1]) + 1 if len(rows) else len(pwho)
            if pool[5] >= len(pwho):
                pool = []
            if len(slots):
                lm.splice(state, slots, pst, rows)
                who, hidden, z = who.clone(), hidden.clone(), z.clone()
                who[slots], hidden[slots], z[slots] = pwho[rows], ph[rows].to(hidden.dtype), pz[rows]
                if fld is not None:
                    fld = fld.clone()
                    fld[slots] = pf[rows].to(fld.dtype)
            continue
        if bool(fin.all()):
            break
        if evict and bool(fin.any()):  # finished rows leave: later forwards are narrower
            keep = (~fin).nonzero(as_tuple=True)[0]
            lm.evict(state, keep)
            who, hidden, z = who[keep], hidden[keep], z[keep]
            fld = None if fld is None else fld[keep]
        lm.trim(state)
        B = who.shape[0]
        live = ~done[who]
        need = int((max_new_tokens - count[who][live]).max())  # tokens still wanted after z by the neediest row
        kk = max(0, min(k, need - 1))
        if kk > 0:
            drafts, r = drafter.draft(DraftContext(hidden, fld, z), kk, generator)  # (B, kk), (B, kk, V)
        else:
            drafts, r = z.new_zeros(B, 0), None
        block = torch.cat([z[:, None], drafts], 1)  # (B, kk + 1)
        logits, hs, fs = lm.extend(state, block)
        rounds, rows_fed = rounds + 1, rows_fed + B
        p = probs(logits)  # (B, kk + 1, V)
        v = verify(p, r.to(p.dtype) if r is not None else p[:, :0], drafts, generator)
        n = v.n_accepted
        if kk > 0:
            seen = (torch.arange(kk, device=dev)[None] <= n[:, None]) & live[:, None]  # offset j was verified
            drafted[:kk] += seen.sum(0).cpu()
            accepted_k[:kk] += (v.accepted & live[:, None]).sum(0).cpu()
        # emitted this round: the accepted drafts, then the next token at index n
        rows = torch.arange(B, device=dev)
        toks = torch.cat([drafts, drafts.new_zeros(B, 1)], 1)
        toks[rows, n] = v.next_token
        offs = torch.arange(1, kk + 2, device=dev, dtype=torch.float64)[None].expand(B, -1)
        acc = torch.full((B, kk + 1), float("nan"), dtype=torch.float64, device=dev)
        acc[:, :kk] = torch.where(v.accepted, 1.0, float("nan")).double()
        acc[rows, n] = torch.where(n < kk, 0.0, float("nan")).double()
        pr = torch.cat([v.p_draft, v.p_draft.new_zeros(B, 1)], 1)
        pr[rows, n] = v.p_next
        rr = torch.cat([v.r_draft, v.r_draft.new_zeros(B, 1)], 1)
        rr[rows, n] = torch.where(n < kk, v.r_next, float("nan"))
        emit(who, toks, n + 1, {"block_offset": offs, "accepted": acc, "draft_r": rr, "lm_p": pr,
                                "lm_logprob": _logprob(logits, toks)})
        lm.rollback(state, kk + 1, n + 1)
        hidden, fld = hs[rows, n], None if fs is None else fs[rows, n]  # the last kept fed position
        z = v.next_token
    valid = torch.arange(W, device=dev)[None] < count[:, None]
    if eos_id is not None:  # up to and including the first EOS
        is_eos = (tokens == eos_id) & valid
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(count, W))
        valid = valid & (torch.arange(W, device=dev)[None] <= first[:, None])
    T = int(count.max())
    # row_forwards: every prompt's prefill (its free first token) + every row of every verification
    state.forwards += extra_prefills
    stats = {"prefills": 1 + extra_prefills, "rounds": rounds, "rows_per_forward": rows_fed / max(rounds, 1),
             "row_forwards": rows_fed + N}
    return BlockRun(tokens[:, :T].cpu(), valid[:, :T].cpu(), {key: x[:, :T].float() for key, x in diag.items()},
                    state.forwards, drafted, accepted_k, stats)


def _logprob(logits: Tensor, toks: Tensor) -> Tensor:
    """log softmax(logits) (..., V) at ``toks`` (...): the LM's log p at T = 1 (the diagnostics'
    ``lm_logprob``), from one logsumexp instead of a float64 log-softmax over the vocabulary."""
    return logits.gather(-1, toks.unsqueeze(-1)).squeeze(-1).double() - torch.logsumexp(logits, -1).double()


# --------------------------------------------------------------------------- the sampler
@register_sampler("block")
class BlockSampler(Sampler):
    """Speculative blocks: ``sampler.block`` = K drafts per LM forward from ``sampler.drafter``
    (the draft heads of an ``objective=block`` checkpoint), verified exactly (module docstring).
    ``sampler.temperature`` / ``top_p`` / ``steer.mode=prior`` define the distribution reproduced."""

    needs_checkpoint = "required"
    objective = "block"
    steering_modes = ("prior",)

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, **kw: Any) -> None:
        super().__init__(session, cfg, field_cfg, module, ckpt_path, **kw)
        self.k = int(cfg.block)
        if session.window and self.k + 1 >= session.window:
            raise SampleError(f"sampler.block={self.k}: K + 1 positions per verification exceed the context window "
                              f"of {session.name} ({session.window} tokens); use e.g. sampler.block=4")
        self.heads = module.score_net.to(device=session.device, dtype=session.dtype).eval()
        self.drafter: Drafter = DRAFTERS[str(cfg.drafter)](heads=self.heads, table=session.token_table,
                                                          temperature=float(cfg.temperature), session=session,
                                                          vocab=int(getattr(cfg, "draft_vocab", 0) or 0))
        self.lm = BlockLM(session.model, session.adapter, self.provider, self.drafter.needs_field, session.window)
        self.last: dict[str, Any] = {}
        # generate(): finished rows leave the static batch (measured: no speed gain on CPU, and the
        # draws then differ from the plain static batch's for a seed); generate_queue always evicts
        self.evict = False

    @classmethod
    def validate(cls, cfg: Any) -> None:
        k = cfg.get("block", None) if hasattr(cfg, "get") else getattr(cfg, "block", None)
        if k is None or int(k) < 1:
            raise SampleError(f"sampler.block={k}: the number of drafted tokens per LM forward must be >= 1; "
                              "e.g. sampler.block=4")
        if int(getattr(cfg, "draft_vocab", 0) or 0) < 0:
            raise SampleError(f"sampler.draft_vocab={cfg.draft_vocab}: must be >= 0 (0 = the whole vocabulary); "
                              "e.g. sampler.draft_vocab=8192")
        if str(cfg.drafter) not in DRAFTERS:
            raise SampleError(f"sampler.drafter={cfg.drafter!r}: choose one of {', '.join(sorted(DRAFTERS))}")
        if cfg.temperature < 0 or not math.isfinite(cfg.temperature):
            raise SampleError(f"sampler.temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < cfg.top_p <= 1:
            raise SampleError(f"sampler.top_p={cfg.top_p}: must be in (0, 1]")

    @classmethod
    def check_module(cls, cfg: Any, module: Any) -> None:
        net = getattr(module, "score_net", None)
        if net is None or not hasattr(net, "block"):
            raise SampleError("sampler.name=block needs a checkpoint with draft heads; train one with "
                              "`python train.py experiment=block` and pass ckpt=PATH")
        if str(cfg.drafter) == "potts_lowrank" and int(getattr(net, "rank", 0)) <= 0:
            raise SampleError("sampler.drafter=potts_lowrank needs a checkpoint with learned couplings; train one with "
                              "`python train.py experiment=block score_net.rank=64`, or use sampler.drafter=heads")
        if int(cfg.block) > int(net.block):
            raise SampleError(f"sampler.block={cfg.block} but the checkpoint has draft heads for {net.block} offsets; "
                              f"use sampler.block<={net.block} or train with score_net.block={cfg.block}")

    @property
    def label(self) -> str:
        t = "greedy" if self.cfg.temperature <= 0 else f"T={_fmt(float(self.cfg.temperature))}"
        return f"block[{self.cfg.drafter}](K={self.k},{t})"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block": self.k, "drafter": str(self.cfg.drafter),
                "temperature": float(self.cfg.temperature), "top_p": float(self.cfg.top_p),
                "draft_vocab": int(getattr(getattr(self.drafter, "vocab", None), "size", 0)), **self.last}

    def _bias(self) -> Tensor | None:
        return None if self.steering is None else self.steering.logit_bias(self.session.token_table)

    @torch.no_grad()
    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator) -> Tensor:
        """The first token of a block is a free exact draw from p: n draws per context. (B, n)."""
        logits = out.logits.float() if self._bias() is None else out.logits.float() + self._bias().float()
        p = target_probs(logits, float(self.cfg.temperature), float(self.cfg.top_p))
        return torch.multinomial(p, n, replacement=True, generator=generator)

    @torch.no_grad()
    def generate(self, ids, mask, max_new_tokens, generator, stop_at_eos=True, on_token=None):
        return self._run(ids, mask, max_new_tokens, generator, stop_at_eos, on_token, 0, self.evict)

    @torch.no_grad()
    def generate_queue(self, seqs: Sequence[Sequence[int]], batch_size: int, max_new_tokens: int,
                       generator: torch.Generator, stop_at_eos: bool = True) -> GenerationBatch:
        """Continue every prompt of ``seqs`` (N token lists) with ``batch_size`` rows at once under
        continuous batching (:func:`block_generate`): a finished row's slot takes the next prompt.
        One :class:`GenerationBatch` of N rows, in the order of ``seqs``."""
        ids, mask = self.session.batch(seqs)
        return self._run(ids, mask, max_new_tokens, generator, stop_at_eos, None, int(batch_size), True)

    def _run(self, ids, mask, max_new_tokens, generator, stop_at_eos, on_token, batch_size, evict) -> GenerationBatch:
        sess = self.session
        t0 = time.perf_counter()
        run = block_generate(self.lm, self.drafter, ids, mask, self.k, max_new_tokens, generator,
                             float(self.cfg.temperature), float(self.cfg.top_p),
                             sess.eos_id if stop_at_eos else None, sess.pad_id, self._bias(), on_token,
                             batch_size=batch_size, evict=evict)
        seconds = time.perf_counter() - t0
        B, T = run.tokens.shape
        diag = {key: torch.full((B, T), float("nan")) for key in DIAG_KEYS}
        diag.update(run.diag)
        n_tok = int(run.valid.sum())
        # tokens_per_forward: per row (a prompt's prefill counts as one, as for ar)
        self.last = {"lm_forwards": run.forwards, "verify_rounds": int(run.stats["rounds"]),
                     "prefills": int(run.stats["prefills"]),
                     "rows_per_forward": round(float(run.stats["rows_per_forward"]), 3),
                     "row_forwards": int(run.stats["row_forwards"]),
                     "tokens_per_forward": round(n_tok / max(run.stats["row_forwards"], 1), 4),
                     "acceptance_by_offset": [round(float(a) / max(int(d), 1), 4)
                                              for a, d in zip(run.accepted, run.drafted)],
                     "drafted": run.drafted.tolist(), "accepted": run.accepted.tolist()}
        stop = ["eos" if (stop_at_eos and sess.eos_id is not None and bool((run.tokens[b][run.valid[b]] == sess.eos_id).any()))
                else "max_tokens" for b in range(B)]
        return GenerationBatch(run.tokens, run.valid, diag, seconds, stop, 0)
