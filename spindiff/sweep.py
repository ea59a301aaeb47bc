"""`python -m spindiff.sweep`: the CLI of :mod:`spindiff.evaluation.sweep`."""
from spindiff.evaluation.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
