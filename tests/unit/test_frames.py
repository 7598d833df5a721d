"""pandas frames to node columns: typed per schema, refused with a message naming the column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federation._frames import frame_to_columns
from federation.datasets import CREDIT_SCHEMA, synthetic_credit, write_dataset
from federation.errors import InvalidRequestError
from federation.schema import Column, ColumnType, DatasetSchema

SCHEMA = DatasetSchema(
    name="loans",
    columns=(
        Column("age", ColumnType.INT, 18, 90),
        Column("income", ColumnType.FLOAT, 0, 1e6),
        Column("housing", ColumnType.CATEGORY, domain=("own", "rent")),
        Column("defaulted", ColumnType.BOOL),
    ),
)


def _frame(**overrides: object) -> pd.DataFrame:
    data: dict[str, object] = {
        "age": [30, 41, 52],
        "income": [10_000.5, 20_000, 30_000],
        "housing": ["own", "rent", "own"],
        "defaulted": [False, True, False],
        "customer_id": ["a", "b", "c"],  # not in the schema: not served
    }
    data.update(overrides)
    return pd.DataFrame(data, index=[10, 20, 30])


def test_columns_are_typed_by_the_schema_and_extra_columns_dropped() -> None:
    columns = frame_to_columns(_frame(), schema=SCHEMA, node="hong-kong")
    assert list(columns) == ["age", "income", "housing", "defaulted"]
    assert columns["age"].dtype == np.int64
    assert columns["income"].dtype == np.float64
    assert columns["housing"].dtype == object
    assert columns["defaulted"].dtype == np.bool_
    assert columns["housing"].tolist() == ["own", "rent", "own"]


def test_pandas_nullable_and_category_dtypes_are_accepted() -> None:
    frame = _frame(
        age=pd.array([30, 41, 52], dtype="Int64"),
        income=pd.array([1.0, 2.0, 3.0], dtype="Float64"),
        housing=pd.Categorical(["own", "rent", "own"]),
        defaulted=pd.array([False, True, False], dtype="boolean"),
    )
    columns = frame_to_columns(frame, schema=SCHEMA, node="hong-kong")
    assert columns["age"].tolist() == [30, 41, 52]
    assert columns["defaulted"].tolist() == [False, True, False]
    assert columns["housing"].tolist() == ["own", "rent", "own"]


def test_synthetic_credit_round_trips_through_a_frame() -> None:
    data = synthetic_credit(jurisdiction="shenzhen", rows=100, seed=1)
    columns = frame_to_columns(pd.DataFrame(data), schema=CREDIT_SCHEMA, node="shenzhen")
    for name, values in data.items():
        assert columns[name].tolist() == values.tolist()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"age": [30.0, None, 52.0]}, "column 'age' (int) has missing values"),
        ({"housing": ["own", None, "rent"]}, "column 'housing' (category) has missing values"),
        ({"age": [30.5, 41.0, 52.0]}, "column 'age' (int) cannot be served from dtype float64"),
        ({"income": ["1", "2", "3"]}, "column 'income' (float) cannot be served from dtype"),
        ({"defaulted": [0, 1, 0]}, "column 'defaulted' (bool) cannot be served from dtype int64"),
        ({"housing": [1, 2, 1]}, "column 'housing' (category) must hold strings"),
    ],
)
def test_bad_columns_are_refused_naming_node_and_column(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=r"node 'hong-kong', ") as info:
        frame_to_columns(_frame(**overrides), schema=SCHEMA, node="hong-kong")
    assert message in str(info.value)


def test_a_missing_column_is_named() -> None:
    with pytest.raises(InvalidRequestError, match="lacks schema column.*housing"):
        frame_to_columns(_frame().drop(columns="housing"), schema=SCHEMA, node="shenzhen")


def test_a_non_frame_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="expected a pandas DataFrame; got dict"):
        frame_to_columns({"age": [1]}, schema=SCHEMA, node="shenzhen")  # type: ignore[arg-type]


def test_values_outside_public_bounds_are_caught_when_written(tmp_path: Path) -> None:
    columns = frame_to_columns(_frame(age=[30, 41, 95]), schema=SCHEMA, node="hong-kong")
    with pytest.raises(InvalidRequestError, match="age"):
        write_dataset(columns, tmp_path / "loans.parquet", schema=SCHEMA)
