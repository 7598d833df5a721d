"""Loading raw data at the node: what a bad file does (a clear ConfigError, never a leak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from federation.errors import ConfigError
from federation.schema import Column, ColumnType, DatasetSchema
from nodes.data import load_table, table_from_arrays

SCHEMA = DatasetSchema("d", (Column("x", ColumnType.FLOAT, lower=0, upper=10),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_in_parquet_stops_the_node(tmp_path: Path, bad: float) -> None:
    # Arrow counts NaN as a value, not a null; unchecked, it became -2**63 on the sum grid.
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"x": [1.0, bad, 3.0]}), path)
    with pytest.raises(ConfigError, match="'x': has NaN or infinite values") as info:
        load_table(path, schema=SCHEMA, file_format="parquet")
    assert "1.0" not in str(info.value)  # names the column, never a value


def test_a_cell_of_the_wrong_type_is_named_by_column_never_quoted(tmp_path: Path) -> None:
    # Arrow's own message quotes the cell; an operator's log or terminal must not get it.
    path = tmp_path / "d.csv"
    path.write_text("x\n1.5\nSECRET_VALUE_42\n")
    with pytest.raises(ConfigError, match="CSV column #0") as info:
        load_table(path, schema=SCHEMA, file_format="csv")
    assert "SECRET" not in str(info.value)


def test_non_finite_float_in_arrays_is_refused() -> None:
    with pytest.raises(ConfigError, match="NaN or infinite"):
        table_from_arrays({"x": np.array([1.0, np.nan])}, schema=SCHEMA)


def test_missing_value_in_csv_stops_the_node(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("x\n1.5\n\n2.5\nNaN\n")
    with pytest.raises(ConfigError, match="missing values|NaN"):
        load_table(path, schema=SCHEMA, file_format="csv")
