"""Seconds per round of real local training, with the nodes' OpenMP wait policy A/B.

``benchmarks/training.py`` times rounds of one tiny DP-SGD step, where moving the weights
dominates. This times rounds where the nodes train: two local TLS nodes (real processes)
on the synthetic credit data, an MLP (64, 64), ``--steps`` DP-SGD steps of expected batch
256 per round. Each repeat runs two arms in alternating order:

- **passive**: the nodes as they start by default (``python -m nodes`` sets
  ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise);
- **spin**: ``OMP_WAIT_POLICY`` set to an empty value, which libgomp rejects with a warning
  and falls back to its own default: idle threads spin ~3 ms before sleeping (how nodes ran
  before they set the policy).

Usage::

    .venv/bin/python benchmarks/local_steps.py               # 3 repeats, 4 rounds x 100 steps
    .venv/bin/python benchmarks/local_steps.py --repeats 1 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEATURES = ("age", "income", "debt_ratio", "credit_lines", "years_employed", "loan_amount")
ARMS = {"passive": None, "spin": ""}  # the value of OMP_WAIT_POLICY; None: not set


def _child(rows: int, rounds: int, steps: int) -> None:
    from federation.local import LocalFederation
    from federation.models import ModelSpec

    with tempfile.TemporaryDirectory(prefix="local-steps-") as tmp:
        local = LocalFederation.synthetic(
            rows=rows, epsilon=1000.0, max_epsilon_per_release=60.0, workdir=Path(tmp)
        )
        fed = local.start()
        try:
            spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", hidden=(64, 64))
            started = time.perf_counter()
            fed.train(
                spec,
                rounds=rounds,
                target_epsilon=8.0,
                local_steps=steps,
                sample_rate=256 / rows,
                progress=False,
            )
            print(f"{(time.perf_counter() - started) / rounds:.4f}")
        finally:
            local.stop()


def _run_arm(arm: str, args: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    value = ARMS[arm]
    if value is not None:
        env["OMP_WAIT_POLICY"] = value
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(args.rows), str(args.rounds), str(args.steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="records per node")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="DP-SGD steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="pairs, in alternating order")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    print(f"# python benchmarks/local_steps.py; {os.cpu_count()} CPUs, 2 nodes, MLP (64, 64)")
    print(f"# {args.rounds} rounds x {args.steps} DP-SGD steps (batch ~256), {args.rows} rows")
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            times[arm].append(_run_arm(arm, args))
            print(f"repeat {repeat + 1} {arm:>8}: {times[arm][-1]:.3f} s per round", flush=True)
    for arm, values in times.items():
        print(f"{arm:>8}: median {statistics.median(values):.3f} s per round")
    ratio = statistics.median(times["spin"]) / statistics.median(times["passive"])
    print(f"spin / passive: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
