"""The min_cohort guard: node-side suppression by noisy counts, the guarded sum's charge, and
how the coordinator reports a value any node suppressed."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from _samples import NoNoise

from federation.coordinator.analytics import QueryResult, combine
from federation.queries import (
    Comparison,
    Count,
    Histogram,
    Mean,
    Mechanism,
    Operator,
    Quantile,
    Query,
    Sum,
)
from federation.releases import BudgetStatus, GroupRelease, Measurement, NoiseInfo, Receipt, Release
from federation.schema import Column, ColumnType, DatasetSchema
from federation.wire import AnalyzeRequest, release_from_proto, release_to_proto
from nodes.analytics import DatasetEngine, plan_query
from nodes.cohort import COUNT_SHARE_FOR_SUM, suppress_small_cohorts
from nodes.config import ConsumerPolicy
from nodes.data import table_from_arrays

REGIONS = ("north", "south", "east")
SCHEMA = DatasetSchema(
    "credit",
    (
        Column("income", ColumnType.FLOAT, lower=0.0, upper=100.0),
        Column("region", ColumnType.CATEGORY, domain=REGIONS),
    ),
)
# 40 records in the north, 5 in the south, none in the east.
INCOME = np.array([10.0] * 40 + [90.0] * 5)
REGION = np.array(["north"] * 40 + ["south"] * 5, dtype=object)
# Executed with NoNoise draws (every integer noise is 0): the suppression rule can be
# checked on exact counts.
EXACT = 1.0
MIN_COHORT = 10


def _request(query: Query, epsilon: float) -> AnalyzeRequest:
    return AnalyzeRequest(query=query, epsilon=epsilon, delta=0.0, mechanism=Mechanism.LAPLACE)


def _policy(min_cohort: int) -> ConsumerPolicy:
    return ConsumerPolicy(
        name="acme",
        epsilon=1e9,
        delta=1e-6,
        max_epsilon_per_release=8.0,
        min_cohort=min_cohort,
    )


def _release(query: Query, *, min_cohort: int = MIN_COHORT) -> tuple[GroupRelease, ...]:
    engine = DatasetEngine(table_from_arrays({"income": INCOME, "region": REGION}, schema=SCHEMA))
    policy = _policy(min_cohort)
    plan = plan_query(_request(query, EXACT), schema=SCHEMA, policy=policy)
    groups = engine.execute(plan, rng=NoNoise())
    return suppress_small_cohorts(groups, query=query, min_cohort=policy.min_cohort)


def _values(groups: Sequence[GroupRelease], name: str) -> dict[str, tuple[float, ...]]:
    return {g.group: g.measurement(name).values for g in groups}


def _is_nan(values: Sequence[float]) -> list[bool]:
    return [math.isnan(v) for v in values]


# ------------------------------------------------------------------ node side


def test_off_by_default_releases_every_group() -> None:
    groups = _release(Count("credit", group_by="region"), min_cohort=0)
    assert _values(groups, "count") == {"north": (40.0,), "south": (5.0,), "east": (0.0,)}


def test_count_groups_below_min_cohort_are_suppressed() -> None:
    groups = _release(Count("credit", group_by="region"))
    counts = _values(groups, "count")
    assert counts["north"] == (40.0,)
    assert _is_nan(counts["south"]) == [True]
    assert _is_nan(counts["east"]) == [True]


def test_filtered_cohort_is_judged_after_the_filter() -> None:
    where = Comparison("income", Operator.GT, (50.0,))  # the 5 southern records
    assert _is_nan(_values(_release(Count("credit", where=where)), "count")[""]) == [True]
    everyone = _values(_release(Count("credit")), "count")[""]
    assert everyone == (45.0,)


def test_mean_is_suppressed_with_its_count() -> None:
    groups = _release(Mean("credit", "income", group_by="region"))
    assert not any(_is_nan(_values(groups, "sum")["north"]))
    for name in ("sum", "count"):
        assert _is_nan(_values(groups, name)["south"]) == [True]


def test_histogram_suppresses_each_small_cell() -> None:
    groups = _release(Histogram("credit", "income", bins=2, group_by="region"))
    bins = _values(groups, "bins")
    assert bins["north"][0] == 40.0
    assert _is_nan(bins["north"]) == [False, True]  # 40 low incomes, 0 high ones
    assert _is_nan(bins["south"]) == [True, True]  # 5 high incomes: below 10


def test_quantile_is_suppressed_by_its_group_total() -> None:
    groups = _release(Quantile("credit", "income", bins=4, group_by="region"))
    bins = _values(groups, "bins")
    assert not any(_is_nan(bins["north"]))  # a small bin stays: the group total decides
    assert all(_is_nan(bins["south"]))


def test_guarded_sum_buys_a_count_with_a_share_of_epsilon() -> None:
    request = _request(Sum("credit", "income"), 1.0)
    plain = plan_query(request, schema=SCHEMA, policy=_policy(0))
    guarded = plan_query(request, schema=SCHEMA, policy=_policy(MIN_COHORT))
    assert [p.name for p in plain.parts] == ["sum"]
    assert [p.name for p in guarded.parts] == ["sum", "count"]
    sum_part, count_part = guarded.parts
    assert count_part.charge.epsilon == pytest.approx(COUNT_SHARE_FOR_SUM)
    assert sum_part.charge.epsilon == pytest.approx(1.0 - COUNT_SHARE_FOR_SUM)
    # The consumer pays exactly the epsilon it asked for, guarded or not.
    assert guarded.charge.epsilon == pytest.approx(plain.charge.epsilon) == pytest.approx(1.0)
    assert sum_part.charge.noise_scale == pytest.approx(
        plain.parts[0].charge.noise_scale / (1.0 - COUNT_SHARE_FOR_SUM)
    )


def test_guarded_sum_is_suppressed_by_its_count() -> None:
    groups = _release(Sum("credit", "income", group_by="region"))
    assert _values(groups, "sum")["north"] == (400.0,)
    assert _values(groups, "count")["north"] == (40.0,)
    assert all(_is_nan(_values(groups, "sum")["south"]))


def test_suppressed_values_survive_the_wire_as_nan() -> None:
    groups = _release(Count("credit", group_by="region"))
    back = release_from_proto(release_to_proto(_wrap(groups)))
    assert _is_nan(_values(back.groups, "count")["south"]) == [True]


# ------------------------------------------------------------------ coordinator side

NOISE = NoiseInfo(Mechanism.LAPLACE, scale=1.0, sensitivity=1.0, granularity=1.0)
BUDGET = BudgetStatus(
    epsilon=10.0,
    delta=1e-6,
    spent_epsilon=1.0,
    remaining_epsilon=9.0,
    releases=1,
    max_epsilon_per_release=1.0,
)


def _wrap(groups: Sequence[GroupRelease], edges: Sequence[float] = ()) -> Release:
    return Release(
        groups=tuple(groups),
        bin_labels=tuple(f"b{i}" for i in range(max(len(edges) - 1, 0))),
        bin_edges=tuple(edges),
        cost_epsilon=1.0,
        cost_delta=0.0,
        budget=BUDGET,
        receipt=Receipt(id="r", node_name="n", consumer="acme", issued_at=0.0),
    )


def _group(name: str, **measurements: Sequence[float]) -> GroupRelease:
    return GroupRelease(
        name, tuple(Measurement(k, tuple(v), NOISE) for k, v in measurements.items())
    )


def _combine(query: Query, *releases: Release) -> QueryResult:
    labels, groups = combine(
        query, {f"node-{i}": r for i, r in enumerate(releases)}, rng=np.random.default_rng(1)
    )
    return QueryResult(query=query, labels=labels, groups=groups, nodes=())


def test_a_group_suppressed_at_one_node_is_suppressed_in_the_total() -> None:
    query = Count("credit", group_by="region")
    hk = _wrap([_group("north", count=[400.0]), _group("south", count=[math.nan])])
    sz = _wrap([_group("north", count=[300.0]), _group("south", count=[250.0])])
    result = _combine(query, hk, sz)
    assert result.estimate("north").value == 700.0
    assert not result.estimate("north").suppressed
    south = result.estimate("south")
    assert south.suppressed
    assert math.isnan(south.low)
    assert math.isnan(south.high)


def test_suppressed_mean_is_never_computed_from_the_other_nodes() -> None:
    query = Mean("credit", "income")
    hk = _wrap([_group("", sum=[math.nan], count=[math.nan])])
    sz = _wrap([_group("", sum=[5000.0], count=[100.0])])
    assert _combine(query, hk, sz).estimate().suppressed


def test_guarded_sum_combines_only_sums() -> None:
    query = Sum("credit", "income")
    hk = _wrap([_group("", sum=[100.0], count=[10.0])])
    sz = _wrap([_group("", sum=[50.0])])  # a node without the guard sends no count
    assert _combine(query, hk, sz).value == 150.0


def test_histogram_cells_are_suppressed_one_by_one() -> None:
    query = Histogram("credit", "income", bins=2)
    hk = _wrap([_group("", bins=[30.0, math.nan])], edges=(0.0, 50.0, 100.0))
    sz = _wrap([_group("", bins=[20.0, 40.0])], edges=(0.0, 50.0, 100.0))
    low, high = _combine(query, hk, sz).groups[0].estimates
    assert low.value == 50.0
    assert high.suppressed


def test_quantile_of_a_suppressed_group_is_suppressed() -> None:
    query = Quantile("credit", "income", bins=2, quantiles=(0.25, 0.5))
    hk = _wrap([_group("", bins=[math.nan, math.nan])], edges=(0.0, 50.0, 100.0))
    sz = _wrap([_group("", bins=[20.0, 40.0])], edges=(0.0, 50.0, 100.0))
    estimates = _combine(query, hk, sz).groups[0].estimates
    assert [e.suppressed for e in estimates] == [True, True]


def test_json_marks_suppressed_values_with_nulls() -> None:
    query = Count("credit", group_by="region")
    hk = _wrap([_group("north", count=[400.0]), _group("south", count=[math.nan])])
    result = _combine(query, hk)
    text = json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: no NaN allowed
    groups = {g["group"]: g["estimates"][0] for g in json.loads(text)["groups"]}
    assert groups["south"] == {
        "label": "count",
        "value": None,
        "ci_low": None,
        "ci_high": None,
        "suppressed": True,
    }
    assert groups["north"]["value"] == 400.0
    assert "suppressed" not in groups["north"]
