"""Convert domain values to and from the protocol (the only module that does).

Paired ``*_to_proto`` / ``*_from_proto`` functions; the ``from`` side validates, because on
a node it reads what a possibly hostile caller sent: malformed input raises
``InvalidRequestError`` (INVALID_ARGUMENT), never anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from federation._proto.v1 import node_pb2 as pb
from federation.errors import InvalidRequestError
from federation.queries import (
    All,
    Any,
    Comparison,
    Count,
    Filter,
    FilterValue,
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

__all__ = [
    "AnalyzeRequest",
    "analyze_request_from_proto",
    "analyze_request_to_proto",
    "budget_from_proto",
    "budget_to_proto",
    "description_from_proto",
    "description_to_proto",
    "filter_from_proto",
    "filter_to_proto",
    "query_from_proto",
    "query_to_proto",
    "release_from_proto",
    "release_to_proto",
    "schema_from_proto",
    "schema_to_proto",
]

K = TypeVar("K")

MAX_FILTER_NODES = 256
MAX_FILTER_DEPTH = 32
MAX_IN_VALUES = 1024

_COLUMN_TYPES = {
    ColumnType.INT: pb.COLUMN_TYPE_INT,
    ColumnType.FLOAT: pb.COLUMN_TYPE_FLOAT,
    ColumnType.BOOL: pb.COLUMN_TYPE_BOOL,
    ColumnType.CATEGORY: pb.COLUMN_TYPE_CATEGORY,
}
_OPERATORS = {
    Operator.EQ: pb.OPERATOR_EQ,
    Operator.NE: pb.OPERATOR_NE,
    Operator.LT: pb.OPERATOR_LT,
    Operator.LE: pb.OPERATOR_LE,
    Operator.GT: pb.OPERATOR_GT,
    Operator.GE: pb.OPERATOR_GE,
    Operator.IN: pb.OPERATOR_IN,
}
_MECHANISMS = {Mechanism.LAPLACE: pb.MECHANISM_LAPLACE, Mechanism.GAUSSIAN: pb.MECHANISM_GAUSSIAN}
_KINDS: dict[type, pb.QueryKind] = {
    Count: pb.QUERY_KIND_COUNT,
    Sum: pb.QUERY_KIND_SUM,
    Mean: pb.QUERY_KIND_MEAN,
    Histogram: pb.QUERY_KIND_HISTOGRAM,
    Quantile: pb.QUERY_KIND_QUANTILE,
}


def _reverse(table: Mapping[K, int], value: int, what: str) -> K:
    for key, code in table.items():
        if code == value:
            return key
    raise InvalidRequestError(f"{what}: unknown or unspecified value {value}")


# ------------------------------------------------------------------ schema


def schema_to_proto(schema: DatasetSchema) -> pb.DatasetSchema:
    """Convert a dataset schema to its message."""
    return pb.DatasetSchema(
        name=schema.name,
        description=schema.description,
        columns=[
            pb.Column(
                name=c.name,
                type=_COLUMN_TYPES[c.type],
                has_bounds=c.has_bounds,
                lower=c.lower if c.lower is not None else 0.0,
                upper=c.upper if c.upper is not None else 0.0,
                domain=list(c.domain) if c.type is ColumnType.CATEGORY else [],
                description=c.description,
            )
            for c in schema.columns
        ],
    )


def schema_from_proto(msg: pb.DatasetSchema) -> DatasetSchema:
    """Convert a dataset schema message back to a value."""
    columns = []
    for c in msg.columns:
        ctype = _reverse(_COLUMN_TYPES, c.type, f"column {c.name!r} type")
        columns.append(
            Column(
                name=c.name,
                type=ctype,
                lower=c.lower if c.has_bounds else None,
                upper=c.upper if c.has_bounds else None,
                domain=tuple(c.domain),
                description=c.description,
            )
        )
    return DatasetSchema(name=msg.name, columns=tuple(columns), description=msg.description)


# ------------------------------------------------------------------ filters


def _value_to_proto(value: FilterValue) -> pb.Value:
    if isinstance(value, bool):
        return pb.Value(flag=value)
    if isinstance(value, str):
        return pb.Value(text=value)
    return pb.Value(number=float(value))


def _value_from_proto(msg: pb.Value, column: str) -> FilterValue:
    kind = msg.WhichOneof("kind")
    if kind == "flag":
        return bool(msg.flag)
    if kind == "text":
        return str(msg.text)
    if kind == "number":
        if not math.isfinite(msg.number):
            raise InvalidRequestError(f"filter value for {column!r} must be finite")
        return float(msg.number)
    raise InvalidRequestError(f"filter comparison on {column!r} has an empty value")


def filter_to_proto(expr: Filter) -> pb.Filter:
    """Convert a filter expression tree to its message."""
    if isinstance(expr, Comparison):
        return pb.Filter(
            comparison=pb.Comparison(
                column=expr.column,
                op=_OPERATORS[expr.op],
                values=[_value_to_proto(v) for v in expr.values],
            )
        )
    if isinstance(expr, All):
        return pb.Filter(all=pb.FilterList(items=[filter_to_proto(i) for i in expr.items]))
    if isinstance(expr, Any):
        return pb.Filter(any=pb.FilterList(items=[filter_to_proto(i) for i in expr.items]))
    return pb.Filter(negate=filter_to_proto(expr.item))


def filter_from_proto(msg: pb.Filter) -> Filter:
    """Convert a filter message to an expression tree, enforcing size and depth limits.

    Raises:
        InvalidRequestError: empty node, unknown operator, too many nodes or too deep.
    """
    budget = [MAX_FILTER_NODES]
    return _filter_from_proto(msg, depth=0, budget=budget)


def _filter_from_proto(msg: pb.Filter, *, depth: int, budget: list[int]) -> Filter:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidRequestError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidRequestError(f"filter has more than {MAX_FILTER_NODES} nodes")
    kind = msg.WhichOneof("node")
    if kind == "comparison":
        c = msg.comparison
        op = _reverse(_OPERATORS, c.op, f"filter operator on {c.column!r}")
        if len(c.values) > MAX_IN_VALUES:
            raise InvalidRequestError(
                f"filter on {c.column!r} lists {len(c.values)} values; at most {MAX_IN_VALUES}"
            )
        values = tuple(_value_from_proto(v, c.column) for v in c.values)
        return Comparison(column=c.column, op=op, values=values)
    if kind in ("all", "any"):
        items_msg = msg.all.items if kind == "all" else msg.any.items
        if not items_msg:
            raise InvalidRequestError(f"filter '{kind}' node has no items")
        items = tuple(_filter_from_proto(i, depth=depth + 1, budget=budget) for i in items_msg)
        return All(items) if kind == "all" else Any(items)
    if kind == "negate":
        return Not(_filter_from_proto(msg.negate, depth=depth + 1, budget=budget))
    raise InvalidRequestError("filter has an empty node")


# ------------------------------------------------------------------ queries


def query_to_proto(query: Query) -> pb.Query:
    """Convert a query to its message."""
    msg = pb.Query(kind=_KINDS[type(query)], dataset=query.dataset)
    if query.where is not None:
        msg.where.CopyFrom(filter_to_proto(query.where))
    if query.group_by:
        msg.group_by = query.group_by
    if isinstance(query, Count):
        return msg
    msg.column = query.column
    if query.bounds is not None:
        msg.has_bounds = True
        msg.lower, msg.upper = query.bounds
    if isinstance(query, Histogram | Quantile):
        msg.bins = query.bins
    if isinstance(query, Quantile):
        msg.quantiles.extend(query.quantiles)
    return msg


def query_from_proto(msg: pb.Query) -> Query:
    """Convert a query message to a value (validating what a value can check alone)."""
    kind = _reverse(_KINDS, msg.kind, "query kind")
    where = filter_from_proto(msg.where) if msg.HasField("where") else None
    group_by = msg.group_by or None
    if kind is Count:
        return Count(dataset=msg.dataset, where=where, group_by=group_by)
    if not msg.column:
        raise InvalidRequestError("query needs a column")
    bounds = (msg.lower, msg.upper) if msg.has_bounds else None
    common = {"dataset": msg.dataset, "column": msg.column, "where": where, "group_by": group_by}
    if kind is Sum:
        return Sum(**common, bounds=bounds)  # type: ignore[arg-type]
    if kind is Mean:
        return Mean(**common, bounds=bounds)  # type: ignore[arg-type]
    if kind is Histogram:
        return Histogram(**common, bounds=bounds, bins=msg.bins or 10)  # type: ignore[arg-type]
    return Quantile(
        **common,  # type: ignore[arg-type]
        bounds=bounds,
        bins=msg.bins or 256,
        quantiles=tuple(msg.quantiles) or (0.5,),
    )


@dataclass(frozen=True, slots=True)
class AnalyzeRequest:
    """A query and the privacy parameters the consumer asks to spend on it."""

    query: Query
    epsilon: float
    delta: float
    mechanism: Mechanism


def analyze_request_to_proto(request: AnalyzeRequest) -> pb.AnalyzeRequest:
    """Convert an analyze request to its message."""
    return pb.AnalyzeRequest(
        query=query_to_proto(request.query),
        epsilon=request.epsilon,
        delta=request.delta,
        mechanism=_MECHANISMS[request.mechanism],
    )


def analyze_request_from_proto(msg: pb.AnalyzeRequest) -> AnalyzeRequest:
    """Convert an analyze request message to a value.

    Raises:
        InvalidRequestError: missing query, unknown mechanism or a malformed query.
    """
    if not msg.HasField("query"):
        raise InvalidRequestError("analyze request has no query")
    mechanism = (
        Mechanism.LAPLACE
        if msg.mechanism == pb.MECHANISM_UNSPECIFIED
        else _reverse(_MECHANISMS, msg.mechanism, "mechanism")
    )
    return AnalyzeRequest(
        query=query_from_proto(msg.query),
        epsilon=msg.epsilon,
        delta=msg.delta,
        mechanism=mechanism,
    )


# ------------------------------------------------------------------ releases


def budget_to_proto(status: BudgetStatus) -> pb.BudgetStatus:
    """Convert a budget status to its message."""
    return pb.BudgetStatus(
        total=pb.Budget(epsilon=status.epsilon, delta=status.delta),
        spent_epsilon=status.spent_epsilon,
        remaining_epsilon=status.remaining_epsilon,
        releases=status.releases,
        max_epsilon_per_release=status.max_epsilon_per_release,
    )


def budget_from_proto(msg: pb.BudgetStatus) -> BudgetStatus:
    """Convert a budget status message to a value."""
    return BudgetStatus(
        epsilon=msg.total.epsilon,
        delta=msg.total.delta,
        spent_epsilon=msg.spent_epsilon,
        remaining_epsilon=msg.remaining_epsilon,
        releases=msg.releases,
        max_epsilon_per_release=msg.max_epsilon_per_release,
    )


def _noise_to_proto(noise: NoiseInfo) -> pb.Noise:
    return pb.Noise(
        mechanism=_MECHANISMS[noise.mechanism],
        scale=noise.scale,
        sensitivity=noise.sensitivity,
        granularity=noise.granularity,
    )


def _noise_from_proto(msg: pb.Noise) -> NoiseInfo:
    mechanism = _reverse(_MECHANISMS, msg.mechanism, "noise mechanism")
    return NoiseInfo(
        mechanism=mechanism,
        scale=msg.scale,
        sensitivity=msg.sensitivity,
        granularity=msg.granularity,
    )


def release_to_proto(release: Release) -> pb.AnalyzeResponse:
    """Convert a node's release to its response message."""
    return pb.AnalyzeResponse(
        groups=[
            pb.GroupRelease(
                group=g.group,
                measurements=[
                    pb.Measurement(
                        name=m.name,
                        values=list(m.values),
                        noise=_noise_to_proto(m.noise),
                        center=m.center,
                    )
                    for m in g.measurements
                ],
            )
            for g in release.groups
        ],
        bin_labels=list(release.bin_labels),
        bin_edges=list(release.bin_edges),
        cost=pb.Cost(epsilon=release.cost_epsilon, delta=release.cost_delta),
        budget=budget_to_proto(release.budget),
        receipt=pb.Receipt(
            id=release.receipt.id,
            node_name=release.receipt.node_name,
            consumer=release.receipt.consumer,
            issued_at=release.receipt.issued_at,
        ),
    )


