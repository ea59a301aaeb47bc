"""The generation session (a loaded LM, its field providers, the unit token table, loaded
checkpoints) and the per-batch result every sampler returns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from spindiff.lm.adapter import get_adapter
from spindiff.lm.field import ContextFieldProvider
from spindiff.lm.tokens import pad_left
from spindiff.lm.models import LoadedModel, context_window, load_model
from spindiff.generation.decoding import coarse_table


DIAG_KEYS = ("cos", "margin", "field_norm", "lm_logprob", "field_cos_prev", "post_p", "dropped_mass")


class SampleError(ValueError):
    """Bad input to sampling (config, prompt, checkpoint); the message names the problem and the fix."""


# --------------------------------------------------------------------------- helpers
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
        self.adapter = get_adapter(self.model)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        W = self.adapter.unembedding().detach()  # (V, d)
        self.token_table = (W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)).contiguous()  # (V, d) unit rows
        self.coarse_table = coarse_table(self.token_table)  # (V, d) bfloat16 for the nearest-token search, or None
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
        from spindiff.score.build import load_score

        path = str(path)
        if path not in self._modules:
            module = load_score(path, expect_model=self.lm.name, expect_dim=self.dim)
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
        return pad_left(seqs, self.pad_id, self.device)
