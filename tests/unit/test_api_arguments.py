"""A researcher's wrong argument gets a federation error that says what is wrong, before
anything is sent (found by review: TypeError, AttributeError, a plain ValueError, or the
wrong thing done silently)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from federation import Count, LocalFederation, Mean
from federation.coordinator import Coordinator, _mean_bounds
from federation.errors import InvalidRequestError
from federation.models import ModelSpec
from federation.schema import Column, ColumnType, DatasetSchema


@pytest.fixture
def fed() -> Iterator[Coordinator]:
    # Nothing listens there: every check below must refuse before a node is asked.
    with Coordinator.from_addresses({"a": "127.0.0.1:9"}, consumer="acme") as coordinator:
        yield coordinator


@pytest.mark.parametrize(
    ("query", "options", "message"),
    [
        ("count", {}, "query must be a Count, Sum, Mean, Histogram or Quantile"),
        (Count("credit"), {"epsilon": "0.5"}, "epsilon must be a number"),
        (Count("credit"), {"mechanism": "bogus"}, "mechanism must be one of laplace, gaussian"),
        (Count("credit"), {"min_nodes": "1"}, "min_nodes must be between 1 and 1"),
        (Count("credit"), {"min_nodes": 1.5}, "min_nodes must be between 1 and 1"),
        (Count("credit"), {"confidence": 1.0}, "confidence must be in (0, 1)"),
    ],
)
def test_analyze_refuses_bad_arguments_before_asking_any_node(
    fed: Coordinator, query: Any, options: dict[str, Any], message: str
) -> None:
    options.setdefault("epsilon", 0.5)
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fed.analyze(query, **options)


def test_a_string_is_not_a_list_of_names() -> None:
    with pytest.raises(InvalidRequestError, match="nodes must be a list of distinct node names"):
        LocalFederation.synthetic(nodes="hong-kong")
    with pytest.raises(InvalidRequestError, match="nodes must be a list of distinct node names"):
        LocalFederation.synthetic(nodes=["hong-kong", "hong-kong"])
    with pytest.raises(InvalidRequestError, match=r"got the string 'age' \(write \['age'\]\)"):
        ModelSpec("mlp", "credit", "age", "defaulted")  # type: ignore[arg-type]


def test_a_mean_is_clamped_to_the_bounds_its_nodes_used() -> None:
    # Found by review: with the query's own bounds (100, 200) on ages declared [18, 90],
    # the mean was clamped to the column's bounds: 90, with a zero-width interval.
    schema = DatasetSchema("d", (Column("age", ColumnType.INT, 18, 90),))
    assert _mean_bounds(Mean("d", "age"), schema) == (18.0, 90.0)
    assert _mean_bounds(Mean("d", "age", bounds=(100.0, 200.0)), schema) == (100.0, 200.0)
    assert _mean_bounds(Count("d"), schema) is None