def release_from_proto(msg: pb.AnalyzeResponse) -> Release:
    """Convert an analyze response message to a release value."""
    return Release(
        groups=tuple(
            GroupRelease(
                group=g.group,
                measurements=tuple(
                    Measurement(
                        name=m.name,
                        values=tuple(m.values),
                        noise=_noise_from_proto(m.noise),
                        center=m.center,
                    )
                    for m in g.measurements
                ),
            )
            for g in msg.groups
        ),
        bin_labels=tuple(msg.bin_labels),
        bin_edges=tuple(msg.bin_edges),
        cost_epsilon=msg.cost.epsilon,
        cost_delta=msg.cost.delta,
        budget=budget_from_proto(msg.budget),
        receipt=Receipt(
            id=msg.receipt.id,
            node_name=msg.receipt.node_name,
            consumer=msg.receipt.consumer,
            issued_at=msg.receipt.issued_at,
        ),
    )


def description_to_proto(desc: NodeDescription) -> pb.DescribeResponse:
    """Convert a node description to its response message."""
    return pb.DescribeResponse(
        node_name=desc.node_name,
        jurisdiction=desc.jurisdiction,
        software_version=desc.software_version,
        datasets=[schema_to_proto(s) for s in desc.datasets],
        consumer=desc.consumer,
        budget=budget_to_proto(desc.budget),
        allowed_operations=list(desc.allowed_operations),
    )


def description_from_proto(msg: pb.DescribeResponse) -> NodeDescription:
    """Convert a describe response message to a node description."""
    return NodeDescription(
        node_name=msg.node_name,
        jurisdiction=msg.jurisdiction,
        software_version=msg.software_version,
        datasets=tuple(schema_from_proto(s) for s in msg.datasets),
        consumer=msg.consumer,
        budget=budget_from_proto(msg.budget),
        allowed_operations=tuple(msg.allowed_operations),
    )
