"""Training data for the residual score: (context, next token) pairs with cached LM features.

Sequences
---------
``data.source=lm`` (default, works offline on the bundled model): ``data.n_sequences``
continuations of ``data.seq_len`` new tokens are sampled from the language model itself
(``model.generate``, batched with left padding, seeded by ``data.seed``) from a built-in list of
diverse seed prompts (:data:`DEFAULT_PROMPTS`, or ``data.prompts=FILE`` with one prompt a line).
A continuation stops after the first end-of-sequence token. ``data.source=file``: the text of
``data.path`` is tokenised and cut into chunks of ``data.seq_len`` tokens.

Pairs and features
------------------
Every position p >= 1 of every sequence x_0..x_{L-1} gives one pair: context x_0..x_{p-1},
target x_p. For each pair we store

    field  (N, D) float32  N: the context field at the last context position (sum over the
                           selected heads, as :class:`spindiff.lm.field.ContextFieldProvider`)
    hidden (N, D) float32  h: the final hidden state (after the final norm) at that position
    spin   (N, D) float32  S_0: the unit-normalised unembedding row of the target token
    token  (N,)   int64    the target token id
    seq    (N,)   int32    sequence index (train/val split is by sequence)
    pos    (N,)   int32    p

and ``token_table`` (V, D) float32, the unit unembedding rows (nearest-token decoding by one
matmul). The in_situ field of *all* positions of a sequence comes from one forward pass: z at
every position from :meth:`ArchitectureAdapter.capture_z`, per-head outputs through W_O, the
frozen final-norm scale of each position (:meth:`ArchitectureAdapter.final_norm_scale`); causal
attention makes position p-1 of the full sequence identical to the last position of the prefix
(tests/test_data.py checks this against the provider run per prefix). The ``paper`` protocols
have no LM forward to share and use the provider on every prefix.

Cache
-----
Features are computed once and written as memory-mapped ``.npy`` files
(``np.lib.format.open_memmap``) under ``<data.cache_dir or model cache root/features>/<key>/``,
where the key hashes the model, field and data settings (not the batch size or the split).
The directory is built under a temporary name and renamed when complete (atomic), under a file
lock so concurrent ranks build it once. Epochs never run the LM again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from spindiff.lm.field import ContextFieldProvider, last_positions
from spindiff.score.features import CONTEXT_FEATURES, context_dim, context_features  # noqa: F401

FEATURE_VERSION = 1
ARRAYS = ("field", "hidden", "spin", "token", "seq", "pos")

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The mitochondria is the powerhouse of the cell. It",
    "To make a simple tomato sauce, first",
    "Dear hiring manager, I am writing to apply for",
    "The stock market fell sharply on Monday after",
    "Photosynthesis converts light energy into",
    "In 1969, Neil Armstrong became the first person to",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The rain had not stopped for three days, and",
    "Lions are carnivores. Cows are herbivores. Bears are",
    "Here is a list of the planets in our solar system:",
    "The theorem states that for every prime number p,",
    "My favourite thing about autumn is",
    "SELECT name, age FROM users WHERE",
    "The French Revolution began in 1789 when",
    "A good night's sleep is important because",
    "The recipe calls for two cups of flour, one egg and",
    "Machine learning models are trained by",
    "She opened the old wooden box and found",
    "The weather forecast for tomorrow predicts",
    "Water is made of hydrogen and oxygen. Salt is made of",
    "In the beginning of the twentieth century, the city of",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\n",
    "The best way to learn a new language is",
    "The football match ended in a draw after",
    "Dogs say woof, cats say meow, and cows say",
    "The human heart has four chambers:",
    "According to the latest report, unemployment",
    "He looked at the map and realised that",
    "One, two, three, four, five,",
)


# --------------------------------------------------------------------------- sequences
def load_prompts(spec: str = "") -> list[str]:
    """Seed prompts: ``""`` -> :data:`DEFAULT_PROMPTS`; else a file with one prompt a line."""
    if not spec:
        return list(DEFAULT_PROMPTS)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts={spec!r} is not a file (one seed prompt per line)")
    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts={spec!r} has no non-empty line")
    return prompts


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists -> ids (B, T) int64 and attention mask (B, T) int64."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample_lm_sequences(model: Any, tokenizer: Any, prompts: Sequence[str], n: int, new_tokens: int,
                        seed: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                        batch_size: int = 32, progress: bool = True) -> list[list[int]]:
    """Sample ``n`` continuations of ``new_tokens`` tokens from the LM (prompt i % len(prompts)).

    Batched with left padding; batch k is seeded with ``seed * 1_000_003 + k`` inside a forked RNG
    (the global RNG is untouched). Each returned sequence is prompt tokens + continuation, cut
    after the first end-of-sequence token. Returns n token-id lists.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    window = int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0) or 0)
    longest = max(len(e) for e in encoded)
    if window and longest + new_tokens > window:
        raise ValueError(f"data.seq_len={new_tokens} + longest prompt ({longest} tokens) exceeds the "
                         f"model's context window {window}; lower data.seq_len")
    out: list[list[int]] = []
    batches = range(0, n, batch_size)
    for k, start in enumerate(tqdm(batches, desc="sampling sequences from the LM", disable=not progress)):
        idx = list(range(start, min(n, start + batch_size)))
        ids, mask = left_pad([encoded[i % len(encoded)] for i in idx], pad)
        kw: dict[str, Any] = dict(do_sample=temperature > 0, max_new_tokens=new_tokens, pad_token_id=pad,
                                  eos_token_id=eos)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + k)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        gen = gen.cpu()
        T = ids.shape[1]
        for row, i in enumerate(idx):
            prompt = encoded[i % len(encoded)]
            cont = gen[row, T:].tolist()
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out.append(list(prompt) + cont)
    return out


