"""`python -m spindiff.evaluate`: the CLI of :mod:`spindiff.evaluation.evaluate`."""
from spindiff.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
