"""Time DP-SGD's noise source against torch's own ``normal_``, in the same run.

A node draws one Gaussian value per parameter per DP-SGD step, into a 32,768-value buffer
at a time (``nodes/training.py``), on one thread. This draws ``--values`` values that way
with both samplers, interleaved, and prints seconds per 100M values (median of
``--repeats``) and their ratio:

- **torch**: ``Tensor.normal_`` from a ``torch.Generator`` (Mersenne Twister, 24-bit
  uniforms, Box-Muller in float32), what the node used before ``nodes.noise``;
- **aes-ctr**: ``nodes.noise.GaussianStream`` (AES-128-CTR keystream, 53-bit radius,
  Box-Muller in float32), what the node uses now.

Usage::

    .venv/bin/python benchmarks/noise.py                     # 100M values, 5 repeats
    .venv/bin/python benchmarks/noise.py --values 10000000 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.noise import GaussianStream  # noqa: E402 - after the path is set
from nodes.training import _NOISE_CHUNK_CPU as CHUNK  # noqa: E402 - the node's noise buffer


def _timed(fill: Callable[[torch.Tensor], None], values: int) -> float:
    out = torch.empty(CHUNK)
    started = time.perf_counter()
    for start in range(0, values, CHUNK):
        fill(out[: min(CHUNK, values - start)])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Print seconds per 100M values for both samplers and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--values", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"torch": [], "aes-ctr": []}
    for _ in range(args.repeats):
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        stream = GaussianStream(secrets.token_bytes(16))
        times["torch"].append(
            _timed(functools.partial(torch.Tensor.normal_, generator=generator), args.values)
        )
        times["aes-ctr"].append(_timed(stream.fill, args.values))
    per = 1e8 / args.values
    medians = {name: statistics.median(t) * per for name, t in times.items()}
    print(f"# {args.values:,} values, buffers of {CHUNK}, one thread, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:>8} {seconds:6.3f} s per 100M values")
    print(f"   ratio {medians['aes-ctr'] / medians['torch']:6.2f}x (aes-ctr / torch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
