"""Entry point for ``python -m federation`` (the same as the ``federation`` command)."""

import sys

from federation.cli import main

if __name__ == "__main__":
    sys.exit(main())
