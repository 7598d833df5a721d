"""Round trips and input limits of federation.wire (the only domain <-> protocol converter)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation._proto.v1 import node_pb2 as pb
from federation.errors import InvalidRequestError
from federation.filters import format_filter
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
from federation.releases import (
    BudgetStatus,
    GroupRelease,
    Measurement,
    NodeDescription,
    NoiseInfo,
    Receipt,
    Release,
)
from federation.schema import Column, ColumnType, DatasetSchema
from federation.wire import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    MAX_IN_VALUES,
    AnalyzeRequest,
    analyze_request_from_proto,
    analyze_request_to_proto,
    budget_from_proto,
    budget_to_proto,
    description_from_proto,
    description_to_proto,
    filter_from_proto,
    filter_to_proto,
    query_from_proto,
    query_to_proto,
    release_from_proto,
    release_to_proto,
    schema_from_proto,
    schema_to_proto,
)


def _typed(expr: Filter) -> object:
    """A structural view that also compares value types (True == 1.0 in Python)."""
    if isinstance(expr, Comparison):
        return (expr.column, expr.op, tuple((type(v), v) for v in expr.values))
    if isinstance(expr, Not):
        return ("not", _typed(expr.item))
    return (type(expr).__name__, tuple(_typed(item) for item in expr.items))


def _over_the_wire(msg: object) -> object:
    """Serialise and parse a message, as the network does."""
    return type(msg).FromString(msg.SerializeToString())  # type: ignore[attr-defined]


# ------------------------------------------------------------------ strategies

_finite = st.floats(allow_nan=False, allow_infinity=False)
_names = st.sampled_from(["a", "b", "age", "region", "x_1"])
_values = st.one_of(_finite, st.text(max_size=8), st.booleans())


@st.composite
def _comparisons(draw: st.DrawFn) -> Comparison:
    op = draw(st.sampled_from(Operator))
    count = draw(st.integers(min_value=1, max_value=5)) if op is Operator.IN else 1
    values = tuple(draw(_values) for _ in range(count))
    return Comparison(draw(_names), op, values)


def _groups(children: st.SearchStrategy[Filter]) -> st.SearchStrategy[Filter]:
    items = st.lists(children, min_size=1, max_size=4).map(tuple)
    return st.one_of(children.map(Not), items.map(All), items.map(Any))


filters: st.SearchStrategy[Filter] = st.recursive(_comparisons(), _groups, max_leaves=16)


@st.composite
def _bounds(draw: st.DrawFn) -> tuple[float, float]:
    small = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
    lower, upper = sorted((draw(small), draw(small)))
    if not lower < upper:
        upper = lower + 1.0
    return (lower, upper)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    kind = draw(st.sampled_from([Count, Sum, Mean, Histogram, Quantile]))
    common: dict[str, object] = {
        "dataset": draw(st.sampled_from(["credit", "loans", ""])),
        "where": draw(st.none() | filters),
        "group_by": draw(st.none() | _names),
    }
    if kind is Count:
        return Count(**common)  # type: ignore[arg-type]
    common["column"] = draw(_names)
    common["bounds"] = draw(st.none() | _bounds())
    if kind is Histogram:
        common["bins"] = draw(st.integers(min_value=1, max_value=4096))
    if kind is Quantile:
        common["bins"] = draw(st.integers(min_value=2, max_value=4096))
        unit = st.floats(min_value=0.0, max_value=1.0)
        common["quantiles"] = tuple(draw(st.lists(unit, min_size=1, max_size=8)))
    return kind(**common)  # type: ignore[no-any-return]


@st.composite
def _columns(draw: st.DrawFn, name: str) -> Column:
    ctype = draw(st.sampled_from(ColumnType))
    description = draw(st.text(max_size=10))
    if ctype is ColumnType.CATEGORY:
        domain = draw(
            st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True)
        )
        return Column(name, ctype, domain=tuple(domain), description=description)
    if ctype.is_numeric and draw(st.booleans()):
        lower, upper = draw(_bounds())
        return Column(name, ctype, lower=lower, upper=upper, description=description)
    return Column(name, ctype, description=description)


@st.composite
def schemas(draw: st.DrawFn) -> DatasetSchema:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), unique=True))
    columns = tuple(draw(_columns(name)) for name in names)
    return DatasetSchema(draw(st.text(max_size=8)), columns, description=draw(st.text(max_size=8)))


_non_negative = st.floats(min_value=0.0, max_value=1e12)
budgets = st.builds(
    BudgetStatus,
    epsilon=_non_negative,
    delta=st.floats(min_value=0.0, max_value=0.999),
    spent_epsilon=_non_negative,
    remaining_epsilon=_non_negative,
    releases=st.integers(min_value=0, max_value=2**63),
    max_epsilon_per_release=_non_negative,
    max_delta_per_release=st.none() | st.floats(min_value=0.0, max_value=0.999),
)
_noise = st.builds(
    NoiseInfo,
    mechanism=st.sampled_from(Mechanism),
    scale=_non_negative,
    sensitivity=_non_negative,
    granularity=_non_negative,
)
_measurements = st.builds(
    Measurement,
    name=st.sampled_from(["count", "sum", "bins"]),
    values=st.lists(_finite, max_size=6).map(tuple),
    noise=_noise,
    center=_finite,
)
releases = st.builds(
    Release,
    groups=st.lists(
        st.builds(
            GroupRelease,
            group=st.text(max_size=6),
            measurements=st.lists(_measurements, max_size=3).map(tuple),
        ),
        max_size=4,
    ).map(tuple),
    bin_labels=st.lists(st.text(max_size=8), max_size=4).map(tuple),
    bin_edges=st.lists(_finite, max_size=5).map(tuple),
    cost_epsilon=_non_negative,
    cost_delta=st.floats(min_value=0.0, max_value=0.999),
    budget=budgets,
    receipt=st.builds(
        Receipt,
        id=st.text(max_size=32),
        node_name=st.text(max_size=10),
        consumer=st.text(max_size=10),
        issued_at=_non_negative,
    ),
)


# ------------------------------------------------------------------ round trips


@settings(max_examples=100)
@given(filters)
def test_filter_round_trips(expr: Filter) -> None:
    back = filter_from_proto(_over_the_wire(filter_to_proto(expr)))  # type: ignore[arg-type]
    assert back == expr
    assert _typed(back) == _typed(expr)


@settings(max_examples=100)
@given(queries())
def test_query_round_trips(query: Query) -> None:
    back = query_from_proto(_over_the_wire(query_to_proto(query)))  # type: ignore[arg-type]
    assert back == query
    if query.where is not None:
        assert back.where is not None
        assert _typed(back.where) == _typed(query.where)


@pytest.mark.parametrize(
    "query",
    [
        Count("credit"),
        Count("credit", where=Comparison("age", Operator.GE, (30.0,)), group_by="region"),
        Sum("credit", "income", bounds=(0.0, 500_000.0)),
        Sum("credit", "income", group_by="owner"),
        Mean("credit", "income", where=Not(Comparison("owner", Operator.EQ, (True,)))),
        Mean("credit", "age", bounds=(-1.5, 2.25), group_by="region"),
        Histogram("credit", "region"),
        Histogram("credit", "age", bounds=(18.0, 90.0), bins=8, group_by="owner"),
        Quantile("credit", "income", quantiles=(0.1, 0.5, 0.9), bins=64),
        Quantile(
            "credit",
            "income",
            quantiles=(0.0, 1.0),
            bounds=(0.0, 1e6),
            where=Any((Comparison("region", Operator.IN, ("north", "east")),)),
        ),
    ],
    ids=lambda q: type(q).__name__,
)
def test_each_query_kind_round_trips(query: Query) -> None:
    assert query_from_proto(query_to_proto(query)) == query


@settings(max_examples=50)
@given(
    queries(),
    st.floats(min_value=1e-9, max_value=1e3),
    st.floats(min_value=0.0, max_value=0.5),
    st.sampled_from(Mechanism),
)
def test_analyze_request_round_trips(
    query: Query, epsilon: float, delta: float, mechanism: Mechanism
) -> None:
    request = AnalyzeRequest(query=query, epsilon=epsilon, delta=delta, mechanism=mechanism)
    msg = _over_the_wire(analyze_request_to_proto(request))
    assert analyze_request_from_proto(msg) == request  # type: ignore[arg-type]


def test_analyze_request_without_mechanism_means_laplace() -> None:
    msg = pb.AnalyzeRequest(query=query_to_proto(Count("credit")), epsilon=0.5)
    assert analyze_request_from_proto(msg).mechanism is Mechanism.LAPLACE


def test_analyze_request_without_query_is_invalid() -> None:
    with pytest.raises(InvalidRequestError, match="no query"):
        analyze_request_from_proto(pb.AnalyzeRequest(epsilon=0.5))


def test_analyze_request_with_unknown_mechanism_is_invalid() -> None:
    msg = pb.AnalyzeRequest(query=query_to_proto(Count("credit")), epsilon=0.5, mechanism=7)
    with pytest.raises(InvalidRequestError, match="mechanism"):
        analyze_request_from_proto(msg)


@pytest.mark.parametrize(
    "msg",
    [
        pb.Query(dataset="credit"),  # QUERY_KIND_UNSPECIFIED
        pb.Query(kind=99, dataset="credit"),
        pb.Query(kind=pb.QUERY_KIND_SUM, dataset="credit"),  # no column
        pb.Query(kind=pb.QUERY_KIND_SUM, column="a", has_bounds=True, lower=2.0, upper=1.0),
        pb.Query(kind=pb.QUERY_KIND_MEAN, column="a", has_bounds=True, upper=math.inf),
        pb.Query(kind=pb.QUERY_KIND_HISTOGRAM, column="a", bins=5000),
        pb.Query(kind=pb.QUERY_KIND_QUANTILE, column="a", quantiles=[1.5]),
        pb.Query(kind=pb.QUERY_KIND_QUANTILE, column="a", quantiles=[math.nan]),
        pb.Query(kind=pb.QUERY_KIND_QUANTILE, column="a", bins=1),
        pb.Query(kind=pb.QUERY_KIND_COUNT, where=pb.Filter()),
    ],
)
def test_malformed_query_is_invalid(msg: pb.Query) -> None:
    with pytest.raises(InvalidRequestError):
        query_from_proto(msg)


_doubles = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=150)
@given(
    kind=st.integers(min_value=0, max_value=6),
    column=st.sampled_from(["", "a"]),
    has_bounds=st.booleans(),
    lower=_doubles,
    upper=_doubles,
    bins=st.integers(min_value=0, max_value=2**32 - 1),
    quantiles=st.lists(_doubles, max_size=70),
)
def test_any_query_message_converts_or_raises_invalid_request(
    kind: int,
    column: str,
    has_bounds: bool,
    lower: float,
    upper: float,
    bins: int,
    quantiles: list[float],
) -> None:
    msg = pb.Query(
        kind=kind,  # type: ignore[arg-type]
        dataset="credit",
        column=column,
        has_bounds=has_bounds,
        lower=lower,
        upper=upper,
        bins=bins,
        quantiles=quantiles,
    )
    try:
        query = query_from_proto(msg)
    except InvalidRequestError:
        return
    assert query_from_proto(query_to_proto(query)) == query


@settings(max_examples=50)
@given(schemas())
def test_schema_round_trips(schema: DatasetSchema) -> None:
    assert schema_from_proto(_over_the_wire(schema_to_proto(schema))) == schema  # type: ignore[arg-type]


def test_schema_round_trip_keeps_bounds_domains_and_bool_columns() -> None:
    schema = DatasetSchema(
        "credit",
        (
            Column("age", ColumnType.INT, lower=18, upper=100, description="years"),
            Column("income", ColumnType.FLOAT, lower=-0.5, upper=5e5),
            Column("score", ColumnType.FLOAT),
            Column("owner", ColumnType.BOOL),
            Column("region", ColumnType.CATEGORY, domain=("south", "north", "east")),
        ),
        description="synthetic",
    )
    back = schema_from_proto(schema_to_proto(schema))
    assert back == schema
    assert back.column("region").domain == ("south", "north", "east")  # code order kept
    assert back.column("owner").domain == ("false", "true")
    assert not back.column("score").has_bounds


def test_schema_with_unspecified_column_type_is_invalid() -> None:
    msg = pb.DatasetSchema(name="credit", columns=[pb.Column(name="age")])
    with pytest.raises(InvalidRequestError, match="age"):
        schema_from_proto(msg)


@settings(max_examples=50)
@given(releases)
def test_release_round_trips(release: Release) -> None:
    assert release_from_proto(_over_the_wire(release_to_proto(release))) == release  # type: ignore[arg-type]


@settings(max_examples=50)
@given(budgets)
def test_budget_round_trips(status: BudgetStatus) -> None:
    assert budget_from_proto(_over_the_wire(budget_to_proto(status))) == status  # type: ignore[arg-type]


@settings(max_examples=30)
@given(
    st.lists(schemas(), max_size=3).map(tuple),
    budgets,
    st.lists(st.sampled_from(["describe", "analyze", "train"]), unique=True).map(tuple),
)
def test_description_round_trips(
    datasets: tuple[DatasetSchema, ...], budget: BudgetStatus, operations: tuple[str, ...]
) -> None:
    desc = NodeDescription(
        node_name="hong-kong",
        jurisdiction="HK",
        software_version="0.1.0",
        datasets=datasets,
        consumer="acme",
        budget=budget,
        allowed_operations=operations,
    )
    assert description_from_proto(_over_the_wire(description_to_proto(desc))) == desc  # type: ignore[arg-type]


def test_release_with_negative_noise_scale_is_invalid() -> None:
    noise = pb.Noise(mechanism=pb.MECHANISM_LAPLACE, scale=-1.0, granularity=1.0)
    msg = pb.AnalyzeResponse(
        groups=[pb.GroupRelease(measurements=[pb.Measurement(name="count", noise=noise)])]
    )
    with pytest.raises(InvalidRequestError, match="scale"):
        release_from_proto(msg)


# ------------------------------------------------------------------ filter limits

_LEAF = pb.Filter(
    comparison=pb.Comparison(column="a", op=pb.OPERATOR_EQ, values=[pb.Value(number=1.0)])
)


def _negations(levels: int) -> pb.Filter:
    """A chain Not(Not(...(a == 1))) that is ``levels`` nodes deep (the leaf included)."""
    msg = _LEAF
    for _ in range(levels - 1):
        msg = pb.Filter(negate=msg)
    return msg


def _conjunctions(levels: int) -> pb.Filter:
    """A chain All(All(...(a == 1))) that is ``levels`` nodes deep."""
    msg = _LEAF
    for _ in range(levels - 1):
        msg = pb.Filter(all=pb.FilterList(items=[msg]))
    return msg


def _all_of(comparisons: int) -> pb.Filter:
    """An All node over ``comparisons`` leaves: ``comparisons + 1`` nodes."""
    return pb.Filter(all=pb.FilterList(items=[_LEAF] * comparisons))


def test_filter_as_deep_as_the_text_parser_allows_is_accepted() -> None:
    # federation.filters counts the root as level 1 and allows MAX_FILTER_DEPTH levels.
    msg = _negations(MAX_FILTER_DEPTH)
    expr = filter_from_proto(msg)
    assert filter_to_proto(expr) == msg
    format_filter(expr)  # the text side accepts it too


# protobuf itself refuses messages nested ~100 deep; All costs two message levels per node.
@pytest.mark.parametrize("build", [_negations, _conjunctions])
@pytest.mark.parametrize("extra", [2, 10])
def test_filter_deeper_than_max_depth_is_invalid(build: object, extra: int) -> None:
    msg = build(MAX_FILTER_DEPTH + extra)  # type: ignore[operator]
    with pytest.raises(InvalidRequestError, match="deeper than"):
        filter_from_proto(msg)


def test_filter_one_level_deeper_than_the_text_parser_allows_is_invalid() -> None:
    too_deep = Not(filter_from_proto(_negations(MAX_FILTER_DEPTH)))
    with pytest.raises(InvalidRequestError, match="nested more than"):
        format_filter(too_deep)
    with pytest.raises(InvalidRequestError, match="deeper than"):
        filter_from_proto(filter_to_proto(too_deep))


def test_filter_with_max_nodes_is_accepted_and_one_more_is_invalid() -> None:
    expr = filter_from_proto(_all_of(MAX_FILTER_NODES - 1))
    assert isinstance(expr, All)
    assert len(expr.items) == MAX_FILTER_NODES - 1
    with pytest.raises(InvalidRequestError, match=f"more than {MAX_FILTER_NODES} nodes"):
        filter_from_proto(_all_of(MAX_FILTER_NODES))


def test_node_limit_counts_the_whole_tree_not_one_branch() -> None:
    half = pb.Filter(all=pb.FilterList(items=[_LEAF] * (MAX_FILTER_NODES // 2)))
    msg = pb.Filter(any=pb.FilterList(items=[half, half]))
    with pytest.raises(InvalidRequestError, match="nodes"):
        filter_from_proto(msg)


def _in_list(count: int) -> pb.Filter:
    values = [pb.Value(number=float(i)) for i in range(count)]
    return pb.Filter(comparison=pb.Comparison(column="a", op=pb.OPERATOR_IN, values=values))


def test_in_with_max_values_is_accepted_and_one_more_is_invalid() -> None:
    expr = filter_from_proto(_in_list(MAX_IN_VALUES))
    assert isinstance(expr, Comparison)
    assert len(expr.values) == MAX_IN_VALUES
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_IN_VALUES}"):
        filter_from_proto(_in_list(MAX_IN_VALUES + 1))


@pytest.mark.parametrize(
    "msg",
    [
        pb.Filter(),
        pb.Filter(all=pb.FilterList()),
        pb.Filter(any=pb.FilterList()),
        pb.Filter(negate=pb.Filter()),
        pb.Filter(all=pb.FilterList(items=[_LEAF, pb.Filter()])),
        pb.Filter(any=pb.FilterList(items=[pb.Filter(all=pb.FilterList())])),
    ],
    ids=["bare", "empty-all", "empty-any", "negate-empty", "all-with-empty", "any-empty-all"],
)
def test_empty_filter_node_is_invalid(msg: pb.Filter) -> None:
    with pytest.raises(InvalidRequestError, match="empty|no items"):
        filter_from_proto(msg)


@pytest.mark.parametrize("op", [pb.OPERATOR_UNSPECIFIED, 42])
def test_unspecified_or_unknown_operator_is_invalid(op: int) -> None:
    msg = pb.Filter(
        comparison=pb.Comparison(column="age", op=op, values=[pb.Value(number=1.0)])  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidRequestError, match="operator on 'age'"):
        filter_from_proto(msg)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [pb.Value()],
        [pb.Value(number=math.inf)],
        [pb.Value(number=-math.inf)],
        [pb.Value(number=math.nan)],
        [pb.Value(number=1.0), pb.Value(number=2.0)],  # EQ takes one value
    ],
    ids=["none", "empty-value", "inf", "-inf", "nan", "two-values-for-eq"],
)
def test_malformed_comparison_values_are_invalid(values: list[pb.Value]) -> None:
    msg = pb.Filter(comparison=pb.Comparison(column="age", op=pb.OPERATOR_EQ, values=values))
    with pytest.raises(InvalidRequestError, match="'age'"):
        filter_from_proto(msg)


def _raw_filters() -> st.SearchStrategy[pb.Filter]:
    value = st.one_of(
        st.builds(pb.Value),
        st.builds(lambda x: pb.Value(number=x), _doubles),
        st.builds(lambda s: pb.Value(text=s), st.text(max_size=4)),
        st.builds(lambda b: pb.Value(flag=b), st.booleans()),
    )
    leaf = st.one_of(
        st.just(pb.Filter()),
        st.builds(
            lambda column, op, values: pb.Filter(
                comparison=pb.Comparison(column=column, op=op, values=values)
            ),
            st.sampled_from(["", "a"]),
            st.integers(min_value=0, max_value=9),
            st.lists(value, max_size=3),
        ),
    )

    def extend(children: st.SearchStrategy[pb.Filter]) -> st.SearchStrategy[pb.Filter]:
        items = st.lists(children, max_size=3)
        return st.one_of(
            children.map(lambda c: pb.Filter(negate=c)),
            items.map(lambda i: pb.Filter(all=pb.FilterList(items=i))),
            items.map(lambda i: pb.Filter(any=pb.FilterList(items=i))),
        )

    return st.recursive(leaf, extend, max_leaves=10)


@settings(max_examples=150)
@given(_raw_filters())
def test_any_filter_message_converts_or_raises_invalid_request(msg: pb.Filter) -> None:
    try:
        expr = filter_from_proto(msg)
    except InvalidRequestError:
        return
    assert filter_from_proto(filter_to_proto(expr)) == expr
