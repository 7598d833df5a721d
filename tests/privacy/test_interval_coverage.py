"""Statistical check: combined 95% intervals cover the exact statistic at the stated rate.

Two "nodes" hold known exact aggregates; each trial draws fresh noise for them with the
real samplers (``federation.privacy.add_noise`` under a ``laplace_charge`` or
``gaussian_charge``), builds their releases, combines them with ``combine`` and records
whether the interval contains the exact value. Seeds are fixed, so a run is deterministic.

Acceptance: with TRIALS = 400 trials and a true coverage of 0.95, the number of covering
trials X ~ Binomial(400, 0.95) (mean 380, sd 4.36). A check passes when X / 400 is in
[0.91, 0.99], i.e. 364 <= X <= 396. For a correct interval its false-alarm rate is
P(X <= 363) + P(X >= 397) = 2.9e-4 + 2.2e-6 = 2.9e-4 < 1e-3 per statistic
(``test_acceptance_region_false_alarm_rate`` recomputes it), 8.7e-4 for the three
statistics together. The Monte Carlo quantiles of ``combine`` (4000 simulations) and the
discreteness of the noise move the true coverage only slightly (0.94 to 0.96 here).

Power: the same check is fed releases that understate their noise scale by half, and must
reject them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from federation.coordinator.analytics import combine
from federation.privacy import Charge, add_noise, gaussian_charge, laplace_charge
from federation.queries import Count, Mean, Mechanism, Quantile, Sum
from federation.releases import (
    BudgetStatus,
    GroupRelease,
    Measurement,
    NoiseInfo,
    Receipt,
    Release,
)
from federation.schema import Column, ColumnType, DatasetSchema
from federation.wire import AnalyzeRequest
from nodes.analytics import DatasetEngine, plan_query
from nodes.config import ConsumerPolicy
from nodes.data import table_from_arrays

TRIALS = 400
CONFIDENCE = 0.95
ACCEPT = (0.91, 0.99)
NODES = ("hong-kong", "shenzhen")
BUDGET = BudgetStatus(
    epsilon=10.0,
    delta=1e-6,
    spent_epsilon=1.0,
    remaining_epsilon=9.0,
    releases=1,
    max_epsilon_per_release=1.0,
)
RECEIPT = Receipt(id="r", node_name="n", consumer="acme", issued_at=0.0)

# Exact aggregates per node, in integer grid units (as a node computes them).
COUNTS = {"hong-kong": 1200, "shenzhen": 800}
SUMS = {"hong-kong": 123_457, "shenzhen": -40_321}  # granularity GRID below
CENTERED_SUMS = {"hong-kong": 35_000, "shenzhen": -12_000}
CENTER = 250.0
GRID = 0.5
SUM_SENSITIVITY = 1000  # grid units: bounds of +-500 at granularity 0.5


def _measurement(
    name: str,
    exact: int,
    charge: Charge,
    *,
    granularity: float,
    rng: np.random.Generator,
    understate: float,
    center: float = 0.0,
) -> Measurement:
    """Noise ``exact`` for real and describe the noise (scale times ``understate``)."""
    noisy = add_noise(np.array([exact], dtype=np.int64), charge, rng=rng)
    mechanism = Mechanism.LAPLACE if charge.delta == 0 else Mechanism.GAUSSIAN
    noise = NoiseInfo(
        mechanism=mechanism,
        scale=charge.noise_scale * granularity * understate,
        sensitivity=charge.sensitivity * granularity,
        granularity=granularity,
    )
    return Measurement(
        name=name, values=(float(noisy[0]) * granularity,), noise=noise, center=center
    )


def _release(*measurements: Measurement) -> Release:
    return Release(
        groups=(GroupRelease(group="", measurements=measurements),),
        bin_labels=(),
        bin_edges=(),
        cost_epsilon=1.0,
        cost_delta=0.0,
        budget=BUDGET,
        receipt=RECEIPT,
    )


def _count_releases(rng: np.random.Generator, understate: float) -> dict[str, Release]:
    charges = {
        "hong-kong": laplace_charge(epsilon=0.1, sensitivity=1),
        "shenzhen": laplace_charge(epsilon=0.05, sensitivity=1),
    }
    return {
        node: _release(
            _measurement(
                "count",
                COUNTS[node],
                charges[node],
                granularity=1.0,
                rng=rng,
                understate=understate,
            )
        )
        for node in NODES
    }


def _sum_releases(rng: np.random.Generator, understate: float) -> dict[str, Release]:
    charges = {
        "hong-kong": gaussian_charge(epsilon=1.0, delta=1e-6, sensitivity=SUM_SENSITIVITY),
        "shenzhen": gaussian_charge(epsilon=0.5, delta=1e-7, sensitivity=SUM_SENSITIVITY),
    }
    return {
        node: _release(
            _measurement(
                "sum",
                SUMS[node],
                charges[node],
                granularity=GRID,
                rng=rng,
                understate=understate,
            )
        )
        for node in NODES
    }


def _mean_releases(rng: np.random.Generator, understate: float) -> dict[str, Release]:
    sum_charge = laplace_charge(epsilon=0.25, sensitivity=SUM_SENSITIVITY)
    count_charge = laplace_charge(epsilon=0.25, sensitivity=1)
    return {
        node: _release(
            _measurement(
                "sum",
                CENTERED_SUMS[node],
                sum_charge,
                granularity=GRID,
                rng=rng,
                understate=understate,
                center=CENTER,
            ),
            _measurement(
                "count",
                COUNTS[node],
                count_charge,
                granularity=1.0,
                rng=rng,
                understate=understate,
            ),
        )
        for node in NODES
    }


EXACT_COUNT = float(sum(COUNTS.values()))
EXACT_SUM = float(sum(SUMS.values())) * GRID
EXACT_MEAN = sum(CENTERED_SUMS[n] * GRID + CENTER * COUNTS[n] for n in NODES) / EXACT_COUNT

CASES: dict[str, tuple[object, Callable[..., dict[str, Release]], float]] = {
    "count-laplace": (Count("credit"), _count_releases, EXACT_COUNT),
    "sum-gaussian": (Sum("credit", "income"), _sum_releases, EXACT_SUM),
    "mean-laplace": (Mean("credit", "income"), _mean_releases, EXACT_MEAN),
}


def _coverage(case: str, *, understate: float = 1.0) -> float:
    query, make, exact = CASES[case]
    noise_rng = np.random.default_rng(20240601)
    covered = 0
    for trial in range(TRIALS):
        releases = make(noise_rng, understate)
        _, [group] = combine(
            query,  # type: ignore[arg-type]
            releases,
            confidence=CONFIDENCE,
            rng=np.random.default_rng(trial),
        )
        [estimate] = group.estimates
        covered += estimate.low <= exact <= estimate.high
    return covered / TRIALS


def test_acceptance_region_false_alarm_rate() -> None:
    low, high = round(ACCEPT[0] * TRIALS), round(ACCEPT[1] * TRIALS)
    binom = stats.binom(TRIALS, CONFIDENCE)
    false_alarm = binom.cdf(low - 1) + binom.sf(high)
    assert false_alarm < 1e-3
    assert false_alarm == pytest.approx(2.9e-4, rel=0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_interval_covers_the_exact_value_at_the_stated_rate(case: str) -> None:
    coverage = _coverage(case)
    assert ACCEPT[0] <= coverage <= ACCEPT[1], f"{case}: coverage {coverage:.3f}"


@pytest.mark.parametrize("case", list(CASES))
def test_intervals_that_understate_the_noise_are_caught(case: str) -> None:
    # Half the noise scale: a 95% interval of the claimed law covers only ~70% of the truth.
    assert _coverage(case, understate=0.5) < ACCEPT[0]


# ----------------------------------------------------------------------------- quantiles
# Released by the real node engine (nodes.analytics) over records whose quantiles are
# known exactly. The interval is a simultaneous band on the cumulative counts that ends on
# bin edges: conservative by construction, so its check is one-sided. With QUANTILE_TRIALS
# = 200 (a combine takes ~75 ms) a check passes when at least 179 intervals cover: for a
# true coverage of 0.95 the false alarm is P(X <= 178) = 4.8e-4 per quantile, less for the
# higher coverage a conservative interval has. The understated-noise case must fail it, and
# the width check keeps the band from passing by being vacuous.

QUANTILE_TRIALS = 200
QUANTILE_ACCEPT = 179
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
INCOME = DatasetSchema("credit", (Column("income", ColumnType.FLOAT, 0.0, 500_000.0),))
QUANTILE_POLICY = ConsumerPolicy(name="acme", epsilon=1e9, delta=0.0, max_epsilon_per_release=10.0)


def _records_quantile(values: npt.NDArray[np.float64], q: float) -> float:
    """The smallest record with at least q n records at or below it (q = 0: the smallest)."""
    ordered = np.sort(values)
    return float(ordered[max(math.ceil(q * len(ordered)) - 1, 0)])


def _understated(groups: tuple[GroupRelease, ...], factor: float) -> tuple[GroupRelease, ...]:
    """The releases as a node that claims ``factor`` times its real noise scale sends them."""
    return tuple(
        dataclasses.replace(
            g,
            measurements=tuple(
                dataclasses.replace(
                    m, noise=dataclasses.replace(m.noise, scale=m.noise.scale * factor)
                )
                for m in g.measurements
            ),
        )
        for g in groups
    )


def _quantile_coverage(
    rows: int, epsilon: float, *, understate: float = 1.0, bins: int = 256
) -> tuple[npt.NDArray[np.int64], float]:
    """Per quantile, how many of QUANTILE_TRIALS intervals held the records' quantile; and
    the mean width, in bins, of the median's interval."""
    data_rng = np.random.default_rng(7)
    values = {
        node: np.clip(data_rng.lognormal(np.log(40_000.0), 0.6, rows), 0.0, 500_000.0)
        for node in NODES
    }
    engines = {
        node: DatasetEngine(table_from_arrays({"income": v}, schema=INCOME))
        for node, v in values.items()
    }
    exact = [_records_quantile(np.concatenate(list(values.values())), q) for q in QUANTILES]
    query = Quantile("credit", "income", quantiles=QUANTILES, bins=bins)
    plan = plan_query(
        AnalyzeRequest(query, epsilon, 0.0, Mechanism.LAPLACE),
        schema=INCOME,
        policy=QUANTILE_POLICY,
    )
    width = plan.bin_edges[1] - plan.bin_edges[0]
    noise_rng = np.random.default_rng(20240602)
    covered = np.zeros(len(QUANTILES), dtype=np.int64)
    widths = []
    for trial in range(QUANTILE_TRIALS):
        releases = {
            node: Release(
                _understated(engine.execute(plan, rng=noise_rng), understate),
                plan.bin_labels,
                plan.bin_edges,
                epsilon,
                0.0,
                BUDGET,
                RECEIPT,
            )
            for node, engine in engines.items()
        }
        _, [group] = combine(query, releases, rng=np.random.default_rng(trial))
        for j, (estimate, truth) in enumerate(zip(group.estimates, exact, strict=True)):
            assert estimate.low <= estimate.value <= estimate.high
            covered[j] += estimate.low <= truth <= estimate.high
        median = group.estimates[QUANTILES.index(0.5)]
        widths.append((median.high - median.low) / width)
    return covered, float(np.mean(widths))


@pytest.mark.parametrize(
    ("rows", "epsilon", "max_bins"),
    [
        # Most bins empty: clipping each noisy bin at 0 (before 2026-12-06) covered 0-89%.
        (20_000, 1.0, 3.0),
        # Noise larger than the data: a bootstrap of the estimate covered 15-53%. The band
        # is honest about it (most of the range), so its width is not checked.
        (200, 0.1, math.inf),
    ],
)
def test_quantile_intervals_cover_the_records_quantiles(
    rows: int, epsilon: float, max_bins: float
) -> None:
    covered, median_bins = _quantile_coverage(rows, epsilon)
    assert (covered >= QUANTILE_ACCEPT).all(), f"intervals that covered, per quantile: {covered}"
    assert median_bins <= max_bins


def test_quantile_intervals_that_understate_the_noise_are_caught() -> None:
    # A tenth of the noise scale, coarse bins, few records: the band shrinks to about the
    # estimate's bin and misses the truth whenever the noise moved the estimate a bin.
    covered, _ = _quantile_coverage(200, 0.1, understate=0.1, bins=64)
    assert (covered < QUANTILE_ACCEPT).any(), f"intervals that covered, per quantile: {covered}"
