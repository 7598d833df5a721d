"""The schema contract: what nodes compare, and the digest a request carries."""

from __future__ import annotations

import dataclasses

import pytest

from federation.errors import InvalidRequestError, SchemaMismatchError
from federation.schema import (
    Column,
    ColumnType,
    DatasetSchema,
    check_compatible,
    check_schema_digest,
    refuse_changed_schema,
)

INCOME = Column("income", ColumnType.FLOAT, 0.0, 1_000_000.0, description="yearly")
HOUSING = Column("housing", ColumnType.CATEGORY, domain=("own", "rent"))
SCHEMA = DatasetSchema("credit", (INCOME, HOUSING))


def test_the_digest_covers_the_contract_and_nothing_else() -> None:
    digest = SCHEMA.contract_digest()
    assert len(digest) == 64
    # What check_compatible ignores, the digest ignores: column order, descriptions,
    # a bound written as an int.
    same = [
        DatasetSchema("credit", (HOUSING, INCOME)),
        DatasetSchema("credit", (dataclasses.replace(INCOME, description=""), HOUSING), "x"),
        DatasetSchema("credit", (dataclasses.replace(INCOME, upper=1_000_000), HOUSING)),
    ]
    for schema in same:
        assert schema.contract_digest() == digest
        assert check_compatible({"a": SCHEMA, "b": schema}) == []
    # What it compares, the digest covers: exact bounds, domain order, type, names.
    other = [
        DatasetSchema("credit", (dataclasses.replace(INCOME, upper=1_000_010.0), HOUSING)),
        DatasetSchema("credit", (INCOME, dataclasses.replace(HOUSING, domain=("rent", "own")))),
        DatasetSchema("credit", (dataclasses.replace(INCOME, type=ColumnType.INT), HOUSING)),
        DatasetSchema("credit", (INCOME,)),
        DatasetSchema("loans", (INCOME, HOUSING)),
    ]
    for schema in other:
        assert schema.contract_digest() != digest
    for schema in other[:4]:
        assert check_compatible({"a": SCHEMA, "b": schema}) != []


def test_bounds_are_compared_exactly() -> None:
    # Six significant digits showed 1000000 and 1000010 both as 1e+06: they "agreed".
    moved = DatasetSchema("credit", (dataclasses.replace(INCOME, upper=1_000_010.0), HOUSING))
    [line] = check_compatible({"a": SCHEMA, "b": moved})
    assert "a: float [0.0, 1000000.0]; b: float [0.0, 1000010.0]" in line


def test_a_request_for_another_schema_is_refused_and_a_malformed_digest_is_invalid() -> None:
    refuse_changed_schema(SCHEMA, SCHEMA.contract_digest(), node="hk")
    refuse_changed_schema(SCHEMA, "", node="hk")  # older coordinators: no check
    moved = DatasetSchema("credit", (dataclasses.replace(INCOME, lower=-1.0), HOUSING))
    with pytest.raises(SchemaMismatchError, match="node 'hk'.*nothing was charged"):
        refuse_changed_schema(SCHEMA, moved.contract_digest(), node="hk")
    assert check_schema_digest("") == ""
    for bad in ("abc", "A" * 64, "g" * 64, "0" * 65):
        with pytest.raises(InvalidRequestError, match="schema_sha256"):
            check_schema_digest(bad)


def test_category_domains_are_compared_value_by_value() -> None:
    # Joined with ", ", ("Washington, DC", "Paris") and ("Washington", "DC, Paris") read
    # the same and "agreed" (review).
    one = DatasetSchema(
        "d", (Column("city", ColumnType.CATEGORY, domain=("Washington, DC", "Paris")),)
    )
    two = DatasetSchema(
        "d", (Column("city", ColumnType.CATEGORY, domain=("Washington", "DC, Paris")),)
    )
    assert check_compatible({"a": one, "b": two}) != []
