"""Entry point for ``python -m nodes``."""

import os
import sys

# A node serves gRPC and trains in one process. OpenMP's default lets torch's idle worker
# threads spin for a while after each parallel region, taking CPU from the gRPC threads
# that decrypt and stream the same round's tensors; passive waiting gave ~0.3 CPU-s less per
# 100M-parameter round (benchmarks/training.py, README). libgomp reads this when torch
# loads, so it is set before any import that loads torch; an operator's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nodes.cli import main  # noqa: E402 -- after the environment is set

if __name__ == "__main__":
    sys.exit(main())
