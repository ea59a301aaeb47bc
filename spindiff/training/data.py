"""torch data over a :class:`spindiff.training.cache.FeatureStore`: the pair dataset and the
Lightning DataModule (split by sequence, resumable shuffling)."""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from spindiff.training.cache import FeatureStore
from spindiff.training.features import TARGET_ARRAYS

BATCH_KEYS = ("field", "hidden", "spin", "token")

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
        self.keys = BATCH_KEYS + tuple(k for k in TARGET_ARRAYS if k in store.arrays)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(self.directory / f"{k}.npy", mmap_mode="r") for k in self.keys}
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
        return {k: torch.from_numpy(np.ascontiguousarray(a[k][rows])) for k in self.keys}

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
