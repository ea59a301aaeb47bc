"""Next-token samplers, chosen by name from one registry, and the session they share.

Every way of producing the next token lives behind the same interface (:class:`Sampler`), so
``sample.py``, the evaluation, the sweeps and the benchmark never branch on the method:

==============  ==================================================================================
``spin``        reverse LLG SDE on S^{d-1} from uniform noise (:class:`spindiff.sde.ReverseLLGSDE`):
                drift beta * score + eta P_S N + (eta/lam) Prec(S, N), geodesic integrator of
                :mod:`spindiff.integrators`; score = learned residual from a checkpoint, or none
                (``ckpt=none``: the *field-only* sampler). Decode: argmax cosine against the
                unit unembedding rows (one matmul), or a draw from softmax(kappa * cosine).
``ar``          the LM's own sampling (``model.generate``; temperature / top-p).
``euclid_ddpm`` Gaussian DDPM in embedding space (:mod:`spindiff.euclid`), Euler-Maruyama on the
                reverse VP-SDE, nearest-embedding rounding; needs ``train.py objective=euclid_ddpm``.
==============  ==================================================================================

Token-by-token generation (:meth:`StepSampler.generate`): one LM forward gives the context
field N, the hidden state h and the logits of the last position (:class:`ContextFieldProvider`);
the SDE runs on (B, d) spins; the chosen token is appended and the next forward reuses the KV
cache (``provider.step``), so the LM runs exactly once per generated token, as in ``generate``.

Add a sampler: subclass :class:`StepSampler` (implement ``propose_from``) or :class:`Sampler`,
and decorate it with ``@register_sampler("name")``.
"""
from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from spindiff.adapter import get_adapter
from spindiff.field import ContextFieldProvider, FieldOutput
from spindiff.models import LoadedModel, context_window, load_model

__all__ = [
    "SampleError",
    "GenerationSession",
    "FastNet",
    "GenerationBatch",
    "Sampler",
    "StepSampler",
    "SpinSampler",
    "ARSampler",
    "EuclidDDPMSampler",
    "SAMPLERS",
    "register_sampler",
    "get_sampler_class",
    "build_sampler",
    "find_checkpoint",
    "decode_spins",
    "left_pad",
]

DIAG_KEYS = ("cos", "margin", "field_norm", "lm_logprob", "field_cos_prev")


class SampleError(ValueError):
    """Bad input to sampling (config, prompt, checkpoint); the message names the problem and the fix."""


# --------------------------------------------------------------------------- helpers
def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-padded (B, T) ids and attention mask for ragged token lists."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def decode_spins(spins: Tensor, table: Tensor, kappa: Optional[float] = None,
                 generator: torch.Generator | None = None, chunk: int = 512,
                 coarse: Optional[Tensor] = None, candidates: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens for spins by cosine against unit rows: argmax, or a draw from softmax(kappa * cos).

    Args:
        spins: (N, d) final states (unit for the sphere; any vector works: cosine uses S/|S|).
        table: (V, d) unit-normalised unembedding rows.
        kappa: None -> nearest token; else inverse temperature of the softmax over cosines.
        chunk: rows per matmul (bounds the (chunk, V) score buffer).
        coarse: optional low-precision copy of ``table`` (bfloat16) for the nearest-token search:
            one coarse matmul picks ``candidates`` tokens per spin, which are re-scored exactly
            in the table's precision (the argmax and the runner-up are exact unless the true top-2
            fall outside the coarse top-16, i.e. unless the bfloat16 error of a cosine, < 1e-2,
            exceeds the gap between the 2nd and the 16th best). Ignored when ``kappa`` is set.
    Returns:
        ids (N,) int64, cos (N,) cosine to the chosen token, margin (N,) = cos(chosen) minus the
        best cosine among the other tokens (> 0 when the chosen token is the nearest).
    """
    ids, cos, margin = [], [], []
    unit = spins / spins.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, d)
    for part in unit.split(chunk):
        if kappa is None and coarse is not None:
            cand = (part.to(coarse.dtype) @ coarse.T).topk(candidates, dim=-1).indices  # (n, k) one coarse matmul
            exact = torch.einsum("nd,nkd->nk", part, table[cand])  # (n, k) exact cosines of the candidates
            top2 = exact.topk(2, dim=-1)
            ids.append(cand.gather(1, top2.indices[:, :1]).squeeze(1))
            cos.append(top2.values[:, 0])
            margin.append(top2.values[:, 0] - top2.values[:, 1])
            continue
        scores = part @ table.T  # (n, V)
        top2 = scores.topk(2, dim=-1)  # values, indices (n, 2)
        if kappa is None:
            chosen = top2.indices[:, 0]
        else:
            probs = torch.softmax(float(kappa) * scores, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        c = scores.gather(1, chosen[:, None]).squeeze(-1)  # (n,)
        best_other = torch.where(chosen == top2.indices[:, 0], top2.values[:, 1], top2.values[:, 0])
        ids.append(chosen)
        cos.append(c)
        margin.append(c - best_other)
    return torch.cat(ids), torch.cat(cos), torch.cat(margin)


def _coarse_table(table: Tensor, rows: int = 8, reps: int = 3) -> Optional[Tensor]:
    """A bfloat16 copy of ``table`` when a bfloat16 matmul of ``rows`` spins against it is faster
    here than float32 (CPUs with native bfloat16 GEMM: ~4x at V = 49152), else None."""
    if table.dtype != torch.float32 or table.shape[0] < 4096:
        return None
    try:
        low = table.to(torch.bfloat16)
        x = torch.randn(rows, table.shape[1], dtype=table.dtype, device=table.device)

        def best(fn: Callable[[], Any]) -> float:
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        with torch.no_grad():
            t32 = best(lambda: x @ table.T)
            t16 = best(lambda: (x.to(torch.bfloat16) @ low.T).topk(16, dim=-1))
        return low if t16 < 0.8 * t32 else None
    except (RuntimeError, TypeError):
        return None


def warp_logits(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Logits after temperature and nucleus (top-p) filtering, as ``generate`` applies them. (B, V)."""
    if temperature <= 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    x = logits / temperature
    if top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p  # keep the smallest prefix with mass >= top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


