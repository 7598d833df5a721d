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


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        ("SECRET_VALUE_42", "CSV column #0: a value is not a valid double (value not shown)"),
        ("O'Brien SECRET", "CSV column #0: a value is not a valid double"),
        ("'SECRET", "CSV column #0: a value is not a valid double"),
        ('"SECRET line1\nline2"', "CSV column #0: a value is not a valid double"),
        ("2,SECRET", "a row has 2 fields where 1 are expected"),
        # A row that itself looks like arrow's wording must not be echoed either.
        ("1,2,3,conversion error to SECRET", "a row has 4 fields where 1 are expected"),
    ],
)
def test_a_bad_cell_is_placed_never_quoted(tmp_path: Path, cell: str, said: str) -> None:
    # Arrow's own messages quote cells (closing quote or not) and whole rows.
    path = tmp_path / "d.csv"
    path.write_text(f"x\n1.5\n{cell}\n")
    with pytest.raises(ConfigError, match="cannot read d.csv") as info:
        load_table(path, schema=SCHEMA, file_format="csv")
    assert said in str(info.value)
    assert "SECRET" not in str(info.value)


def test_a_missing_declared_column_is_named(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("y\n1.5\n")
    with pytest.raises(ConfigError, match="the file has no column 'x'"):
        load_table(csv_path, schema=SCHEMA, file_format="csv")
    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"y": [1.5]}), parquet_path)
    with pytest.raises(ConfigError, match="the file has no column 'x'"):
        load_table(parquet_path, schema=SCHEMA, file_format="parquet")


def test_non_finite_float_in_arrays_is_refused() -> None:
    with pytest.raises(ConfigError, match="NaN or infinite"):
        table_from_arrays({"x": np.array([1.0, np.nan])}, schema=SCHEMA)


def test_missing_value_in_csv_stops_the_node(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("x\n1.5\n\n2.5\nNaN\n")
    with pytest.raises(ConfigError, match="missing values|NaN"):
        load_table(path, schema=SCHEMA, file_format="csv")


def test_parquet_columns_arrow_cannot_read_are_config_errors_without_values(
    tmp_path: Path,
) -> None:
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"x": [[1.0]]}), nested)
    with pytest.raises(ConfigError, match="column 'x': cannot read it as float"):
        load_table(nested, schema=SCHEMA, file_format="parquet")
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.table([pa.array([1.0]), pa.array([2.0])], names=["x", "x"]), twice)
    with pytest.raises(ConfigError, match="the file has more than one column 'x'"):
        load_table(twice, schema=SCHEMA, file_format="parquet")
    category = DatasetSchema("d", (Column("x", ColumnType.CATEGORY, domain=("a", "b")),))
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"x": [b"\xffSECRET"]}), binary)
    with pytest.raises(ConfigError, match="cannot read it as category") as info:
        load_table(binary, schema=category, file_format="parquet")
    assert "SECRET" not in str(info.value)
