"""Benchmark federated DP analytics against a single-process numpy computation.

Two nodes (hong-kong, shenzhen) run as real processes on 127.0.0.1 with mutual TLS, each
serving ``rows`` synthetic credit records from Parquet. For a DP mean (of ``income``) and a
DP histogram (of ``age``) the benchmark times ``Coordinator.analyze`` end to end at the
coordinator: fan-out over gRPC, the node's plan, durable ledger charge, exact aggregate and
noise, and the coordinator's combine step with its noise simulation for the interval.

The first query of each statistic is a warm-up: it also fills the node's per-bounds caches
(the clamped, quantised column or the bin codes), so its time is reported separately as
"first". The headline number is the median of ``--repeats`` later queries.

The baseline is numpy in this process on the same data, concatenated across the two
nodes before timing: ``np.clip(x, lo, hi).mean()`` and ``np.histogram(np.clip(x, lo, hi),
bins, range=(lo, hi))``; the same without the clip is shown for transparency. The target
is federation/numpy <= 3x at 10M rows per node.

Usage::

    .venv/bin/python benchmarks/analytics.py                 # 1M and 10M rows per node
    .venv/bin/python benchmarks/analytics.py --rows 1000000 --repeats 9
    .venv/bin/python benchmarks/analytics.py --quick         # 100k rows, CI smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pyarrow as pa

import federation
from federation.coordinator import Coordinator
from federation.coordinator.analytics import combine
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.local import LocalFederation
from federation.queries import Count, Histogram, Mean, Mechanism, Query
from federation.wire import AnalyzeRequest

NODES: tuple[str, ...] = ("hong-kong", "shenzhen")
MEAN_COLUMN = "income"
HIST_COLUMN = "age"
HIST_BINS = 24
QUERY_EPSILON = 1.0
# Generous budget: every timed query, warm-up and breakdown call is charged for real.
BUDGET_EPSILON = 10_000.0
TARGET_RATIO = 3.0
TARGET_ROWS = 10_000_000
QUICK_ROWS = 100_000
DEFAULT_ROWS = (1_000_000, 10_000_000)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    rows: int
    statistic: str
    first_ms: float
    federation_ms: float
    numpy_ms: float
    numpy_noclip_ms: float
    covered: str  # intervals containing the numpy answer, e.g. '23/24'

    @property
    def ratio(self) -> float:
        """Federation median over numpy median."""
        return self.federation_ms / self.numpy_ms


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Where the time of one query goes, measured with public calls."""

    rows: int
    statistic: str
    describe_ms: float
    node_rpc_ms: dict[str, float]
    combine_ms: float


class _NodeFrames(Mapping[str, Mapping[str, npt.NDArray[Any]]]):
    """Generate each node's columns only when ``from_arrays`` asks for them.

    ``from_arrays`` writes one node's Parquet file before it reads the next node's columns,
    so the previous node's frame is emptied when the next is requested: at most one node's
    full frame is in memory. The baseline keeps only the two benchmarked columns.
    """

    def __init__(self, rows: int, *, seed: int) -> None:
        self.rows = rows
        self.seed = seed
        self.kept: dict[str, list[npt.NDArray[Any]]] = {MEAN_COLUMN: [], HIST_COLUMN: []}
        self._last: dict[str, npt.NDArray[Any]] | None = None

    def __getitem__(self, name: str) -> Mapping[str, npt.NDArray[Any]]:
        if name not in NODES:
            raise KeyError(name)
        if self._last is not None:
            self._last.clear()
            gc.collect()
        frame = synthetic_credit(
            jurisdiction=name, rows=self.rows, seed=self.seed + NODES.index(name)
        )
        for column, parts in self.kept.items():
            parts.append(frame[column])
        self._last = frame
        return frame

    def __iter__(self) -> Iterator[str]:
        return iter(NODES)

    def __len__(self) -> int:
        return len(NODES)

    def baseline(self) -> dict[str, npt.NDArray[Any]]:
        """Drop the last frame; return the kept columns, concatenated across the nodes."""
        if self._last is not None:
            self._last.clear()
            self._last = None
        joined = {column: np.concatenate(parts) for column, parts in self.kept.items()}
        self.kept = {column: [] for column in self.kept}
        gc.collect()
        return joined


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _time(call: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return _ms(time.perf_counter() - start), result


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    return statistics.median(_time(call)[0] for _ in range(repeats))


def _environment() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"python {platform.python_version()} on {platform.platform()}",
        f"cpu: {cpu}; logical cores: {os.cpu_count()} (usable here: {usable})",
        f"numpy {np.__version__}, pyarrow {pa.__version__}, grpcio {grpc.__version__}, "
        f"federation {federation.__version__}",
        f"nodes: {', '.join(NODES)} as separate processes, gRPC over 127.0.0.1 with mutual TLS",
    ]