SMALL_BATCH_ROWS = 64  # at most this many spins: run the SDE on one thread


@contextlib.contextmanager
def small_op_threads(rows: int) -> Any:
    """One intra-op thread while integrating a small batch of spins.

    The SDE works on (B, d) tensors with B ~ 1..64: each op takes microseconds, and handing
    it to a thread pool costs more than the op (100x more on a loaded 2-core machine:
    a (8, 64) linear layer takes 25 us on one thread and ~5 ms on two under load). Large
    batches (fidelity draws) keep the configured threads.
    """
    if rows > SMALL_BATCH_ROWS:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class GenerationBatch:
    """Continuations of one batch of prompts.

    tokens: (B, T) generated ids (after a row's EOS: the pad id, ``valid`` False).
    valid:  (B, T) bool, tokens up to and including the first EOS.
    diag:   name -> (B, T) float per-token diagnostics (NaN where not applicable), see DIAG_KEYS.
    seconds: wall time of the generation (LM forwards + SDE + decoding).
    stop: (B,) "eos" | "max_tokens".
    """

    tokens: Tensor
    valid: Tensor
    diag: dict[str, Tensor]
    seconds: float
    stop: list[str]
    sde_steps: int

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())


# --------------------------------------------------------------------------- the session
class GenerationSession:
    """A loaded LM, its field providers, the unit token table and loaded checkpoints.

    Build it once (``GenerationSession.load(cfg.model)``) and share it between samplers, sweep
    points and benchmark arms: the model is loaded once and field outputs can be reused.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.tokenizer.padding_side = "left"
        self.adapter = get_adapter(self.model)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        W = self.adapter.unembedding().detach()  # (V, d)
        self.token_table = (W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)).contiguous()  # (V, d) unit rows
        self.coarse_table = _coarse_table(self.token_table)  # (V, d) bfloat16 for the nearest-token search, or None
        self.dim = int(W.shape[-1])
        self.window = context_window(self.model)
        self._providers: dict[tuple, ContextFieldProvider] = {}
        self._modules: dict[str, Any] = {}
        self.auto_ckpt: dict[tuple[str, str], Optional[str]] = {}  # ckpt=auto resolutions of this session

    @classmethod
    def load(cls, model_cfg: Any) -> "GenerationSession":
        return cls(load_model(model_cfg))

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else (self.eos_id or 0))

    def provider(self, field_cfg: Any) -> ContextFieldProvider:
        """The (cached) context-field provider for a field config (in_situ only: KV cache)."""
        get = (lambda k, d=None: field_cfg.get(k, d)) if hasattr(field_cfg, "get") else \
            (lambda k, d=None: getattr(field_cfg, k, d))
        key = (str(get("heads", "all")), str(get("protocol", "in_situ")), bool(get("normalize", True)),
               bool(get("final_norm", True)), str(get("report", "") or ""))
        if key[1] != "in_situ":
            raise SampleError(f"field.protocol={key[1]} has no KV cache and no logits for token-by-token "
                              "generation; use field.protocol=in_situ (a checkpoint trained on another "
                              "protocol must be retrained with field.protocol=in_situ)")
        if key not in self._providers:
            try:
                self._providers[key] = ContextFieldProvider(self.model, key[0], key[1], key[2], key[3], key[4])
            except ValueError as e:
                raise SampleError(f"field settings {key}: {e}") from None
        return self._providers[key]

    def score_module(self, path: str) -> Any:
        """A trained score module (cached), validated against this model and its d."""
        from spindiff.lightning_module import load_score_module

        path = str(path)
        if path not in self._modules:
            module = load_score_module(path, expect_model=self.lm.name, expect_dim=self.dim)
            self._modules[path] = module.to(device=self.device, dtype=self.dtype).eval()
        return self._modules[path]

    def encode(self, prompts: Sequence[str], reserve: int = 0) -> list[list[int]]:
        """Token ids of each prompt; errors for an empty prompt or one that does not fit the
        context window together with ``reserve`` new tokens."""
        out = []
        for i, p in enumerate(prompts):
            if not p or not p.strip():
                raise SampleError(f"prompt {i} is empty; give text with prompt=\"...\" or one prompt per line "
                                  "in prompts=FILE (blank lines are skipped)")
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            if not ids:
                raise SampleError(f"prompt {i} ({p!r}) tokenises to nothing; give visible text")
            if self.window and len(ids) + reserve > self.window:
                raise SampleError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={reserve} that exceeds the context "
                    f"window of {self.name} ({self.window} tokens). Shorten the prompt to at most "
                    f"{max(self.window - reserve, 0)} tokens or lower max_new_tokens")
            out.append(list(ids))
        return out

    def batch(self, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Left-padded (B, T) ids and mask on the model's device."""
        return left_pad(seqs, self.pad_id, self.device)


