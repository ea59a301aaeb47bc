"""Fit the residual score of attention-guided spherical diffusion (thin CLI over spindiff.training.train).

    python train.py                                  # SmolLM2-135M (bundled, offline); docs/training.md for times
    python train.py trainer.max_steps=20 out=DIR     # any key=value override (see --help)
    python train.py experiment=quick                 # tiny model, seconds
    python train.py experiment=euclid_ddpm           # Euclidean DDPM baseline
"""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from spindiff.config import parse_cli

USAGE = """usage: python train.py [key=value ...] [experiment=NAME] [config=FILE]

Trains the residual score network on (context, next token) pairs and writes
out/checkpoints/{best,last}.ckpt (self-describing: sample.py needs only the file),
out/csv/v0/metrics.csv, W&B logs (offline unless a key is configured) and out/results.json.
An interrupted run continues from out/checkpoints/last.ckpt (resume=true)."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_cli("train", argv, USAGE)
    from spindiff.config import ConfigError
    from spindiff.checkpoint import CheckpointError
    from spindiff.training.train import train

    try:
        results = train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from spindiff.training.train import _rank

    if _rank() != 0:  # DDP child processes: rank 0 reports
        return results
    m = results["metrics"]
    summary = {"out": results["paths"]["out"], "checkpoint": results["paths"]["best"] or results["paths"]["last"],
               "steps": results["global_step"], "wall_s": results["wall_s"],
               "train_loss": [m["train_loss_start"], m["train_loss_end"]],
               "val_loss": [m["val_start"].get("val/loss"), m["val_end"].get("val/loss")]}
    print(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    main()
