"""Tests of nodes.analytics: planning (validation and charge) and exact execution."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from _samples import NoNoise

from federation.errors import BudgetExhaustedError, InvalidRequestError, PolicyError
from federation.privacy import laplace_charge
from federation.queries import (
    All,
    Any,
    Comparison,
    Count,
    Filter,
    Histogram,
    Mean,
    Mechanism,
    Not,
    Operator,
    Quantile,
    Query,
    Sum,
)
from federation.releases import GroupRelease
from federation.schema import Column, ColumnType, DatasetSchema
from federation.wire import AnalyzeRequest
from nodes.analytics import DatasetEngine, Plan, plan_query
from nodes.config import ConsumerPolicy
from nodes.data import table_from_arrays

REGIONS = ("north", "south", "east")
SCHEMA = DatasetSchema(
    "credit",
    (
        Column("age", ColumnType.INT, lower=18, upper=100),
        Column("income", ColumnType.FLOAT, lower=0.0, upper=500_000.0),
        Column("debt", ColumnType.INT, lower=0, upper=500_000),
        Column("score", ColumnType.FLOAT),  # no public bounds
        Column("region", ColumnType.CATEGORY, domain=REGIONS),
        Column("owner", ColumnType.BOOL),
    ),
)
POLICY = ConsumerPolicy(name="acme", epsilon=10.0, delta=1e-5, max_epsilon_per_release=2.0)
# Noise-free execution: these plans run with NoNoise draws (every integer noise is 0).
EXACT_EPSILON = 1.0
EXACT_POLICY = ConsumerPolicy(name="acme", epsilon=1e9, delta=0.0, max_epsilon_per_release=8.0)


def _request(
    query: Query,
    epsilon: float = 1.0,
    *,
    delta: float = 0.0,
    mechanism: Mechanism = Mechanism.LAPLACE,
) -> AnalyzeRequest:
    return AnalyzeRequest(query=query, epsilon=epsilon, delta=delta, mechanism=mechanism)


def _plan(query: Query, epsilon: float = 1.0, **kwargs: object) -> Plan:
    return plan_query(_request(query, epsilon, **kwargs), schema=SCHEMA, policy=POLICY)  # type: ignore[arg-type]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        (Sum("credit", "salary"), "no column 'salary'"),
        (Count("credit", group_by="salary"), "no column 'salary'"),
        (Count("credit", where=Comparison("salary", Operator.GT, (1.0,))), "no column 'salary'"),
        (Sum("credit", "region"), "needs an int or float column"),
        (Mean("credit", "owner"), "needs an int or float column"),
        (Quantile("credit", "region"), "needs an int or float column"),
        (Count("credit", group_by="age"), "group by a category or bool"),
        (Sum("credit", "income", group_by="income"), "group by a category or bool"),
        (Sum("credit", "score"), "no public bounds"),
        (Mean("credit", "score"), "no public bounds"),
        (Histogram("credit", "score"), "no public bounds"),
        (Quantile("credit", "score"), "no public bounds"),
    ],
)
def test_invalid_query_is_refused(query: Query, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        _plan(query)


def test_request_bounds_stand_in_for_missing_public_bounds() -> None:
    plan = _plan(Sum("credit", "score", bounds=(-1.0, 1.0)))
    assert plan.bounds == (-1.0, 1.0)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_epsilon_is_refused(epsilon: float) -> None:
    with pytest.raises(InvalidRequestError, match="epsilon"):
        _plan(Count("credit"), epsilon)


def test_epsilon_over_the_per_release_cap_is_refused_with_budget_exhausted() -> None:
    with pytest.raises(BudgetExhaustedError, match="per-release cap of 2"):
        _plan(Count("credit"), 2.5)
    assert _plan(Count("credit"), 2.0).charge.epsilon == 2.0  # the cap itself is allowed


@pytest.mark.parametrize("delta", [1e-6, -1e-6, math.nan])
def test_laplace_refuses_any_delta(delta: float) -> None:
    with pytest.raises(InvalidRequestError, match="delta"):
        _plan(Count("credit"), delta=delta)


@pytest.mark.parametrize("delta", [0.0, -1e-7, 1.0, 2.0, math.nan, math.inf])
def test_gaussian_needs_delta_strictly_between_zero_and_one(delta: float) -> None:
    with pytest.raises(InvalidRequestError, match="0 < delta < 1"):
        _plan(Count("credit"), delta=delta, mechanism=Mechanism.GAUSSIAN)


def test_gaussian_delta_over_the_per_release_cap_is_a_policy_error() -> None:
    assert POLICY.max_delta_per_release == pytest.approx(1e-6)
    with pytest.raises(PolicyError, match="per-release cap"):
        _plan(Count("credit"), delta=2e-6, mechanism=Mechanism.GAUSSIAN)
    plan = _plan(Count("credit"), delta=1e-6, mechanism=Mechanism.GAUSSIAN)
    assert (plan.charge.epsilon, plan.charge.delta) == (1.0, 1e-6)


@pytest.mark.parametrize(
    "where",
    [
        Comparison("age", Operator.GT, ("thirty",)),
        Comparison("age", Operator.EQ, (True,)),
        Comparison("income", Operator.IN, (1.0, "x")),
        Comparison("region", Operator.EQ, ("west",)),
        Comparison("region", Operator.EQ, (1.0,)),
        Comparison("region", Operator.LT, ("north",)),
        Comparison("owner", Operator.EQ, ("true",)),
        Comparison("owner", Operator.EQ, (1.0,)),
        Comparison("owner", Operator.GE, (True,)),
        Not(
            All((Comparison("age", Operator.GT, (1.0,)), Comparison("region", Operator.IN, ("x",))))
        ),
        Any((Comparison("age", Operator.GT, (1.0,)), Comparison("nope", Operator.EQ, (1.0,)))),
    ],
)
def test_filter_with_wrong_value_type_or_column_is_refused(where: Filter) -> None:
    with pytest.raises(InvalidRequestError, match="filter|no column"):
        _plan(Count("credit", where=where))


def test_filter_with_right_value_types_is_accepted() -> None:
    where = All(
        (
            Comparison("age", Operator.GE, (30.0,)),
            Comparison("region", Operator.IN, ("north", "east")),
            Not(Comparison("owner", Operator.NE, (False,))),
        )
    )
    assert _plan(Count("credit", where=where)).charge.epsilon == 1.0


_WIDE = (-1e308, 1e308)  # finite, but upper - lower overflows to inf
_TINY = (0.0, 1e-320)  # subnormal: the power-of-two grid underflows to 0.0


@pytest.mark.parametrize(
    "query",
    [
        Sum("credit", "income", bounds=_WIDE),
        Histogram("credit", "income", bounds=_TINY),
        Quantile("credit", "income", bounds=_TINY),
        Sum("credit", "income", bounds=_TINY),
        Mean("credit", "income", bounds=_WIDE),
        Mean("credit", "income", bounds=_TINY),
        Histogram("credit", "income", bounds=_WIDE),
        Quantile("credit", "income", bounds=_WIDE),
    ],
    ids=lambda q: f"{type(q).__name__}{q.bounds}",
)
def test_extreme_finite_bounds_are_planned_or_refused_as_invalid(query: Query) -> None:
    # Malformed input must raise InvalidRequestError (INVALID_ARGUMENT), never anything else;
    # a plan that is made must have finite public labels.
    try:
        plan = _plan(query)
    except InvalidRequestError:
        return
    assert all(math.isfinite(e) for e in plan.bin_edges)
    assert all(p.granularity > 0 for p in plan.parts)


# ------------------------------------------------------------------ charges


def test_count_charge_is_one_laplace_release() -> None:
    plan = _plan(Count("credit"), 0.5)
    assert plan.charge == laplace_charge(epsilon=0.5, sensitivity=1)
    assert [p.name for p in plan.parts] == ["count"]


@pytest.mark.parametrize("mechanism", list(Mechanism))
def test_mean_charge_composes_two_halves(mechanism: Mechanism) -> None:
    delta = 1e-6 if mechanism is Mechanism.GAUSSIAN else 0.0
    plan = _plan(Mean("credit", "income"), 0.8, delta=delta, mechanism=mechanism)
    assert [p.name for p in plan.parts] == ["sum", "count"]
    for part in plan.parts:
        assert part.charge.epsilon == pytest.approx(0.4)
        assert part.charge.delta == pytest.approx(delta / 2)
    assert plan.charge.epsilon == pytest.approx(0.8)
    assert plan.charge.delta == pytest.approx(delta)
    summed = [
        a + b for a, b in zip(plan.parts[0].charge.rdp, plan.parts[1].charge.rdp, strict=True)
    ]
    assert plan.charge.rdp == pytest.approx(summed)


@pytest.mark.parametrize(
    ("query", "sensitivity"),
    [
        (Sum("credit", "debt"), 500_000.0),  # int column: granularity 1
        (Sum("credit", "income"), 500_000.0),  # float column: granularity 2**-1
        (Sum("credit", "age"), 100.0),
        (Sum("credit", "score", bounds=(-3.0, 5.0)), 5.0),
        (Mean("credit", "age"), 41.0),  # centred at 59: (100 - 18) / 2
        (Mean("credit", "income"), 250_000.0),
    ],
)
def test_sum_sensitivity_is_the_largest_clamped_magnitude(query: Query, sensitivity: float) -> None:
    [part] = [p for p in _plan(query).parts if p.name == "sum"]
    assert abs(part.charge.sensitivity * part.granularity - sensitivity) <= part.granularity
    assert math.log2(part.granularity).is_integer()  # a power of two: exact in float64


def test_histogram_plan_has_public_edges_and_labels() -> None:
    plan = _plan(Histogram("credit", "age", bounds=(20.0, 60.0), bins=4))
    assert plan.bin_edges == (20.0, 30.0, 40.0, 50.0, 60.0)
    assert plan.bin_labels == ("[20, 30)", "[30, 40)", "[40, 50)", "[50, 60]")
    assert _plan(Histogram("credit", "region")).bin_labels == REGIONS
    assert _plan(Histogram("credit", "owner")).bin_labels == ("false", "true")


# ------------------------------------------------------------------ execution


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    rows = 500
    return {
        "age": rng.integers(10, 110, rows),  # some outside [18, 100]: clamped
        "income": rng.uniform(-10_000.0, 600_000.0, rows),
        "debt": rng.integers(0, 700_000, rows),
        "score": rng.normal(0.0, 1.0, rows),
        "region": rng.choice(REGIONS, rows),
        "owner": rng.random(rows) < 0.4,
    }


@pytest.fixture(scope="module")
def engine(data: dict[str, np.ndarray]) -> DatasetEngine:
    return DatasetEngine(table_from_arrays(data, schema=SCHEMA))


def _run(engine: DatasetEngine, query: Query) -> tuple[GroupRelease, ...]:
    request = _request(query, EXACT_EPSILON)
    plan = plan_query(request, schema=SCHEMA, policy=EXACT_POLICY)
    return engine.execute(plan, rng=NoNoise())


def _values(groups: tuple[GroupRelease, ...], name: str) -> list[tuple[float, ...]]:
    return [g.measurement(name).values for g in groups]


def test_count_is_exact(engine: DatasetEngine, data: dict[str, np.ndarray]) -> None:
    [group] = _run(engine, Count("credit"))
    assert group.group == ""
    assert group.measurement("count").values == (float(len(data["age"])),)


def test_count_by_group_is_exact(engine: DatasetEngine, data: dict[str, np.ndarray]) -> None:
    groups = _run(engine, Count("credit", group_by="region"))
    assert [g.group for g in groups] == list(REGIONS)
    assert _values(groups, "count") == [(float(np.sum(data["region"] == r)),) for r in REGIONS]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (Comparison("age", Operator.GE, (30.0,)), lambda d: d["age"] >= 30),
        (Comparison("age", Operator.NE, (50.0,)), lambda d: d["age"] != 50),
        (Comparison("income", Operator.LT, (1e5,)), lambda d: d["income"] < 1e5),
        (Comparison("owner", Operator.EQ, (True,)), lambda d: d["owner"]),
        (
            Comparison("region", Operator.IN, ("north", "east")),
            lambda d: np.isin(d["region"], ["north", "east"]),
        ),
        (
            Not(Comparison("region", Operator.IN, ("south",))),
            lambda d: d["region"] != "south",
        ),
        (
            All(
                (Comparison("age", Operator.GT, (40.0,)), Comparison("owner", Operator.NE, (True,)))
            ),
            lambda d: (d["age"] > 40) & ~d["owner"],
        ),
        (
            Any((Comparison("age", Operator.LE, (20.0,)), Comparison("debt", Operator.GT, (6e5,)))),
            lambda d: (d["age"] <= 20) | (d["debt"] > 6e5),
        ),
    ],
    ids=["ge", "ne", "lt", "bool", "in", "not-in", "all", "any"],
)
def test_filtered_count_and_sum_are_exact(
    engine: DatasetEngine, data: dict[str, np.ndarray], where: Filter, expected: object
) -> None:
    mask = expected(data)  # type: ignore[operator]
    [count] = _run(engine, Count("credit", where=where))
    assert count.measurement("count").values == (float(np.sum(mask)),)
    [total] = _run(engine, Sum("credit", "debt", where=where))
    assert total.measurement("sum").values == (
        float(np.clip(data["debt"], 0, 500_000)[mask].sum()),
    )


@pytest.mark.parametrize("column", ["income", "debt", "age"])
def test_sum_is_exact_on_the_reported_grid(
    engine: DatasetEngine, data: dict[str, np.ndarray], column: str
) -> None:
    lower, upper = SCHEMA.column(column).lower, SCHEMA.column(column).upper
    assert lower is not None
    assert upper is not None
    [group] = _run(engine, Sum("credit", column))
    measurement = group.measurement("sum")
    g = measurement.noise.granularity
    [value] = measurement.values
    assert (value / g).is_integer()
    clamped = np.clip(data[column].astype(np.float64), lower, upper)
    assert value == float(np.sum(np.rint(clamped / g)) * g)
    assert abs(value - clamped.sum()) <= len(clamped) * g / 2
    assert measurement.noise.sensitivity == pytest.approx(max(abs(lower), abs(upper)), abs=g)


def test_sum_by_group_with_filter_is_exact(
    engine: DatasetEngine, data: dict[str, np.ndarray]
) -> None:
    where = Comparison("age", Operator.GE, (40.0,))
    groups = _run(engine, Sum("credit", "debt", where=where, group_by="owner"))
    assert [g.group for g in groups] == ["false", "true"]
    clamped = np.clip(data["debt"], 0, 500_000)
    for group, flag in zip(groups, (False, True), strict=True):
        mask = (data["age"] >= 40) & (data["owner"] == flag)
        assert group.measurement("sum").values == (float(clamped[mask].sum()),)


def test_mean_releases_centred_sum_and_count(
    engine: DatasetEngine, data: dict[str, np.ndarray]
) -> None:
    [group] = _run(engine, Mean("credit", "age"))
    total, count = group.measurement("sum"), group.measurement("count")
    assert total.center == 59.0
    assert count.values == (float(len(data["age"])),)
    clamped = np.clip(data["age"], 18, 100)
    assert total.values == (float(np.sum(clamped - 59)),)
    mean = (total.values[0] + total.center * count.values[0]) / count.values[0]
    assert mean == pytest.approx(clamped.mean())


def test_numeric_histogram_is_exact(engine: DatasetEngine, data: dict[str, np.ndarray]) -> None:
    query = Histogram("credit", "income", bounds=(0.0, 400_000.0), bins=8)
    [group] = _run(engine, query)
    expected, _ = np.histogram(np.clip(data["income"], 0.0, 400_000.0), bins=8, range=(0, 4e5))
    assert group.measurement("bins").values == tuple(float(v) for v in expected)


def test_category_histogram_by_group_is_exact(
    engine: DatasetEngine, data: dict[str, np.ndarray]
) -> None:
    groups = _run(engine, Histogram("credit", "region", group_by="owner"))
    for group, flag in zip(groups, (False, True), strict=True):
        expected = [float(np.sum((data["region"] == r) & (data["owner"] == flag))) for r in REGIONS]
        assert group.measurement("bins").values == tuple(expected)


def test_laplace_noise_is_described_in_released_units(engine: DatasetEngine) -> None:
    plan = _plan(Sum("credit", "income"), 0.5)
    [group] = engine.execute(plan, rng=np.random.default_rng(1))
    noise = group.measurement("sum").noise
    assert noise.mechanism is Mechanism.LAPLACE
    assert noise.granularity == 0.5
    assert noise.sensitivity == 500_000.0
    assert noise.scale == pytest.approx(500_000.0 / 0.5)
    [value] = group.measurement("sum").values
    assert (value / noise.granularity).is_integer()


def test_consumers_never_share_cache_entries(data: dict[str, np.ndarray]) -> None:
    # A cached column answers ~50x faster: shared entries would let one consumer time
    # which bounds and bins another had just queried. Same query, two consumers: two
    # entries, and each consumer's second query reuses only its own.
    engine = DatasetEngine(table_from_arrays(data, schema=SCHEMA))
    query = Histogram("credit", "income", bins=8, bounds=(0.0, 90_000.0), group_by="region")
    beta = dataclasses.replace(EXACT_POLICY, name="beta")
    for policy in (EXACT_POLICY, beta, EXACT_POLICY):
        plan = plan_query(_request(query, EXACT_EPSILON), schema=SCHEMA, policy=policy)
        engine.execute(plan, rng=NoNoise())
    owners = sorted(key[1] for cache in engine._caches.values() for key in cache)
    assert owners == ["acme", "acme", "beta", "beta"]  # (bins, codes) each


def test_one_consumers_queries_never_evict_anothers_entries(data: dict[str, np.ndarray]) -> None:
    # With one shared LRU, beta's queries evicted acme's entries: acme could time, by its
    # own cache misses, how much beta was asking (found by review). Each has its own.
    engine = DatasetEngine(table_from_arrays(data, schema=SCHEMA))
    beta = dataclasses.replace(EXACT_POLICY, name="beta")

    def ask(policy: ConsumerPolicy, upper: float) -> None:
        query = Histogram("credit", "income", bins=8, bounds=(0.0, upper))
        plan = plan_query(_request(query, EXACT_EPSILON), schema=SCHEMA, policy=policy)
        engine.execute(plan, rng=NoNoise())

    ask(EXACT_POLICY, 90_000.0)
    mine = dict(engine._caches["acme"])
    for upper in range(1, 3 * DatasetEngine._CACHE_ENTRIES):
        ask(beta, 1000.0 * upper)
    assert dict(engine._caches["acme"]) == mine
    assert len(engine._caches["beta"]) == DatasetEngine._CACHE_ENTRIES


def test_bin_labels_are_exact_and_the_last_bin_is_closed() -> None:
    # ":g" wrote 1000010 as 1e+06, and every bin as half-open although the last one holds
    # the upper bound and every value clamped to it (found by review).
    schema = DatasetSchema("wide", (Column("v", ColumnType.FLOAT, lower=0, upper=2_000_020),))
    request = _request(Histogram("wide", "v", bins=2), EXACT_EPSILON)
    plan = plan_query(request, schema=schema, policy=EXACT_POLICY)
    assert plan.bin_labels == ("[0, 1000010)", "[1000010, 2000020]")
    table = table_from_arrays({"v": np.array([2_000_020.0, 5e9])}, schema=schema)
    [group] = DatasetEngine(table).execute(plan, rng=NoNoise())
    assert group.measurement("bins").values == (0.0, 2.0)


def test_value_on_a_bin_edge_is_counted_in_the_bin_its_label_names() -> None:
    schema = DatasetSchema("edges", (Column("n", ColumnType.INT, lower=0, upper=98),))
    table = table_from_arrays({"n": np.array([49, 49, 49], dtype=np.int64)}, schema=schema)
    request = _request(Histogram("edges", "n", bins=2), EXACT_EPSILON)
    plan = plan_query(request, schema=schema, policy=EXACT_POLICY)
    assert plan.bin_labels == ("[0, 49)", "[49, 98]")
    [group] = DatasetEngine(table).execute(plan, rng=NoNoise())
    assert group.measurement("bins").values == (0.0, 3.0)