# --------------------------------------------------------------------------- fast network path
class FastNet:
    """``net(x, t, context)`` of a :class:`spindiff.score_net.ResidualScoreNet` with the parts that
    do not change inside one token's integration hoisted out of the step loop.

    Per token, the context's share of the input layer, ``context @ W_ctx^T + b`` (B, H), is
    computed once; per time value (the same grid every token), the time embedding, the time MLP
    and every block's conditioning ``cond_l(temb)`` (1, H) are computed once and cached on the
    sampler (``time_cache``). A step then costs the input projection of the spin, the blocks and
    the output layer. Same arithmetic as ``net.forward`` (the input matmul split in two);
    :func:`FastNet.matches` checks it against the network and callers fall back to the plain
    path when it does not match (a changed network class).
    """

    def __init__(self, net: Any, context: Tensor | None, time_cache: dict[float, list[Tensor]]) -> None:
        self.net = net
        d = net.dim
        W = net.inp.weight  # (H, d + c)
        self.W_x = W[:, :d]  # (H, d)
        bias = net.inp.bias  # (H,)
        self.base = bias if context is None or net.context_dim == 0 else \
            torch.addmm(bias, context.to(W.dtype), W[:, d:].T)  # (B, H)
        self.time_cache = time_cache

    def conds(self, t: Tensor) -> list[Tensor]:
        """[cond_l(time_mlp(time_embed(t)))] for the (shared) time of t (B,), each (1, H)."""
        key = float(t[0])
        hit = self.time_cache.get(key)
        if hit is None:
            net = self.net
            temb = net.time_mlp(net.time_embed(t[:1]).to(self.W_x.dtype))  # (1, H)
            hit = [c(temb) for c in net.cond]
            self.time_cache[key] = hit
        return hit

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """net(x, t, context). x: (B, d), t: (B,) with one shared value -> (B, d)."""
        net = self.net
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = torch.addmm(self.base, x, self.W_x.T)  # (B, H) = inp([x, context])
        for block, c in zip(net.blocks, self.conds(t)):
            h = block(h, c)  # (B, H)
        out = net.out(net.out_norm(h))  # (B, d)
        return net.geometry.proju(x, out) if net.tangent else out

    @staticmethod
    def matches(net: Any, dtype: torch.dtype = torch.float32) -> bool:
        """True when the hoisted computation equals ``net.forward`` on random inputs."""
        try:
            g = torch.Generator().manual_seed(0)
            dev = next(net.parameters()).device
            x = torch.randn(3, net.dim, generator=g, dtype=dtype).to(dev)
            x = x / x.norm(dim=-1, keepdim=True)
            ctx = torch.randn(3, net.context_dim, generator=g, dtype=dtype).to(dev) if net.context_dim else None
            t = torch.full((3,), 0.37, dtype=dtype, device=dev)
            with torch.no_grad():
                ref = net(x, t, ctx)
                got = FastNet(net, ctx, {})(x, t)
            return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6))
        except Exception:  # a network of another shape: use the plain path
            return False


