"""``python -m analysis <command> [key=value ...]`` (see ``--help``)."""
from analysis.cli import main

if __name__ == "__main__":
    main()
