"""Tests of federation.coordinator.analytics.combine on hand-built node releases."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from federation.coordinator.analytics import Estimate, GroupResult, combine
from federation.errors import SchemaMismatchError
from federation.queries import Count, Histogram, Mean, Mechanism, Quantile, Query, Sum
from federation.releases import (
    BudgetStatus,
    GroupRelease,
    Measurement,
    NoiseInfo,
    Receipt,
    Release,
)

LAPLACE = Mechanism.LAPLACE
GAUSSIAN = Mechanism.GAUSSIAN
BUDGET = BudgetStatus(
    epsilon=10.0,
    delta=1e-6,
    spent_epsilon=1.0,
    remaining_epsilon=9.0,
    releases=1,
    max_epsilon_per_release=1.0,
)


def _m(
    name: str,
    values: Sequence[float],
    *,
    scale: float = 0.0,
    mechanism: Mechanism = LAPLACE,
    granularity: float = 1.0,
    center: float = 0.0,
) -> Measurement:
    noise = NoiseInfo(mechanism=mechanism, scale=scale, sensitivity=1.0, granularity=granularity)
    return Measurement(name=name, values=tuple(values), noise=noise, center=center)


def _release(
    groups: Mapping[str, Sequence[Measurement]],
    *,
    labels: Sequence[str] = (),
    edges: Sequence[float] = (),
) -> Release:
    return Release(
        groups=tuple(GroupRelease(group=g, measurements=tuple(ms)) for g, ms in groups.items()),
        bin_labels=tuple(labels),
        bin_edges=tuple(edges),
        cost_epsilon=1.0,
        cost_delta=0.0,
        budget=BUDGET,
        receipt=Receipt(id="r", node_name="n", consumer="acme", issued_at=0.0),
    )


def _combine(
    query: Query, releases: Mapping[str, Release], **kwargs: Any
) -> tuple[tuple[str, ...], tuple[GroupResult, ...]]:
    return combine(query, releases, rng=np.random.default_rng(11), **kwargs)


def _contains(estimate: Estimate) -> bool:
    return estimate.low <= estimate.value <= estimate.high


# ------------------------------------------------------------------ additive statistics


def test_counts_add() -> None:
    releases = {
        "hong-kong": _release({"": [_m("count", [100.0], scale=2.0)]}),
        "shenzhen": _release({"": [_m("count", [250.0], scale=3.0)]}),
    }
    labels, [group] = _combine(Count("credit"), releases)
    assert labels == ("count",)
    assert group.group == ""
    [estimate] = group.estimates
    assert estimate.value == 350.0
    assert estimate.low < 350.0 < estimate.high


def test_noise_free_releases_give_a_point_interval() -> None:
    releases = {
        "a": _release({"": [_m("count", [7.0])]}),
        "b": _release({"": [_m("count", [5.0])]}),
    }
    _, [group] = _combine(Count("credit"), releases)
    assert group.estimates == (Estimate(12.0, 12.0, 12.0),)


def test_sums_add_per_group_matched_by_name() -> None:
    releases = {
        "a": _release(
            {
                "north": [_m("sum", [10.5], scale=4.0, granularity=0.5)],
                "south": [_m("sum", [-2.0], scale=4.0, granularity=0.5)],
            }
        ),
        "b": _release(  # the other order: groups are matched by name, not position
            {
                "south": [_m("sum", [3.5], scale=4.0, granularity=0.5)],
                "north": [_m("sum", [100.0], scale=4.0, granularity=0.5)],
            }
        ),
    }
    labels, groups = _combine(Sum("credit", "income", group_by="region"), releases)
    assert labels == ("sum",)
    assert [g.group for g in groups] == ["north", "south"]
    assert [g.estimates[0].value for g in groups] == [110.5, 1.5]
    assert all(_contains(g.estimates[0]) for g in groups)


def test_histogram_bins_add() -> None:
    labels = ("[0, 1)", "[1, 2)", "[2, 3)")
    releases = {
        "a": _release({"": [_m("bins", [1.0, 2.0, 3.0], scale=1.0)]}, labels=labels),
        "b": _release({"": [_m("bins", [4.0, 5.0, -6.0], scale=1.0)]}, labels=labels),
    }
    got_labels, [group] = _combine(Histogram("credit", "age", bins=3), releases)
    assert got_labels == labels
    assert [e.value for e in group.estimates] == [5.0, 7.0, -3.0]  # no clipping for bins
    assert all(_contains(e) for e in group.estimates)


def _discrete_laplace_upper_quantile(scale: float, p: float) -> int:
    """Smallest k with P(X > k) <= p for P(x) proportional to exp(-|x| / scale)."""
    q = math.exp(-1.0 / scale)
    k = 0
    while q ** (k + 1) / (1 + q) > p:  # P(X > k) = q**(k+1) / (1 + q) for k >= 0
        k += 1
    return k


def test_laplace_interval_has_the_known_width() -> None:
    scale = 20.0
    releases = {"a": _release({"": [_m("count", [1000.0], scale=scale)]})}
    _, [group] = _combine(Count("credit"), releases)
    [estimate] = group.estimates
    k = _discrete_laplace_upper_quantile(scale, 0.025)  # 60 for scale 20
    # 4000 simulated draws: the 2.5% tail quantiles are within ~10% of the exact ones.
    assert estimate.high - estimate.value == pytest.approx(k, rel=0.1)
    assert estimate.value - estimate.low == pytest.approx(k, rel=0.1)


def test_gaussian_interval_has_the_known_width_in_released_units() -> None:
    # sigma in released units; granularity 0.25 means sigma 400 and 1200 grid steps.
    releases = {
        "a": _release({"": [_m("sum", [0.0], scale=100.0, mechanism=GAUSSIAN, granularity=0.25)]}),
        "b": _release({"": [_m("sum", [0.0], scale=300.0, mechanism=GAUSSIAN, granularity=0.25)]}),
    }
    _, [group] = _combine(Sum("credit", "income"), releases)
    [estimate] = group.estimates
    half_width = 1.959964 * math.hypot(100.0, 300.0)
    assert estimate.high == pytest.approx(half_width, rel=0.1)
    assert estimate.low == pytest.approx(-half_width, rel=0.1)


def test_higher_confidence_gives_a_wider_interval() -> None:
    releases = {"a": _release({"": [_m("count", [50.0], scale=5.0)]})}
    _, [narrow] = _combine(Count("credit"), releases, confidence=0.5)
    _, [wide] = _combine(Count("credit"), releases, confidence=0.99)
    n, w = narrow.estimates[0], wide.estimates[0]
    assert w.low < n.low <= n.value <= n.high < w.high


def test_same_seed_gives_the_same_interval() -> None:
    releases = {"a": _release({"": [_m("count", [50.0], scale=5.0)]})}
    assert _combine(Count("credit"), releases) == _combine(Count("credit"), releases)


# ------------------------------------------------------------------ mean


def test_mean_is_the_ratio_of_totals() -> None:
    releases = {
        "a": _release({"": [_m("sum", [-100.0], center=50.0), _m("count", [10.0])]}),
        "b": _release({"": [_m("sum", [200.0], center=50.0), _m("count", [30.0])]}),
    }
    labels, [group] = _combine(Mean("credit", "age"), releases)
    assert labels == ("mean",)
    # (sum S_i + center * C_i) / sum C_i = (-100 + 500 + 200 + 1500) / 40
    assert group.estimates == (Estimate(52.5, 52.5, 52.5),)


def test_mean_uses_each_nodes_own_center() -> None:
    releases = {
        "a": _release({"": [_m("sum", [5.0], center=10.0), _m("count", [4.0])]}),
        "b": _release({"": [_m("sum", [-3.0], center=-1.0), _m("count", [2.0])]}),
    }
    _, [group] = _combine(Mean("credit", "age"), releases)
    assert group.estimates[0].value == pytest.approx((5.0 + 40.0 - 3.0 - 2.0) / 6.0)


def test_a_mean_and_its_interval_are_clamped_to_the_public_bounds() -> None:
    # Few records, much noise: (-900 + 50 * 1 + 10 + 50 * 1) / 2 = -395 for ages in
    # [18, 90]. The truth is inside the bounds, so clamping (post-processing) only helps.
    releases = {
        "a": _release({"": [_m("sum", [-900.0], scale=300.0, center=50.0), _m("count", [1.0])]}),
        "b": _release({"": [_m("sum", [10.0], scale=300.0, center=50.0), _m("count", [1.0])]}),
    }
    _, [group] = _combine(Mean("credit", "age"), releases)
    assert group.estimates[0].value == pytest.approx(-395.0)
    _, [group] = _combine(Mean("credit", "age"), releases, bounds=(18.0, 90.0))
    [estimate] = group.estimates
    assert estimate.value == 18.0
    assert 18.0 <= estimate.low <= estimate.value <= estimate.high <= 90.0


def test_mean_interval_contains_the_estimate() -> None:
    releases = {
        "a": _release(
            {"": [_m("sum", [1500.0], scale=40.0, center=40.0), _m("count", [500.0], scale=2.0)]}
        ),
        "b": _release(
            {"": [_m("sum", [-800.0], scale=40.0, center=40.0), _m("count", [300.0], scale=2.0)]}
        ),
    }
    _, [group] = _combine(Mean("credit", "age"), releases)
    [estimate] = group.estimates
    assert estimate.value == pytest.approx(40.0 + 700.0 / 800.0)
    assert estimate.low < estimate.value < estimate.high
    assert estimate.high - estimate.low < 1.0  # noise of ~56 on a sum over 800 records


# ------------------------------------------------------------------ quantiles

EDGES = (0.0, 1.0, 2.0, 3.0, 4.0)


def _histogram_releases(*hists: Sequence[float], scale: float = 0.0) -> dict[str, Release]:
    return {
        f"node{i}": _release({"": [_m("bins", hist, scale=scale)]}, edges=EDGES)
        for i, hist in enumerate(hists)
    }


@pytest.mark.parametrize(
    ("q", "expected", "interval"),
    [
        (0.0, 0.0, (0.0, 1.0)),  # the smallest record is somewhere in bin 0
        (0.1, 1.0, (0.0, 1.0)),  # exactly the first 10 of 100: the end of bin 0
        (0.25, 1.75, (1.0, 2.0)),  # 10 below bin 1, 15 of its 20
        (0.5, 2.0 + 20.0 / 30.0, (2.0, 3.0)),
        (0.9, 3.75, (3.0, 4.0)),
        (1.0, 4.0, (3.0, 4.0)),
    ],
)
def test_quantile_interpolates_linearly_in_a_bin(
    q: float, expected: float, interval: tuple[float, float]
) -> None:
    # Total histogram [10, 20, 30, 40], split over two nodes, without noise: the value is
    # interpolated, the interval is the bin the records' quantile is in (the histogram
    # cannot say where in it).
    releases = _histogram_releases([4.0, 10.0, 15.0, 20.0], [6.0, 10.0, 15.0, 20.0])
    labels, [group] = _combine(Quantile("credit", "age", quantiles=(q,), bins=4), releases)
    assert labels == (f"q{q:g}",)
    [estimate] = group.estimates
    assert estimate.value == pytest.approx(expected)
    assert (estimate.low, estimate.high) == interval


def test_quantile_reads_the_raw_noisy_bins_cumulated_not_each_clipped_at_zero() -> None:
    # True bins [0, 10, 0, 0]: median 1.5. Clipping each noisy bin at 0 keeps the empty
    # bins' positive noise and drops their negative noise ([0, 10, 2, 0]: 1.6); the raw
    # prefix sums [0, -2, 8, 10, 8], made monotone ([0, 0, 8, 9, 9]), give 1.5625.
    releases = _histogram_releases([-1.0, 5.0, 1.0, -1.0], [-1.0, 5.0, 1.0, -1.0])
    _, [group] = _combine(Quantile("credit", "age", quantiles=(0.5,), bins=4), releases)
    assert group.estimates[0].value == pytest.approx(1.5625)


def test_quantile_intervals_contain_the_estimates_and_stay_in_bounds() -> None:
    qs = (0.1, 0.5, 0.9)
    releases = _histogram_releases(
        [40.0, 80.0, 120.0, 160.0], [60.0, 120.0, 180.0, 240.0], scale=3.0
    )
    labels, [group] = _combine(Quantile("credit", "age", quantiles=qs, bins=4), releases)
    assert labels == ("q0.1", "q0.5", "q0.9")
    values = [e.value for e in group.estimates]
    assert values == sorted(values)
    for estimate in group.estimates:
        assert EDGES[0] <= estimate.low <= estimate.value <= estimate.high <= EDGES[-1]
        assert estimate.low in EDGES  # whole bins
        assert estimate.high in EDGES
        assert estimate.high - estimate.low <= 2.0


def test_releases_over_other_bins_or_groups_are_not_added_up() -> None:
    # A node restarted with other bounds releases other bin edges: adding its bins to
    # another node's by position answered a median of 50 for records that were all 90.
    hist = [0.0, 0.0, 0.0, 10.0]
    query = Quantile("credit", "age", quantiles=(0.5,), bins=4)
    shifted = {
        "a": _release({"": [_m("bins", hist)]}, edges=EDGES),
        "b": _release({"": [_m("bins", hist)]}, edges=tuple(2 * e for e in EDGES)),
    }
    with pytest.raises(SchemaMismatchError, match="node 'b' released other groups or bins"):
        _combine(query, shifted)
    # Labels only name the bins: an older node's "[3, 4)" for the last bin still adds up.
    relabelled = {
        "a": _release({"": [_m("bins", hist)]}, edges=EDGES, labels=("0", "1", "2", "[3, 4]")),
        "b": _release({"": [_m("bins", hist)]}, edges=EDGES, labels=("0", "1", "2", "[3, 4)")),
    }
    labels, _ = _combine(Histogram("credit", "age", bins=4), relabelled)
    assert labels == ("0", "1", "2", "[3, 4]")
    regrouped = {
        "a": _release({"x": [_m("count", [1.0])], "y": [_m("count", [1.0])]}),
        "b": _release({"y": [_m("count", [1.0])], "z": [_m("count", [1.0])]}),
    }
    with pytest.raises(SchemaMismatchError, match="than node 'a'"):
        _combine(Count("credit", group_by="g"), regrouped)
