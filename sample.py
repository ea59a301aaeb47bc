"""Token-by-token generation: ``python sample.py [key=value ...]`` (thin CLI over spindiff.generation.sample)."""
from __future__ import annotations

from typing import Sequence

USAGE = """usage: python sample.py [key=value ...]

Generate with a registered sampler (spin | ar | euclid_ddpm), token by token.
Examples:
  python sample.py                                                          # ckpt=auto: newest checkpoint from train.py / the quick start
  python sample.py prompt="The capital of Germany is" ckpt=none            # field-only spin sampler
  python sample.py ckpt=runs/train/DIR/checkpoints/last.ckpt                 # model.name=auto: the checkpoint's model
  python sample.py sampler.name=ar sampler.temperature=0.8 sampler.top_p=0.95
  python sample.py prompts=spindiff/data/eval_prompts.txt sampler.batch_size=8 max_new_tokens=24
The text streams to stdout, notes and warnings go to stderr. Bad input (empty prompt, eta < 0,
steps = 0, an unreadable checkpoint, a checkpoint for another model ...) prints `error: ...` and
exits with status 2 before anything is written. eval.* keys belong to `python -m spindiff.evaluate`."""


def main(argv: Sequence[str] | None = None) -> int:
    from spindiff.config import run_cli

    def run(cfg):
        import spindiff.checkpoint  # noqa: F401 - registers CheckpointError as a user error
        import spindiff.lm.models  # noqa: F401 - ModelLoadError
        from spindiff.generation.sample import sample

        sample(cfg)

    return run_cli("sample", argv, USAGE, run)


if __name__ == "__main__":
    raise SystemExit(main())
