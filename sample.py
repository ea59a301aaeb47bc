"""Token-by-token generation: ``python sample.py [key=value ...]`` (thin CLI over spindiff.generation.sample)."""
from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: python sample.py [key=value ...]

Generate with a registered sampler (spin | ar | euclid_ddpm), token by token.
Examples:
  python sample.py prompt="The capital of Germany is" ckpt=none            # field-only spin sampler
  python sample.py sampler.name=spin sampler.eta=1 sampler.lam=1 ckpt=auto # learned residual if trained
  python sample.py sampler.name=ar sampler.temperature=0.8 sampler.top_p=0.95
  python sample.py prompts=spindiff/data/eval_prompts.txt sampler.batch_size=8 max_new_tokens=24
Bad input (empty prompt, eta < 0, steps = 0, a checkpoint for another model ...) prints
`error: ...` and exits with status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    from spindiff.checkpoint import CheckpointError
    from spindiff.config import ConfigError, parse_cli
    from spindiff.lm.models import ModelLoadError
    from spindiff.generation.sample import SampleError, sample

    cfg = parse_cli("sample", argv, USAGE)
    try:
        sample(cfg)
    except (SampleError, CheckpointError, ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