def _queries() -> dict[str, tuple[Query, tuple[float, float]]]:
    """The benchmarked queries and the public bounds the baseline clamps to."""
    mean_col = CREDIT_SCHEMA.column(MEAN_COLUMN)
    hist_col = CREDIT_SCHEMA.column(HIST_COLUMN)
    assert mean_col.lower is not None
    assert mean_col.upper is not None
    assert hist_col.lower is not None
    assert hist_col.upper is not None
    return {
        f"mean({MEAN_COLUMN})": (
            Mean("credit", MEAN_COLUMN),
            (float(mean_col.lower), float(mean_col.upper)),
        ),
        f"histogram({HIST_COLUMN}, {HIST_BINS} bins)": (
            Histogram("credit", HIST_COLUMN, bins=HIST_BINS),
            (float(hist_col.lower), float(hist_col.upper)),
        ),
    }


def _baselines(
    statistic: str, data: npt.NDArray[Any], bounds: tuple[float, float]
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Numpy with the clamp the node applies, and without it."""
    lo, hi = bounds
    if statistic.startswith("mean"):
        return (lambda: np.clip(data, lo, hi).mean()), (lambda: data.mean())
    return (
        lambda: np.histogram(np.clip(data, lo, hi), bins=HIST_BINS, range=(lo, hi))[0],
        lambda: np.histogram(data, bins=HIST_BINS, range=(lo, hi))[0],
    )


def _covered(result: Any, exact: Any) -> tuple[int, int]:
    """How many federated 95% intervals (one per bin) contain the exact numpy answer."""
    estimates = result.groups[0].estimates
    values = np.atleast_1d(np.asarray(exact, dtype=np.float64))
    inside = sum(e.low <= v <= e.high for e, v in zip(estimates, values, strict=True))
    return int(inside), len(values)


def _breakdown(
    coordinator: Coordinator, rows: int, statistic: str, query: Query, repeats: int
) -> Breakdown:
    """Time one Describe round trip, each node's Analyze RPC alone, and the combine step."""
    describe_ms = _median_ms(coordinator.describe, repeats)
    request = AnalyzeRequest(
        query=query, epsilon=QUERY_EPSILON, delta=0.0, mechanism=Mechanism.LAPLACE
    )
    node_ms = {
        name: _median_ms(lambda c=client: c.analyze(request), repeats)
        for name, client in coordinator.clients.items()
    }
    releases = {name: client.analyze(request) for name, client in coordinator.clients.items()}
    rng = np.random.default_rng(0)
    combine_ms = _median_ms(lambda: combine(query, releases, rng=rng), repeats)
    return Breakdown(rows, statistic, describe_ms, node_ms, combine_ms)


def _measure(
    coordinator: Coordinator,
    rows: int,
    statistic: str,
    query: Query,
    data: npt.NDArray[Any],
    bounds: tuple[float, float],
    repeats: int,
) -> Row:
    """Time one statistic at the coordinator and in numpy; check the answer against numpy."""

    def ask(seed: int) -> Any:
        return coordinator.analyze(query, epsilon=QUERY_EPSILON, seed=seed)

    first_ms, _ = _time(lambda: ask(0))  # warm-up: fills the nodes' per-bounds caches
    federation_ms = statistics.median(_time(lambda s=s: ask(s))[0] for s in range(1, repeats + 1))
    clipped, unclipped = _baselines(statistic, data, bounds)
    covered, total = _covered(ask(0), clipped())
    return Row(
        rows=rows,
        statistic=statistic,
        first_ms=first_ms,
        federation_ms=federation_ms,
        numpy_ms=_median_ms(clipped, repeats),
        numpy_noclip_ms=_median_ms(unclipped, repeats),
        covered=f"{covered}/{total}",
    )


def run_size(rows: int, *, repeats: int, seed: int) -> tuple[list[Row], list[Breakdown]]:
    """Start two nodes with ``rows`` rows each, run every query, and stop them."""
    results: list[Row] = []
    breakdowns: list[Breakdown] = []
    label = f"[{rows:,} rows/node]"
    with tempfile.TemporaryDirectory(prefix="federation-bench-") as tmp:
        frames = _NodeFrames(rows, seed=seed)
        took, fed = _time(
            lambda: LocalFederation.from_arrays(
                frames,
                schema=CREDIT_SCHEMA,
                epsilon=BUDGET_EPSILON,
                max_epsilon_per_release=QUERY_EPSILON,
                workdir=Path(tmp),
            )
        )
        assert isinstance(fed, LocalFederation)
        baseline = frames.baseline()
        print(f"\n{label} generated data and wrote Parquet in {took / 1e3:.1f} s", flush=True)
        try:
            took, coordinator = _time(fed.start)
            assert isinstance(coordinator, Coordinator)
            print(f"{label} nodes loaded their data, healthy in {took / 1e3:.1f} s", flush=True)
            coordinator.describe()  # open the channels (TLS handshakes) and cache schemas
            took, _ = _time(lambda: coordinator.analyze(Count("credit"), epsilon=QUERY_EPSILON))
            print(
                f"{label} first Analyze of the fresh node processes (a count, not timed "
                f"below; pays one-time lazy imports): {took:.0f} ms",
                flush=True,
            )
            for statistic, (query, bounds) in _queries().items():
                column = MEAN_COLUMN if isinstance(query, Mean) else HIST_COLUMN
                row = _measure(
                    coordinator, rows, statistic, query, baseline[column], bounds, repeats
                )
                results.append(row)
                print(f"{label} {statistic}: {row.federation_ms:.1f} ms median", flush=True)
                breakdowns.append(_breakdown(coordinator, rows, statistic, query, repeats))
        finally:
            fed.stop()
    return results, breakdowns


def _print_table(results: list[Row], repeats: int) -> None:
    print(
        f"\nEnd-to-end time per query at the coordinator (Coordinator.analyze wall time), "
        f"median of {repeats} after one warm-up query that also fills the nodes' per-bounds "
        "caches ('first' is that warm-up). numpy: one process, both nodes' data concatenated "
        "beforehand, median of the same number of runs after one warm-up."
    )
    header = (
        f"{'rows/node':>11} | {'statistic':<26} | {'fed first ms':>12} | {'fed median ms':>13} | "
        f"{'numpy ms':>9} | {'numpy no-clip ms':>16} | {'ratio':>7} | {'target':>6} | "
        f"{'verdict':<7} | {'first ratio':>11} | in CI"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        applies = r.rows >= TARGET_ROWS
        verdict = ("PASS" if r.ratio <= TARGET_RATIO else "FAIL") if applies else "n/a"
        target = f"<={TARGET_RATIO:g}x" if applies else "-"
        print(
            f"{r.rows:>11,} | {r.statistic:<26} | {r.first_ms:>12.1f} | {r.federation_ms:>13.1f} | "
            f"{r.numpy_ms:>9.1f} | {r.numpy_noclip_ms:>16.1f} | {r.ratio:>6.2f}x | {target:>6} | "
            f"{verdict:<7} | {r.first_ms / r.numpy_ms:>10.2f}x | {r.covered}"
        )
    print(
        f"target: federation/numpy <= {TARGET_RATIO:g}x at {TARGET_ROWS:,} rows per node "
        "(ratio = fed median / numpy; 'first ratio' = the cache-filling first query / numpy, "
        "for information).\n'in CI': federated 95% intervals (one per bin) that contain the "
        "exact numpy answer; about 1 in 20 should miss."
    )


def _print_breakdown(breakdowns: list[Breakdown]) -> None:
    print(
        "\nBreakdown (medians): Describe = one fan-out Describe to both nodes (the RPC floor); "
        "node = one node's Analyze RPC alone (plan + ledger charge + compute + noise + wire); "
        "combine = coordinator combine with its 4000-draw noise simulation."
    )
    for b in breakdowns:
        nodes = ", ".join(f"{n} {ms:.1f}" for n, ms in b.node_rpc_ms.items())
        print(
            f"{b.rows:>11,} | {b.statistic:<26} | Describe {b.describe_ms:6.1f} ms | "
            f"node ms: {nodes} | combine {b.combine_ms:6.1f} ms"
        )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        default=",".join(str(r) for r in DEFAULT_ROWS),
        help="comma-separated rows per node (default: 1000000,10000000)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed queries per statistic")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows per node")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)
    args.sizes = [QUICK_ROWS] if args.quick else [int(r) for r in args.rows.split(",") if r]
    if args.repeats < 1 or not args.sizes or min(args.sizes) < 1:
        parser.error("--repeats and every --rows value must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the environment, the table and the breakdown."""
    args = _parse(argv)
    print("\n".join(_environment()))
    results: list[Row] = []
    breakdowns: list[Breakdown] = []
    for rows in args.sizes:
        size_results, size_breakdowns = run_size(rows, repeats=args.repeats, seed=args.seed)
        results += size_results
        breakdowns += size_breakdowns
    _print_table(results, args.repeats)
    _print_breakdown(breakdowns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
