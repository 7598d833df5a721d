"""Load a dataset's raw records into typed columns: the only place a data file is opened.

Columns are loaded once, at node start, and checked against the operator's schema: a value
outside a category's public domain, a missing value or a wrong type stops the node with a
``ConfigError`` (the message names the column, never a value). Nothing here leaves ``nodes/``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from federation.errors import ConfigError
from federation.schema import Column, ColumnType, DatasetSchema

__all__ = ["Table", "load_table", "table_from_arrays"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float64] | npt.NDArray[np.int64] | npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Table:
    """A dataset in memory: one numpy array per schema column.

    Category columns hold int32 codes into the column's public domain; bool columns hold
    numpy bools; int columns int64; float columns float64.
    """

    schema: DatasetSchema
    columns: dict[str, npt.NDArray[np.generic]]
    rows: int

    def column(self, name: str) -> npt.NDArray[np.generic]:
        """Return the array for a schema column."""
        return self.columns[name]


def load_table(
    path: Path, *, schema: DatasetSchema, file_format: Literal["csv", "parquet"]
) -> Table:
    """Read ``path`` and convert each schema column.

    Raises:
        ConfigError: unreadable file, missing column, missing values or out-of-domain values.
    """
    try:
        if file_format == "parquet":
            arrow = pq.read_table(path, columns=[c.name for c in schema.columns])
        else:
            types = {c.name: _arrow_type(c) for c in schema.columns}
            arrow = pa_csv.read_csv(
                path,
                convert_options=pa_csv.ConvertOptions(
                    column_types=types, include_columns=list(types), strings_can_be_null=False
                ),
            )
    except (OSError, pa.ArrowException, KeyError) as err:
        raise ConfigError(
            f"dataset {schema.name!r}: cannot read {path.name} as {file_format} "
            f"with the declared columns ({type(err).__name__}: "
            f"{_safe(err, [c.name for c in schema.columns])})"
        ) from err
    columns: dict[str, npt.NDArray[np.generic]] = {}
    for c in schema.columns:
        try:
            columns[c.name] = _convert(arrow.column(c.name), c, schema.name)
        except pa.ArrowException as err:  # a Parquet column arrow cannot cast to the type
            raise ConfigError(
                f"dataset {schema.name!r}, column {c.name!r}: cannot read it as "
                f"{c.type.value} ({type(err).__name__}; details withheld: they may quote "
                "the data)"
            ) from err
    log.info("dataset %r loaded: %d columns", schema.name, len(columns))
    return Table(schema=schema, columns=columns, rows=arrow.num_rows)


def table_from_arrays(
    arrays: dict[str, npt.NDArray[np.generic]], *, schema: DatasetSchema
) -> Table:
    """Build a table from in-memory arrays (tests and benchmarks), with the same checks."""
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise ConfigError(f"dataset {schema.name!r}: columns have different lengths")
    converted = {
        c.name: _convert(pa.chunked_array([pa.array(arrays[c.name])]), c, schema.name)
        for c in schema.columns
    }
    return Table(schema=schema, columns=converted, rows=rows.pop())


def _arrow_type(col: Column) -> pa.DataType:
    return {
        ColumnType.INT: pa.int64(),
        ColumnType.FLOAT: pa.float64(),
        ColumnType.BOOL: pa.bool_(),
        ColumnType.CATEGORY: pa.string(),
    }[col.type]


# Arrow's own messages, matched from their start: what follows each prefix is a cell or a
# row of the data, so nothing past it is kept.
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+):")
_FIELD_COUNT = re.compile(r"CSV parse error: Expected (\d+) columns, got (\d+)")
_CSV_MISSING = re.compile(r"Column '([^']*)' in include_columns does not exist in CSV file")
_PARQUET_FIELD = re.compile(r"(No match|Multiple matches) for FieldRef\.Name\((.*?)\) in ")
_ARROW_TYPES = frozenset({"bool", "double", "float", "int32", "int64", "string", "utf8"})


def _safe(err: Exception, columns: Sequence[str]) -> str:
    """What an error reading the data file may say: never text arrow copied from the data.

    Arrow's messages quote cells ("invalid value 'x'", with or without closing quotes)
    and whole rows ("Expected 2 columns, got 3: a,b,c"), so only known messages are
    recognised, from their start, and rebuilt from data-free parts: the CSV column number,
    the target type, field counts, a declared column's name. Anything else is withheld.
    File-system errors are about paths, not data.
    """
    if isinstance(err, OSError) and not isinstance(err, pa.ArrowException):
        return str(err)
    text = str(err)
    if conversion := _CONVERSION.match(text):
        kind = conversion[2] if conversion[2] in _ARROW_TYPES else "the declared type"
        return f"CSV column #{conversion[1]}: a value is not a valid {kind} (value not shown)"
    if counts := _FIELD_COUNT.match(text):
        return f"a row has {counts[2]} fields where {counts[1]} are expected (row not shown)"
    if (missing := _CSV_MISSING.match(text)) and missing[1] in columns:
        return f"the file has no column {missing[1]!r}"
    if (field := _PARQUET_FIELD.match(text)) and field[2] in columns:
        many = field[1] == "Multiple matches"
        return f"the file has {'more than one' if many else 'no'} column {field[2]!r}"
    return "details withheld: arrow's message may quote the data"


def _convert(data: pa.ChunkedArray, col: Column, dataset: str) -> npt.NDArray[np.generic]:
    where = f"dataset {dataset!r}, column {col.name!r}"
    if data.null_count:
        raise ConfigError(f"{where}: has missing values; clean or impute them before serving")
    if col.type is ColumnType.CATEGORY:
        strings = data.cast(pa.string())
        codes = pc.index_in(strings, value_set=pa.array(list(col.domain), pa.string()))
        if codes.null_count:
            raise ConfigError(
                f"{where}: has values outside its declared public domain; "
                "add them to the domain in the config or clean the file"
            )
        return np.asarray(codes.to_numpy(), dtype=np.int32)
    try:
        target = _arrow_type(col)
        values = np.asarray(data.cast(target).to_numpy(), dtype=target.to_pandas_dtype())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ConfigError(f"{where}: cannot be read as {col.type.value}") from err
    # Arrow counts NaN as a value, not a null: NaN survives clamping and turns into -2**63
    # on the integer grid, which would make one record's effect on a sum unbounded.
    if col.type is ColumnType.FLOAT and not np.isfinite(values).all():
        raise ConfigError(f"{where}: has NaN or infinite values; clean them before serving")
    return values