def file_sequences(tokenizer: Any, path: str, seq_len: int, n: int = 0) -> list[list[int]]:
    """Tokenise a UTF-8 text file and cut it into chunks of ``seq_len`` tokens (the last chunk
    may be shorter, >= 2 tokens). ``n`` > 0 keeps the first n chunks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.source=file needs data.path=FILE; '{path}' is not a file")
    ids = tokenizer(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    if n > 0:
        chunks = chunks[:n]
    if not chunks:
        raise ValueError(f"'{path}' holds fewer than 2 tokens")
    return chunks


def build_sequences(cfg: Any, lm: Any, progress: bool = True) -> list[list[int]]:
    """Sequences for ``cfg.data`` (a TrainConfig or DictConfig) from the loaded model ``lm``."""
    d = cfg.data
    if d.source == "lm":
        return sample_lm_sequences(lm.model, lm.tokenizer, load_prompts(d.prompts), d.n_sequences, d.seq_len,
                                   d.seed, d.temperature, d.top_p, d.gen_batch_size, progress)
    if d.source == "file":
        return file_sequences(lm.tokenizer, d.path, d.seq_len, d.n_sequences)
    raise ValueError(f"data.source={d.source!r}: use lm or file")


# --------------------------------------------------------------------------- features
def unit_rows(weight: Tensor) -> Tensor:
    """Rows scaled to unit norm: (V, D) -> (V, D)."""
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _no_logits(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model supports it: features need no vocabulary projection
    at every position (~20% of SmolLM2's forward)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def sequence_features(provider: ContextFieldProvider, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """In-situ field and hidden state at EVERY position, from one forward pass.

    input_ids, attention_mask: (B, T), left padding. Returns field (B, T, D) (unit when
    ``provider.normalize``) and hidden (B, T, D); position j equals the provider's output for the
    prefix ending at j. Padding positions hold garbage.
    """
    if provider.protocol != "in_situ":
        raise ValueError("sequence_features computes the in_situ protocol; use prefix_features for paper")
    ad, model = provider.adapter, provider.model
    by_layer: dict[int, list[int]] = {}
    for l, h in provider.heads:
        by_layer.setdefault(l, []).append(h)
    resid: dict[str, Tensor] = {}
    hook = ad.final_norm().register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0].detach()))
    try:
        with ad.capture_z(sorted(by_layer)) as zs:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=last_positions(attention_mask),
                  use_cache=False, **_no_logits(model))
    finally:
        hook.remove()
    total = None
    for l, heads in by_layer.items():
        W_O = ad.layer_weights(l).W_O[heads].detach()  # (K_l, dh, D)
        part = torch.einsum("btkc,kcd->btd", zs[l][:, :, heads].to(W_O.dtype), W_O)  # (B, T, D)
        total = part if total is None else total + part
    x = resid["x"]  # (B, T, D) residual stream entering the final norm
    hidden = ad.final_norm()(x)  # (B, T, D)
    if provider.final_norm:
        scale, center = ad.final_norm_scale(x)  # (B, T, D)
        if center:
            total = total - total.mean(-1, keepdim=True)
        total = total * scale
    if provider.normalize:
        total = total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return total, hidden


@torch.no_grad()
def prefix_features(provider: ContextFieldProvider, sequences: Sequence[Sequence[int]], seq_idx: Sequence[int],
                    pos: Sequence[int], pad_id: int, hidden_fallback: bool = True) -> tuple[Tensor, Tensor]:
    """Field and hidden state for the pairs (seq_idx[i], pos[i]) by running the provider on each
    prefix ``sequences[seq_idx[i]][:pos[i]]`` (one batched, left-padded forward).

    This is the per-batch recompute path (benchmark baseline, paper protocols, reference in
    tests). Returns field (n, D) and hidden (n, D) (for the paper protocol, which has no hidden
    state, the model's final hidden state from a plain forward when ``hidden_fallback``).
    """
    prefixes = [list(sequences[s][:p]) for s, p in zip(seq_idx, pos)]
    ids, mask = left_pad(prefixes, pad_id)
    device = next(provider.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = provider(ids, mask)
    hidden = out.hidden
    if hidden is None and hidden_fallback:
        ad = provider.adapter
        resid: dict[str, Tensor] = {}
        hook = ad.final_norm().register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0][:, -1].detach()))
        try:
            provider.model(input_ids=ids, attention_mask=mask, position_ids=last_positions(mask), use_cache=False,
                           **_no_logits(provider.model))
        finally:
            hook.remove()
        hidden = ad.final_norm()(resid["x"])
    return out.field, hidden


def pair_index(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(seq, pos) of every pair: positions 1..L-1 of every sequence. Two (N,) int32 arrays."""
    seq = np.concatenate([np.full(max(L - 1, 0), i, dtype=np.int32) for i, L in enumerate(lengths)])
    pos = np.concatenate([np.arange(1, L, dtype=np.int32) for L in lengths if L > 1])
    return seq, pos


def _allocate(directory: Path | None, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, np.ndarray]:
    if directory is None:
        return {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in shapes.items()}
    return {k: np.lib.format.open_memmap(directory / f"{k}.npy", mode="w+", dtype=dt, shape=shape)
            for k, (shape, dt) in shapes.items()}


@torch.no_grad()
def compute_features(provider: ContextFieldProvider, sequences: Sequence[Sequence[int]], pad_id: int,
                     directory: Path | None = None, batch_size: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every pair of ``sequences`` (see the module docstring), written into
    memory-mapped .npy files in ``directory`` (or in-memory arrays when ``None``).

    in_situ: one forward per batch of ``batch_size`` whole sequences. paper protocols: the
    provider on every prefix. Returns the arrays (``ARRAYS`` + ``token_table``).
    """
    from tqdm.auto import tqdm

    model = provider.model
    lengths = [len(s) for s in sequences]
    seq, pos = pair_index(lengths)
    n = int(seq.shape[0])
    if n == 0:
        raise ValueError("no (context, next token) pair: every sequence has fewer than 2 tokens")
    D = provider.dim
    table = unit_rows(provider.adapter.unembedding().detach().float())  # (V, D)
    V = table.shape[0]
    arrays = _allocate(directory, {
        "field": ((n, D), np.float32), "hidden": ((n, D), np.float32), "spin": ((n, D), np.float32),
        "token": ((n,), np.int64), "seq": ((n,), np.int32), "pos": ((n,), np.int32),
        "token_table": ((V, D), np.float32)})
    arrays["seq"][:] = seq
    arrays["pos"][:] = pos
    tokens = np.array([sequences[s][p] for s, p in zip(seq, pos)], dtype=np.int64)
    arrays["token"][:] = tokens
    arrays["token_table"][:] = table.cpu().numpy()
    arrays["spin"][:] = table[torch.from_numpy(tokens)].cpu().numpy()
    device = next(model.parameters()).device
    starts = np.concatenate([[0], np.cumsum([max(L - 1, 0) for L in lengths])])  # first pair row of each sequence
    with tqdm(total=n, desc="context features", disable=not progress, unit="pair") as bar:
        if provider.protocol == "in_situ":
            for b in range(0, len(sequences), batch_size):
                chunk = list(range(b, min(len(sequences), b + batch_size)))
                ids, mask = left_pad([sequences[i] for i in chunk], pad_id)
                field, hidden = sequence_features(provider, ids.to(device), mask.to(device))  # (B, T, D)
                T = ids.shape[1]
                for row, i in enumerate(chunk):
                    L = lengths[i]
                    if L < 2:
                        continue
                    cols = slice(T - L, T - 1)  # context ends at positions 0..L-2 of the sequence
                    rows = slice(int(starts[i]), int(starts[i + 1]))
                    arrays["field"][rows] = field[row, cols].float().cpu().numpy()
                    arrays["hidden"][rows] = hidden[row, cols].float().cpu().numpy()
                    bar.update(L - 1)
        else:
            step = max(1, batch_size * 8)
            for b in range(0, n, step):
                sl = slice(b, min(n, b + step))
                field, hidden = prefix_features(provider, sequences, seq[sl], pos[sl], pad_id)
                arrays["field"][sl] = field.float().cpu().numpy()
                arrays["hidden"][sl] = hidden.float().cpu().numpy()
                bar.update(sl.stop - sl.start)
    for a in arrays.values():
        if isinstance(a, np.memmap):
            a.flush()
    return arrays


# --------------------------------------------------------------------------- cache
def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else (
        {k: _plain(v) for k, v in vars(x).items()} if hasattr(x, "__dataclass_fields__") else x)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def feature_key(cfg: Any) -> dict[str, Any]:
    """Everything the cached features depend on (model, field config, data settings)."""
    m, f, d = _plain(cfg.model), _plain(cfg.field), _plain(cfg.data)
    key: dict[str, Any] = {
        "version": FEATURE_VERSION,
        "model": {k: m.get(k) for k in ("name", "dtype", "revision", "tiny_seed", "fallback")},
        "field": {k: f.get(k) for k in ("heads", "protocol", "normalize", "final_norm")},
        "data": {k: d.get(k) for k in ("source", "seq_len", "n_sequences")},
    }
    if f.get("heads", "").startswith("topk:") and f.get("report"):
        key["field"]["report"] = _file_digest(f["report"]) if Path(f["report"]).is_file() else f["report"]
    if d["source"] == "lm":
        key["data"].update({k: d.get(k) for k in ("seed", "temperature", "top_p", "gen_batch_size")})
        key["data"]["prompts"] = _file_digest(d["prompts"]) if d.get("prompts") and Path(d["prompts"]).is_file() else d.get("prompts", "")
    else:
        key["data"]["path"] = str(Path(d["path"]).resolve()) if d.get("path") else ""
        key["data"]["content"] = _file_digest(d["path"]) if d.get("path") and Path(d["path"]).is_file() else None
    return key


def feature_cache_dir(cfg: Any) -> Path:
    """``<data.cache_dir or model cache root/features>/<model>-<hash of feature_key>``."""
    from spindiff.lm.models import cache_root

    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else cache_root(cfg.model.cache_dir) / "features"
    digest = hashlib.sha256(json.dumps(feature_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(cfg.model.name))[-40:]
    return root / f"{slug}-{digest}"


@dataclass
class FeatureStore:
    """Cached pair features: arrays (memmaps or in memory) and their description.

    arrays: ``field``/``hidden``/``spin`` (N, D) float32, ``token`` (N,) int64, ``seq``/``pos``
    (N,) int32, ``token_table`` (V, D) float32. meta: n, dim, vocab_size, model info, key, ...
    directory: where the memmaps live (``None`` for in-memory stores).
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    directory: Path | None = None

    @property
    def n(self) -> int:
        return int(self.meta["n_pairs"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "FeatureStore":
        """Open a complete cache directory read-only (memory-mapped)."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in (*ARRAYS, "token_table")}
        return cls(arrays, meta, directory)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Train / val pair indices, split by SEQUENCE (seeded). Two sorted int64 arrays."""
        n_seq = int(self.meta["n_sequences"])
        n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n_seq)))
        if n_val >= n_seq:
            raise ValueError(f"data.val_fraction={val_fraction} leaves no training sequence out of {n_seq}; "
                             "lower it or raise data.n_sequences")
        val_seqs = np.random.default_rng(seed).permutation(n_seq)[:n_val]
        is_val = np.isin(np.asarray(self.arrays["seq"]), val_seqs)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@contextlib.contextmanager
def _file_lock(path: Path, what: str = "") -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``); says so when it has to wait for another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building {what or path} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(cfg: Any, lm: Any, directory: Path | None, progress: bool) -> FeatureStore:
    t0 = time.perf_counter()
    sequences = build_sequences(cfg, lm, progress)
    t_seq = time.perf_counter() - t0
    provider = ContextFieldProvider.from_config(cfg.field, lm.model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    arrays = compute_features(provider, sequences, pad, directory, cfg.data.feature_batch_size, progress)
    meta = {
        "version": FEATURE_VERSION, "key": feature_key(cfg), "n_pairs": int(arrays["token"].shape[0]),
        "n_sequences": len(sequences), "dim": provider.dim, "vocab_size": int(arrays["token_table"].shape[0]),
        "n_heads_in_field": len(provider.heads), "model": lm.info, "model_name": lm.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sequence_seconds": round(t_seq, 2),
        "feature_seconds": round(time.perf_counter() - t0 - t_seq, 2),
    }
    if directory is not None:
        np.save(directory / "sequences.npy", np.array([t for s in sequences for t in s], dtype=np.int64))
        np.save(directory / "offsets.npy", np.cumsum([0] + [len(s) for s in sequences]).astype(np.int64))
        try:
            (directory / "samples.txt").write_text("\n\n---\n\n".join(lm.tokenizer.decode(s) for s in sequences[:16]))
        except Exception:  # decoding is only for humans
            pass
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return FeatureStore(arrays, meta, directory)


def load_or_build_features(cfg: Any, lm_loader: Callable[[], Any], progress: bool = True) -> tuple[FeatureStore, bool]:
    """The feature store for ``cfg``: opened from the cache, or built (loading the LM with
    ``lm_loader()`` only then). ``data.cache=false`` builds in memory every call.

    Returns (store, cache_hit).
    """
    if not cfg.data.cache:
        return _build(cfg, lm_loader(), None, progress), False
    target = feature_cache_dir(cfg)
    if (target / "meta.json").exists():
        return FeatureStore.open(target), True
    with _file_lock(target.parent / f".{target.name}.lock", f"the feature cache {target}"):
        if (target / "meta.json").exists():  # another process built it while we waited
            return FeatureStore.open(target), True
        for stale in target.parent.glob(f".{target.name}.*"):  # left by a killed build (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            store = _build(cfg, lm_loader(), tmp, progress)
            del store
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return FeatureStore.open(target), False


# --------------------------------------------------------------------------- torch data
class PairDataset(Dataset):
    """Map-style dataset over the pairs ``indices`` of a :class:`FeatureStore`.

    ``dataset[i]`` is one pair; the DataLoader fetches whole batches through ``__getitems__``
    (one fancy-index read per array). A batch is a dict: ``field``, ``hidden``, ``spin`` (B, D)
    float32 and ``token`` (B,) int64. Memory maps are reopened lazily in worker processes.
    """

    def __init__(self, store: FeatureStore, indices: np.ndarray) -> None:
        self.directory = store.directory
        self._arrays: dict[str, np.ndarray] | None = None if store.directory is not None else store.arrays
        self.indices = np.asarray(indices, dtype=np.int64)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(self.directory / f"{k}.npy", mmap_mode="r")
                            for k in ("field", "hidden", "spin", "token")}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.directory is not None:
            state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitems__(self, items: Sequence[int]) -> dict[str, Tensor]:
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        a = self.arrays
        return {k: torch.from_numpy(np.ascontiguousarray(a[k][rows])) for k in ("field", "hidden", "spin", "token")}

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def collate_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch already is a dict of stacked tensors (``PairDataset.__getitems__``)."""
    return batch


class EpochSampler(Sampler[int]):
    """Deterministic, rank-sharded order: epoch e uses a permutation seeded by (seed, e).

    With ``num_replicas`` ranks the permutation is padded by wrapping to a multiple of the
    world size and rank r takes items r, r + R, ... (equal length on every rank). ``start``
    skips the first items of the next iteration once (mid-epoch resume).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / max(self.n, 1)))[:total]
        mine = order[self.rank::self.num_replicas]
        start, self.start = self.start, 0
        return iter(mine[start:])


