"""Turn a researcher's pandas DataFrame into typed numpy columns for a local node.

pandas is optional (the ``notebook`` extra): it is imported by the caller's frame, never here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from federation.errors import InvalidRequestError
from federation.schema import ColumnType, DatasetSchema

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["frame_to_columns"]


def frame_to_columns(
    frame: pd.DataFrame, *, schema: DatasetSchema, node: str
) -> dict[str, npt.NDArray[Any]]:
    """Return one numpy array per schema column of ``frame``, typed for ``write_dataset``.

    Columns of the frame that the schema does not declare are not served (left out). The
    index is ignored. Messages name the node and column, never a value.

    Raises:
        InvalidRequestError: ``frame`` is not a DataFrame, a schema column is missing or
            holds missing values (NaN, None, NA), or its dtype does not fit the column type.
    """
    if not (hasattr(frame, "columns") and hasattr(frame, "isna")):
        raise InvalidRequestError(
            f"node {node!r}: expected a pandas DataFrame; got {type(frame).__name__}"
        )
    missing = [c.name for c in schema.columns if c.name not in frame.columns]
    if missing:
        raise InvalidRequestError(
            f"node {node!r}: the frame lacks schema column(s) {', '.join(missing)} "
            f"of dataset {schema.name!r}"
        )
    out: dict[str, npt.NDArray[Any]] = {}
    for column in schema.columns:
        series = frame[column.name]
        where = f"node {node!r}, column {column.name!r} ({column.type.value})"
        if bool(series.isna().any()):
            raise InvalidRequestError(
                f"{where} has missing values; drop or fill them first (a node refuses them)"
            )
        out[column.name] = _to_numpy(series, column.type, where)
    return out


def _to_numpy(series: pd.Series[Any], kind: ColumnType, where: str) -> npt.NDArray[Any]:
    from pandas.api import types

    if kind is ColumnType.CATEGORY:
        values: npt.NDArray[Any] = series.to_numpy(dtype=object)
        if not all(isinstance(v, str) for v in values):
            raise InvalidRequestError(f"{where} must hold strings; got dtype {series.dtype}")
        return values
    dtype = series.dtype
    is_bool = types.is_bool_dtype(dtype)
    fits = {
        ColumnType.INT: types.is_integer_dtype(dtype) and not is_bool,
        ColumnType.FLOAT: types.is_numeric_dtype(dtype) and not is_bool,
        ColumnType.BOOL: is_bool,
    }[kind]
    if not fits:
        raise InvalidRequestError(f"{where} cannot be served from dtype {dtype}")
    target = {ColumnType.INT: np.int64, ColumnType.FLOAT: np.float64, ColumnType.BOOL: np.bool_}
    converted: npt.NDArray[Any] = series.to_numpy(dtype=target[kind])
    return converted