# --------------------------------------------------------------------------- samplers
class Sampler(ABC):
    """Produces next tokens for a batch of contexts.

    Subclasses set ``name``, ``uses_steps`` and ``needs_checkpoint`` ("required" | "optional" |
    "never") and ``objective`` (the training objective of a usable checkpoint).
    """

    name: ClassVar[str] = ""
    uses_steps: ClassVar[bool] = False
    needs_checkpoint: ClassVar[str] = "never"
    objective: ClassVar[Optional[str]] = None

    def __init__(self, session: GenerationSession, cfg: Any, field_cfg: Any, module: Any = None,
                 ckpt_path: Optional[str] = None) -> None:
        self.session = session
        self.cfg = cfg
        self.module = module
        self.ckpt_path = ckpt_path
        if module is not None:
            field_cfg = module.hparams.meta.get("field", field_cfg)
        self.field_cfg = field_cfg
        self.provider = session.provider(field_cfg)

    # -- description
    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise :class:`SampleError` for settings this sampler cannot run with."""

    @property
    def field_only(self) -> bool:
        return False

    @property
    def label(self) -> str:
        return self.name

    @property
    def sde_steps(self) -> int:
        """SDE steps per generated token (0 for ``ar``)."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "label": self.label, "field_only": self.field_only,
                "ckpt": self.ckpt_path, "sde_steps_per_token": self.sde_steps}

    # -- work
    def forward(self, ids: Tensor, mask: Tensor) -> FieldOutput:
        """One LM forward of the contexts with the field provider (KV cache kept)."""
        return self.provider(ids, mask, use_cache=True)

    @abstractmethod
    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator) -> Tensor:
        """n independent next-token draws per context of ``out``: (B, n) int64."""

    @abstractmethod
    def generate(self, ids: Tensor, mask: Tensor, max_new_tokens: int, generator: torch.Generator,
                 stop_at_eos: bool = True, on_token: Callable[[int, Tensor], None] | None = None) -> GenerationBatch:
        """Continue each row of ``ids`` (B, T) (left padded, ``mask``) by up to ``max_new_tokens``."""


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: make a :class:`Sampler` available as ``sampler.name=<name>``."""

    def deco(cls: type[Sampler]) -> type[Sampler]:
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return deco


def get_sampler_class(name: str) -> type[Sampler]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SampleError(f"unknown sampler.name={name!r}; choose one of {', '.join(sorted(SAMPLERS))}") from None


class StepSampler(Sampler):
    """A sampler that proposes one token per context from a :class:`FieldOutput`; generation is
    the shared token-by-token loop (LM once per token via the KV cache)."""

    @abstractmethod
    def propose_from(self, field: Tensor, hidden: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens for contexts with field N (B, d) and hidden state h (B, d):
        ids (B,), cos (B,), margin (B,) (see :func:`decode_spins`)."""

    def draw_from(self, out: FieldOutput, n: int, generator: torch.Generator, chunk: int = 2048) -> Tensor:
        B = out.field.shape[0]
        field = out.field.repeat_interleave(n, 0)  # (B n, d)
        hidden = out.hidden.repeat_interleave(n, 0)
        ids = [self.propose_from(f, h, generator)[0] for f, h in zip(field.split(chunk), hidden.split(chunk))]
        return torch.cat(ids).view(B, n)

    @torch.no_grad()
    def generate(self, ids, mask, max_new_tokens, generator, stop_at_eos=True, on_token=None):
        sess = self.session
        B = ids.shape[0]
        eos = sess.eos_id if stop_at_eos else None
        t0 = time.perf_counter()
        out = self.forward(ids, mask)
        tokens = torch.full((B, max_new_tokens), sess.pad_id, dtype=torch.long, device=ids.device)
        valid = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=ids.device)
        diag = {k: torch.full((B, max_new_tokens), float("nan")) for k in DIAG_KEYS}
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        prev_field: Tensor | None = None
        n = 0
        for i in range(max_new_tokens):
            tok, cos, margin = self.propose_from(out.field, out.hidden, generator)  # (B,) each
            tok = torch.where(done, torch.full_like(tok, sess.pad_id), tok)
            live = ~done
            tokens[:, i], valid[:, i] = tok, live
            logp = torch.log_softmax(out.logits.float(), -1).gather(1, tok[:, None]).squeeze(1)  # (B,)
            vals = {"cos": cos, "margin": margin, "field_norm": out.field_norm, "lm_logprob": logp}
            if prev_field is not None:
                vals["field_cos_prev"] = (out.field * prev_field).sum(-1) / (
                    out.field.norm(dim=-1) * prev_field.norm(dim=-1)).clamp_min(1e-12)
            for k, v in vals.items():
                diag[k][:, i] = torch.where(live.cpu(), v.detach().float().cpu(), torch.tensor(float("nan")))
            if on_token is not None:
                on_token(i, tok)
            n = i + 1
            if eos is not None:
                done = done | (tok == eos)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            prev_field = out.field
            out = self.provider.step(tok, out)
        seconds = time.perf_counter() - t0
        tokens, valid = tokens[:, :n], valid[:, :n]
        diag = {k: v[:, :n] for k, v in diag.items()}
        stop = ["eos" if (eos is not None and bool((tokens[b][valid[b]] == eos).any())) else "max_tokens"
                for b in range(B)]
        return GenerationBatch(tokens.cpu(), valid.cpu(), diag, seconds, stop, self.sde_steps)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


