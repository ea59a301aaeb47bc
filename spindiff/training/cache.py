"""Cached training features: (context, next token) pairs of LM sequences, memory-mapped on disk.

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

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from spindiff.lm.field import ContextFieldProvider
from spindiff.runtime import atomic_directory, file_lock
from spindiff.training.features import ARRAYS, FEATURE_VERSION, TARGET_ARRAYS, compute_features
from spindiff.training.sequences import build_sequences


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def feature_key(cfg: DictConfig) -> dict[str, Any]:
    """Everything the cached features of the train config ``cfg`` depend on (model, field config, data
    settings)."""
    m, f, d = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "field", "data"))
    key: dict[str, Any] = {
        "version": FEATURE_VERSION,
        "model": {k: m.get(k) for k in ("name", "dtype", "revision", "tiny_seed", "fallback")},
        "field": {k: f.get(k) for k in ("heads", "protocol", "normalize", "final_norm")},
        "data": {k: d.get(k) for k in ("source", "seq_len", "n_sequences", "targets_k")},
    }
    if f.get("heads", "").startswith("topk:") and f.get("report"):
        key["field"]["report"] = _file_digest(f["report"]) if Path(f["report"]).is_file() else f["report"]
    if d["source"] == "lm":
        key["data"].update({k: d.get(k) for k in ("seed", "temperature", "top_p", "gen_batch_size")})
        prompts = d.get("prompts")
        key["data"]["prompts"] = _file_digest(prompts) if prompts and Path(prompts).is_file() else d.get("prompts", "")
    else:
        key["data"]["path"] = str(Path(d["path"]).resolve()) if d.get("path") else ""
        key["data"]["content"] = _file_digest(d["path"]) if d.get("path") and Path(d["path"]).is_file() else None
    return key


def feature_cache_dir(cfg: DictConfig) -> Path:
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
        names = [*ARRAYS, *(k for k in TARGET_ARRAYS if (directory / f"{k}.npy").exists())]
        arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in names}
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


def _build(cfg: DictConfig, lm: Any, directory: Path | None, progress: bool) -> FeatureStore:
    t0 = time.perf_counter()
    sequences = build_sequences(cfg, lm, progress)
    t_seq = time.perf_counter() - t0
    provider = ContextFieldProvider.from_config(cfg.field, lm.model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    arrays = compute_features(provider, sequences, pad, directory, cfg.data.feature_batch_size, progress,
                              int(cfg.data.targets_k))
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


def load_or_build_features(cfg: DictConfig, lm_loader: Callable[[], Any],
                           progress: bool = True) -> tuple[FeatureStore, bool]:
    """The feature store for ``cfg``: opened from the cache, or built (loading the LM with
    ``lm_loader()`` only then). ``data.cache=false`` builds in memory every call.

    Returns (store, cache_hit).
    """
    if not cfg.data.cache:
        return _build(cfg, lm_loader(), None, progress), False
    target = feature_cache_dir(cfg)
    if (target / "meta.json").exists():
        return FeatureStore.open(target), True
    with file_lock(target.parent / f".{target.name}.lock", f"the feature cache {target}"):
        if (target / "meta.json").exists():  # another process built it while we waited
            return FeatureStore.open(target), True
        with atomic_directory(target) as tmp:
            store = _build(cfg, lm_loader(), tmp, progress)
            del store
    return FeatureStore.open(target), False


