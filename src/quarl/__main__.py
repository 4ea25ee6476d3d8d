"""``python -m quarl`` is the same as the ``quarl`` console script."""

from quarl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
