"""Fit the residual score of attention-guided spherical diffusion (thin CLI over spindiff.training.train).

    python train.py                                  # SmolLM2-135M (bundled, offline); docs/training.md for times
    python train.py trainer.max_steps=20 out=DIR     # any key=value override (see --help)
    python train.py experiment=quick                 # tiny model, seconds
    python train.py experiment=euclid_ddpm           # Euclidean DDPM baseline
"""
from __future__ import annotations

from typing import Any, Sequence

USAGE = """usage: python train.py [key=value ...] [experiment=NAME] [config=FILE]

Trains the residual score network on (context, next token) pairs and writes to out=DIR
(default runs/train/<timestamp>, where `python sample.py ckpt=auto` looks):
  checkpoints/{best,last}.ckpt  self-describing: sample.py needs only the file
  metrics.csv                   the run's whole metric history, one row per logged step; after a
                                resume the rows the interruption lost are replaced and the
                                `segment` column counts the starts
  results.json, config.yaml, run.json, wandb/ (offline unless a W&B key is configured)
An interrupted run continues from out/checkpoints/last.ckpt (resume=true). With
trainer.enable_progress_bar=false it prints one progress line per print_every_n_steps steps.
Bad input prints `error: ...` and exits with status 2 before anything is loaded or written."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from spindiff.config import parse_cli

    cfg = parse_cli("train", argv, USAGE)  # --help; unknown keys and bad values: exit 2
    from spindiff.training.train import cli_run

    return cli_run(cfg)


if __name__ == "__main__":
    main()
