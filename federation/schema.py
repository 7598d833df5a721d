"""Public dataset schemas: the cross-border data contract that nodes declare and agree on.

A schema is public metadata written by the node operator. It never comes from the data:
bounds and category domains are declared, so publishing them leaks nothing about a record.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from federation.errors import InvalidRequestError, SchemaMismatchError

__all__ = [
    "MAX_ABS_BOUND",
    "MIN_BOUNDS_WIDTH",
    "Column",
    "ColumnType",
    "DatasetSchema",
    "check_compatible",
    "check_schema_digest",
    "refuse_changed_schema",
]


MAX_ABS_BOUND = 1e15  # keeps grids, bin edges and sums finite and exact in float64
MIN_BOUNDS_WIDTH = 1e-9  # narrower bounds than this are refused (queries and node configs)


class ColumnType(enum.Enum):
    """The type of a column, as declared in a node config."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    CATEGORY = "category"

    @property
    def is_numeric(self) -> bool:
        """Whether sums, means and numeric histograms make sense on this type."""
        return self in (ColumnType.INT, ColumnType.FLOAT)

    @property
    def is_discrete(self) -> bool:
        """Whether the column has a finite public domain (usable for group-by)."""
        return self in (ColumnType.BOOL, ColumnType.CATEGORY)


BOOL_DOMAIN: tuple[str, ...] = ("false", "true")


@dataclass(frozen=True, slots=True)
class Column:
    """One public column description.

    Attributes:
        name: column name, as in the data file.
        type: declared type.
        lower: public lower bound (numeric columns), or None if the operator gave none.
        upper: public upper bound (numeric columns), or None.
        domain: public category values in code order (category columns); ``("false", "true")``
            for bool columns.
        description: free text for people.
    """

    name: str
    type: ColumnType
    lower: float | None = None
    upper: float | None = None
    domain: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "a").isalnum():
            raise InvalidRequestError(
                f"column name {self.name!r} must be non-empty letters, digits and underscores"
            )
        if (self.lower is None) != (self.upper is None):
            raise InvalidRequestError(
                f"column {self.name!r}: give both lower and upper, or neither"
            )
        if self.lower is not None and self.upper is not None:
            if not self.type.is_numeric:
                raise InvalidRequestError(f"column {self.name!r}: bounds need an int or float type")
            if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
                raise InvalidRequestError(f"column {self.name!r}: bounds must be finite")
            if not self.lower < self.upper:
                raise InvalidRequestError(
                    f"column {self.name!r}: lower {self.lower} must be below upper {self.upper}"
                )
        if self.type is ColumnType.CATEGORY:
            if not self.domain:
                raise InvalidRequestError(
                    f"category column {self.name!r} needs a public domain (list of values)"
                )
            if len(set(self.domain)) != len(self.domain):
                raise InvalidRequestError(f"column {self.name!r}: domain has duplicate values")
        elif self.type is ColumnType.BOOL:
            object.__setattr__(self, "domain", BOOL_DOMAIN)
        elif self.domain:
            raise InvalidRequestError(f"column {self.name!r}: only category columns take a domain")

    @property
    def has_bounds(self) -> bool:
        """Whether the operator declared public bounds."""
        return self.lower is not None


