"""The metric history of a training run: ``out/metrics.csv``, one history across resumes.

:class:`HistoryLogger` is the Lightning logger that writes it (a resumed run drops the rows the
interruption lost, then appends; the ``segment`` column counts the starts); :func:`history` reads
it back; :class:`ProgressLines` prints one progress line per N steps when the progress bar is off.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger

from spindiff.runtime import atomic_write_text

__all__ = ["HistoryLogger", "ProgressLines", "history", "read_rows", "write_rows", "next_segment", "first_values"]


class HistoryLogger(Logger):
    """Lightning logger writing the run's ONE metric history, ``out/metrics.csv``.

    A resumed run (``start_step`` = the global step of the checkpoint it continues from) first
    drops the rows at steps >= ``start_step`` (the interrupted segment logged them after its last
    checkpoint; that work was lost and is redone), then appends. Every row carries ``segment``
    (0 for the first start, +1 per resume). Only rank 0 writes."""

    def __init__(self, path: Path, start_step: int | None = None, segment: int = 0) -> None:
        super().__init__()
        self.path, self.segment = Path(path), segment
        old = read_rows(self.path) if start_step is not None else []
        self.rows = [r for r in old if _step(r) < int(start_step or 0)]

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return self.segment

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # config.yaml holds the resolved config

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row: dict[str, Any] = {"step": int(step if step is not None else len(self.rows)), "segment": self.segment}
        row.update({k: float(v) for k, v in metrics.items()})
        self.rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        write_rows(self.path, self.rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _step(row: dict[str, Any]) -> int:
    return int(float(row.get("step") or 0))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv`` as dicts of their non-empty cells ([] when there is no file)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path`` atomically: columns step, segment, epoch, then the metrics sorted."""
    keys = ["step", "segment", "epoch"]
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    keys = keys[:3] + sorted(keys[3:])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def history(out: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a run's ``metrics.csv`` (the whole run, every segment)."""
    res: dict[str, list[tuple[int, float]]] = {}
    for row in read_rows(Path(out) / "metrics.csv"):
        for k, v in row.items():
            if k not in ("step", "epoch", "segment"):
                res.setdefault(k, []).append((_step(row), float(v)))
    return res


def next_segment(path: Path) -> int:
    """The ``segment`` number of a resumed run's rows: one more than the largest in ``path``."""
    return max([int(float(r.get("segment") or 0)) for r in read_rows(path)] + [-1]) + 1


class ProgressLines(Callback):
    """With the progress bar off: one line per ``every`` optimizer steps (and one per validation)
    on stderr, so a log shows the fit advancing (stdout carries only train.py's JSON summary)."""

    def __init__(self, every: int, max_steps: int) -> None:
        self.every, self.max_steps, self.t0, self.last, self.last_val = every, max_steps, time.perf_counter(), -1, -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step != self.last and step % self.every == 0:
            self.last = step
            loss = trainer.callback_metrics.get("train/loss")
            total = f"/{self.max_steps}" if self.max_steps > 0 else ""
            shown = f": train/loss {float(loss):.4g}" if loss is not None else ""
            print(f"step {step}{total}{shown} ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.global_step != self.last_val:
            self.last_val = trainer.global_step  # the final validation of the same weights is not news
            vals = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(vals.items()) if "noisy" not in k)
            if shown:
                print(f"step {trainer.global_step}: {shown}", file=sys.stderr, flush=True)


def first_values(hist: dict[str, list[tuple[int, float]]], prefix: str) -> dict[str, float]:
    """The first value of every metric of ``hist`` (:func:`history`) whose name starts with ``prefix``."""
    return {k: pts[0][1] for k, pts in hist.items() if k.startswith(prefix) and pts}
