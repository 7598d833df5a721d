"""Entry point for ``python -m nodes``."""

import sys

from nodes.cli import main

if __name__ == "__main__":
    sys.exit(main())