@register_sampler("spin")
class SpinSampler(StepSampler):
    """Reverse LLG SDE on S^{d-1} per token (see the module docstring).

    With a checkpoint the score is the learned total score of the network (field and context
    features as in training); without one (``ckpt=none``) the only drift is the LLG field term
    eta P_S N + (eta/lam) Prec(S, N): the *field-only* sampler.
    """

    uses_steps = True
    needs_checkpoint = "optional"
    objective = "spin"

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None) -> None:
        super().__init__(session, cfg, field_cfg, module, ckpt_path)
        from spindiff.integrators import get_sampler as get_step
        from spindiff.sde import BrownianSphereSDE

        if module is not None:
            self.sde = module.sde
            self.net = module.score_net
            self.features = str(module.hparams.meta["context_features"])
        else:
            self.sde = BrownianSphereSDE.from_config(sde_cfg, session.dim)
            self.net, self.features = None, "none"
        self.fast = self.net is not None and FastNet.matches(self.net, session.dtype)
        self._time_cache: dict[float, list[Tensor]] = {}
        self._scale_cache: dict[float, Tensor] = {}
        try:
            self.step_fn = get_step(cfg.method)
        except ValueError as e:
            raise SampleError(f"sampler.method: {e}") from None
        self.eta, self.lam, self.steps = float(cfg.eta), float(cfg.lam), int(cfg.steps)
        self.kappa = None if cfg.kappa is None else float(cfg.kappa)
        tau_end = float(self.sde.T - self.sde.t_eps)
        self.grid = [tau_end * k / self.steps for k in range(self.steps + 1)]  # reverse time tau
        self.sqrt_h = [math.sqrt(b - a) for a, b in zip(self.grid[:-1], self.grid[1:])]

    @classmethod
    def validate(cls, cfg: Any) -> None:
        _check_steps(cfg)
        if cfg.eta < 0 or not math.isfinite(cfg.eta):
            raise SampleError(f"sampler.eta={cfg.eta}: the field strength must be finite and >= 0 "
                              "(0 = learned score only); e.g. sampler.eta=1")
        if not cfg.lam > 0:
            raise SampleError(f"sampler.lam={cfg.lam}: the Gilbert damping must be > 0 "
                              "(sampler.lam=inf switches precession off); e.g. sampler.lam=1")
        if cfg.kappa is not None and not cfg.kappa > 0:
            raise SampleError(f"sampler.kappa={cfg.kappa}: must be > 0 (or null for nearest-token decoding)")

    @property
    def field_only(self) -> bool:
        return self.net is None

    @property
    def label(self) -> str:
        kind = "field-only" if self.field_only else "learned"
        dec = "" if self.kappa is None else f",kappa={_fmt(self.kappa)}"
        return f"spin[{kind}](eta={_fmt(self.eta)},lam={_fmt(self.lam)},steps={self.steps}{dec})"

    @property
    def sde_steps(self) -> int:
        return self.steps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eta": self.eta, "lam": self.lam, "steps": self.steps,
                "method": self.cfg.method, "kappa": self.kappa, "context_features": self.features}

    def integrate(self, field: Tensor, hidden: Tensor, generator: torch.Generator) -> Tensor:
        """S_0 for contexts with field N (B, d), hidden h (B, d): uniform S_T, ``steps`` geodesic steps. (B, d)."""
        score_fn = None
        if self.net is not None:
            from spindiff.data import context_features
            from spindiff.score_net import make_score_fn

            context = context_features(field, hidden, self.features)
            score_fn = self._fast_score_fn(field, context) if self.fast else \
                make_score_fn(self.net, self.sde, field=field, context=context)
        rev = self.sde.reverse(score_fn, field=field, eta=self.eta, lam=self.lam)
        B, d = field.shape
        with small_op_threads(B):
            spin = rev.prior_sampling(B, dtype=field.dtype, device=field.device, generator=generator)  # (B, d)
            for k in range(self.steps):
                dw = torch.randn(B, d, dtype=field.dtype, device=field.device, generator=generator) * self.sqrt_h[k]
                spin = self.step_fn(rev, self.grid[k], self.grid[k + 1], spin, dw)  # (B, d) geodesic step
        return spin

    def _fast_score_fn(self, field: Tensor, context: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        """The network's total score eta_train m(t) P_S N + score_scale(t) net(S, t, context)
        (:meth:`ResidualScoreNet.total_score`) through :class:`FastNet`, score_scale cached per t."""
        fast, net, sde = FastNet(self.net, context, self._time_cache), self.net, self.sde

        def score_fn(spin: Tensor, t: Tensor) -> Tensor:
            key = float(t[0])
            scale = self._scale_cache.get(key)
            if scale is None:
                scale = self._scale_cache[key] = sde.score_scale(t[:1]).to(spin.dtype)  # (1,)
            out = scale[:, None] * fast(spin, t)  # (B, d)
            if net.eta_train != 0.0:
                out = out + net.analytic_term(spin, t, sde, field)
            return out

        return score_fn

    @torch.no_grad()
    def propose_from(self, field, hidden, generator):
        spin = self.integrate(field, hidden, generator)
        return decode_spins(spin, self.session.token_table, self.kappa, generator, coarse=self.session.coarse_table)


@register_sampler("euclid_ddpm")
class EuclidDDPMSampler(StepSampler):
    """Euclidean Gaussian DDPM in embedding space (:mod:`spindiff.euclid`): x_T ~ N(0, I),
    ``steps`` Euler-Maruyama steps of the reverse VP-SDE with the trained noise predictor,
    nearest-embedding rounding (Euclidean distance to the training embedding table)."""

    uses_steps = True
    needs_checkpoint = "required"
    objective = "euclid_ddpm"

    def __init__(self, session, cfg, field_cfg, module=None, ckpt_path=None, sde_cfg: Any = None) -> None:
        if module is None:
            raise SampleError("sampler.name=euclid_ddpm needs a checkpoint trained with "
                              "`python train.py objective=euclid_ddpm` (then ckpt=PATH or ckpt=auto)")
        super().__init__(session, cfg, field_cfg, module, ckpt_path)
        self.sde = module.sde
        self.net = module.score_net
        self.features = str(module.hparams.meta["context_features"])
        self.steps = int(cfg.steps)
        self.kappa = None if cfg.kappa is None else float(cfg.kappa)
        self.embed = _euclid_table(session, module)  # (V, d) x_0 of every token, as in training
        self.embed_sq = 0.5 * self.embed.square().sum(-1)  # (V,)
        self.fast = FastNet.matches(self.net, session.dtype)
        self._time_cache: dict[float, list[Tensor]] = {}
        tau_end = float(self.sde.T - self.sde.t_eps)
        self.grid = [tau_end * k / self.steps for k in range(self.steps + 1)]

    @classmethod
    def validate(cls, cfg: Any) -> None:
        _check_steps(cfg)
        if cfg.kappa is not None and not cfg.kappa > 0:
            raise SampleError(f"sampler.kappa={cfg.kappa}: must be > 0 (or null for nearest-embedding rounding)")

    @property
    def label(self) -> str:
        return f"euclid_ddpm(steps={self.steps})"

    @property
    def sde_steps(self) -> int:
        return self.steps

    def integrate(self, field: Tensor, hidden: Tensor, generator: torch.Generator) -> Tensor:
        """x_0 (B, d) by Ito Euler-Maruyama on the reverse VP-SDE (tau = T - t)."""
        from spindiff.data import context_features
        from spindiff.euclid import make_eps_fn

        context = context_features(field, hidden, self.features)
        eps_fn = FastNet(self.net, context, self._time_cache) if self.fast else make_eps_fn(self.net, context)
        rev = self.sde.reverse(eps_fn)
        B, d = field.shape
        x = torch.randn(B, d, dtype=field.dtype, device=field.device, generator=generator)
        with small_op_threads(B):
            for a, b in zip(self.grid[:-1], self.grid[1:]):
                tau = torch.full((B,), a, dtype=x.dtype, device=x.device)
                dw = torch.randn(B, d, dtype=x.dtype, device=x.device, generator=generator) * math.sqrt(b - a)
                x = x + rev.f(tau, x) * (b - a) + rev.g(tau, x) * dw  # (B, d)
        return x

    @torch.no_grad()
    def propose_from(self, field, hidden, generator):
        x = self.integrate(field, hidden, generator)  # (B, d)
        scores = x @ self.embed.T - self.embed_sq[None, :]  # (B, V) = -|x - e|^2/2 + const
        if self.kappa is None:
            ids = scores.argmax(-1)
        else:
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ids = torch.multinomial(torch.softmax(self.kappa * unit @ self.session.token_table.T, -1), 1,
                                    generator=generator).squeeze(-1)
        # diagnostics in the same units as the sphere samplers: cosine to the unit token rows
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosines = unit @ self.session.token_table.T  # (B, V)
        c = cosines.gather(1, ids[:, None]).squeeze(-1)
        top2 = scores.topk(2, dim=-1)
        other = torch.where(ids == top2.indices[:, 0], top2.indices[:, 1], top2.indices[:, 0])
        margin = c - cosines.gather(1, other[:, None]).squeeze(-1)
        return ids, c, margin


def _euclid_table(session: GenerationSession, module: Any) -> Tensor:
    """The clean points x_0 of every token, as the Euclidean DDPM was trained on them: the
    objective's map from unit spins to x_0 (``sqrt(d) S_0`` for
    :class:`spindiff.lightning_module.EuclidDDPMObjective`), applied to the unit token rows. (V, d)."""
    to_x0 = getattr(module.objective, "_x0", None)
    if to_x0 is None:  # fall back to the documented convention
        return session.token_table * math.sqrt(session.dim)
    return to_x0({"spin": session.token_table}).detach()


@register_sampler("ar")
class ARSampler(Sampler):
    """The LM's own sampling through ``model.generate`` (temperature, top-p; temperature 0 = greedy)."""

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
        logits = warp_logits(out.logits.float(), float(self.cfg.temperature), float(self.cfg.top_p))  # (B, V)
        return torch.multinomial(torch.softmax(logits, -1), n, replacement=True, generator=generator)  # (B, n)

    @torch.no_grad()
    def generate(self, ids, mask, max_new_tokens, generator, stop_at_eos=True, on_token=None):
        sess = self.session
        B = ids.shape[0]
        greedy = float(self.cfg.temperature) <= 0
        # generate draws from the global RNG: seed it from our generator for reproducibility
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
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
            kw["streamer"] = _CallbackStreamer(on_token)
        t0 = time.perf_counter()
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


class _CallbackStreamer:
    """A minimal ``generate`` streamer that forwards each new token to ``on_token(i, ids (1,))``."""

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


def _check_steps(cfg: Any) -> None:
    if int(cfg.steps) < 1:
        raise SampleError(f"sampler.steps={cfg.steps}: the reverse SDE needs at least 1 step per token; "
                          "e.g. sampler.steps=20")


# --------------------------------------------------------------------------- checkpoints
def find_checkpoint(session: GenerationSession, objective: str, root: str | Path = "runs/train") -> tuple[Optional[str], list[str]]:
    """Newest ``<root>/*/checkpoints/last.ckpt`` usable with ``session``'s model for ``objective``.

    Returns (path or None, notes on checkpoints skipped and why).
    """
    from spindiff.checkpoint import CheckpointError, load_checkpoint

    notes: list[str] = []
    cands = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in cands:
        try:
            ck = load_checkpoint(p, expect_model=session.name, expect_dim=session.dim)
        except CheckpointError as e:
            notes.append(f"skipped {p}: {str(e).split(';')[0]}")
            continue
        obj = ck["hyper_parameters"]["meta"]["objective"]
        if obj != objective:
            notes.append(f"skipped {p}: objective {obj}, need {objective}")
            continue
        return str(p), notes
    return None, notes


def build_sampler(cfg: Any, session: GenerationSession, ckpt: Optional[str] = None,
                  ckpt_root: str | Path = "runs/train") -> Sampler:
    """The sampler ``cfg.sampler.name`` for a SampleConfig ``cfg`` (validated; ``SampleError``).

    ``ckpt`` overrides ``cfg.ckpt``: ``auto`` (newest compatible checkpoint under ``ckpt_root``,
    else none with a notice), ``none`` or a path (validated against the session's model and d).
    """
    from spindiff.checkpoint import CheckpointError

    scfg = cfg.sampler
    cls = get_sampler_class(scfg.name)
    cls.validate(scfg)
    spec = str(cfg.ckpt if ckpt is None else ckpt)
    module, path = None, None
    if cls.needs_checkpoint != "never":
        if spec == "auto":
            key = (cls.objective or "", str(Path(ckpt_root).resolve()))
            if key not in session.auto_ckpt:  # resolved once per session (sweeps build many samplers)
                path, notes = find_checkpoint(session, cls.objective or "", ckpt_root)
                for n in notes:
                    print(f"note: {n}", flush=True)
                session.auto_ckpt[key] = path
            path = session.auto_ckpt[key]
            if path is None:
                if cls.needs_checkpoint == "required":
                    raise SampleError(f"sampler.name={scfg.name} needs a checkpoint (objective={cls.objective}, model "
                                      f"{session.name}) and none was found under {ckpt_root}/*/checkpoints/last.ckpt; "
                                      f"train one with `python train.py objective={cls.objective} "
                                      f"model.name={session.name}` or pass ckpt=PATH")
                print(f"notice: no {cls.objective} checkpoint for {session.name} under {ckpt_root}/; "
                      "running the field-only sampler (no learned residual)", flush=True)
            else:
                print(f"notice: ckpt=auto -> {path}", flush=True)
        elif spec not in ("none", "", "null"):
            path = spec
        elif cls.needs_checkpoint == "required":
            raise SampleError(f"sampler.name={scfg.name} needs a checkpoint; ckpt=none is not possible. Train one "
                              f"with `python train.py objective={cls.objective}` and pass ckpt=PATH or ckpt=auto")
        if path is not None:
            try:
                module = session.score_module(path)
            except CheckpointError as e:
                raise SampleError(f"ckpt={path}: {e}") from None
            obj = module.hparams.meta["objective"]
            if obj != cls.objective:
                raise SampleError(f"ckpt={path} was trained with objective={obj} but sampler.name={scfg.name} needs "
                                  f"objective={cls.objective}; use sampler.name="
                                  f"{'euclid_ddpm' if obj == 'euclid_ddpm' else 'spin'} or a matching checkpoint")
    if cls is SpinSampler and module is None and float(scfg.eta) == 0:
        raise SampleError("sampler.eta=0 with no checkpoint leaves no drift at all (the spin stays uniform noise); "
                          "use sampler.eta>0 for the field-only sampler or give a trained checkpoint (ckpt=PATH)")
    kwargs = {"sde_cfg": cfg.sde} if cls.uses_steps else {}
    return cls(session, scfg, cfg.field, module=module, ckpt_path=path, **kwargs)
