"""``python -m normkit``: the same as the ``normkit`` command."""
import sys

from normkit.cli import main

if __name__ == "__main__":   # spawned worker processes import this module under another name
    sys.exit(main())