class ResumableDataLoader(DataLoader):
    """DataLoader whose position inside the epoch goes into Lightning checkpoints.

    Lightning 2.x saves ``state_dict()`` of loaders that have one and calls ``load_state_dict``
    on resume, so a run interrupted mid-epoch continues with exactly the batches it had not seen
    (the sampler must be an :class:`EpochSampler`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("ResumableDataLoader needs an EpochSampler")
        self._batches = 0
        self._resume_batches = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._resume_batches = self._resume_batches, 0
        self.sampler.start = skip * (self.batch_size or 1)
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1  # counted before the batch is handed over (Lightning does not prefetch sized loaders)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        done = int(state["batches"])
        self._resume_batches = 0 if done >= len(self) else done


class PairDataModule(L.LightningDataModule):
    """Train/val loaders over a :class:`FeatureStore` (split by sequence).

    Args:
        store: the features (from :func:`load_or_build_features`).
        data_cfg: ``DataConfig`` (batch_size, num_workers, val_fraction, seed).
        seed: shuffling seed (the training seed).
    """

    def __init__(self, store: FeatureStore, data_cfg: Any, seed: int = 0) -> None:
        super().__init__()
        self.store = store
        self.batch_size = int(data_cfg.batch_size)
        self.num_workers = int(data_cfg.num_workers)
        self.seed = int(seed)
        self.train_idx, self.val_idx = store.split(float(data_cfg.val_fraction), int(data_cfg.seed))

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (int(t.world_size), int(t.global_rank)) if t is not None else (1, 0)

    def _loader(self, idx: np.ndarray, shuffle: bool) -> DataLoader:
        world, rank = self._rank()
        sampler = EpochSampler(len(idx), self.seed, shuffle, world, rank)
        cls = ResumableDataLoader if shuffle else DataLoader
        return cls(PairDataset(self.store, idx), batch_size=self.batch_size, sampler=sampler,
                   collate_fn=collate_batch, num_workers=self.num_workers,
                   persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if len(self.val_idx) == 0:
            return []
        return self._loader(self.val_idx, shuffle=False)
