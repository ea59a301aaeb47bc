#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow tests included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests never touch $HOME: tests/conftest.py points SPINDIFF_CACHE, MPLCONFIGDIR, HF_HOME and W&B's
# folders at a session folder (the user's dequantised SmolLM2 is linked in read-only if present), and
# with this variable a change under $HOME fails the run
export SPINDIFF_TEST_HOME_CHECK=1
# pytest's tmp_path folders under a root of this run only: concurrent pytest runs of the same user
# otherwise prune each other's /tmp/pytest-of-$USER/pytest-N (cwd and files vanish mid-test)
if [ -z "${PYTEST_DEBUG_TEMPROOT:-}" ]; then
  PYTEST_DEBUG_TEMPROOT=$(mktemp -d)
  export PYTEST_DEBUG_TEMPROOT
  trap 'rm -rf "$PYTEST_DEBUG_TEMPROOT"' EXIT
fi
python -m pytest -q -rs "$@"