@dataclass(frozen=True, slots=True)
class DatasetSchema:
    """A dataset's public schema: its name and columns."""

    name: str
    columns: tuple[Column, ...]
    description: str = ""

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"dataset {self.name!r} declares a column twice")

    def contract_digest(self) -> str:
        """SHA-256 (hex) of what ``check_compatible`` compares: each column's name, type,
        exact bounds and domain (in its order), in column-name order; descriptions aside.

        A coordinator sends the digest of the schema it agreed with the nodes in each
        request; a node whose own schema has another refuses before it charges anything
        (its operator changed bounds or a domain since the coordinator described it).
        """
        columns = sorted(
            [
                c.name,
                c.type.value,
                None if c.lower is None else float(c.lower),
                None if c.upper is None else float(c.upper),
                list(c.domain),
            ]
            for c in self.columns
        )
        text = json.dumps([self.name, columns], separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (public metadata only)."""
        return {
            "name": self.name,
            "description": self.description,
            "columns": [
                {
                    "name": c.name,
                    "type": c.type.value,
                    "lower": c.lower,
                    "upper": c.upper,
                    "domain": list(c.domain),
                    "description": c.description,
                }
                for c in self.columns
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSchema:
        """Read what ``to_dict`` wrote.

        Raises:
            InvalidRequestError: a column is malformed (unknown type, bad bounds).
        """
        try:
            columns = tuple(
                Column(
                    name=str(c["name"]),
                    type=ColumnType(c["type"]),
                    lower=None if c.get("lower") is None else float(c["lower"]),
                    upper=None if c.get("upper") is None else float(c["upper"]),
                    domain=tuple(str(v) for v in c.get("domain", ())),
                    description=str(c.get("description", "")),
                )
                for c in data["columns"]
            )
            return cls(str(data["name"]), columns, str(data.get("description", "")))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InvalidRequestError):
                raise
            raise InvalidRequestError(f"malformed dataset schema: {err}") from err

    def column(self, name: str) -> Column:
        """Return the column called ``name``.

        Raises:
            InvalidRequestError: no such column (the message lists the known ones).
        """
        for col in self.columns:
            if col.name == name:
                return col
        known = ", ".join(c.name for c in self.columns)
        raise InvalidRequestError(
            f"dataset {self.name!r} has no column {name!r}; its columns are: {known}"
        )


def check_compatible(schemas: dict[str, DatasetSchema]) -> list[str]:
    """List the columns on which the schemas of several nodes disagree.

    Args:
        schemas: node name -> that node's schema of one dataset.

    Returns:
        One human-readable line per mismatching column; empty when all agree.
    """
    lines: list[str] = []
    if not schemas:
        return lines
    by_column: dict[str, dict[str, Column | None]] = {}
    for node, schema in schemas.items():
        for col in schema.columns:
            by_column.setdefault(col.name, {})[node] = col
    for name in sorted(by_column):
        seen = by_column[name]
        variants = {node: seen.get(node) for node in schemas}
        described = {node: _describe(col) for node, col in variants.items()}
        if len(set(described.values())) > 1:
            parts = "; ".join(f"{node}: {text}" for node, text in sorted(described.items()))
            lines.append(f"column {name!r} differs: {parts}")
    return lines


def _describe(col: Column | None) -> str:
    """Render the contract-relevant part of a column for comparison."""
    if col is None:
        return "missing"
    text = col.type.value
    if col.has_bounds:
        # Exact: 1e+06 and 1000010 differ (":g" showed both as 1e+06, so they agreed).
        text += f" [{float(col.lower)!r}, {float(col.upper)!r}]"  # type: ignore[arg-type]
    if col.type is ColumnType.CATEGORY:
        # Quoted: ("Washington, DC", "Paris") and ("Washington", "DC, Paris") differ.
        text += " {" + ", ".join(repr(value) for value in col.domain) + "}"
    return text


_DIGEST_CHARS = frozenset("0123456789abcdef")


def check_schema_digest(digest: str) -> str:
    """Return ``digest`` if it is "" (no check) or a SHA-256 in lowercase hex.

    Raises:
        InvalidRequestError: anything else.
    """
    if digest and (len(digest) != 64 or not set(digest) <= _DIGEST_CHARS):
        raise InvalidRequestError(
            f"schema_sha256 must be empty or 64 lowercase hex digits; got {digest[:80]!r}"
        )
    return digest


def refuse_changed_schema(schema: DatasetSchema, digest: str, *, node: str) -> None:
    """Refuse a request made for another version of ``schema`` (``digest`` "" = no check).

    Raises:
        SchemaMismatchError: ``digest`` is not ``schema.contract_digest()``.
    """
    if digest and digest != schema.contract_digest():
        raise SchemaMismatchError(
            f"node {node!r}'s schema of dataset {schema.name!r} is not the one this request "
            "was made for: its operator changed a column's bounds, type or domain since you "
            "described the node. Describe it again (a Coordinator does so by itself on its "
            "next request); nothing was charged"
        )
