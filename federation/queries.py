"""Query values a coordinator asks nodes for, and the filter expression tree.

Queries are plain frozen values: they name public schema columns and parameters, never
data. The node validates them against its schema (``nodes/analytics.py``) before charging.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from federation.errors import InvalidRequestError

__all__ = [
    "All",
    "Any",
    "Comparison",
    "Count",
    "Filter",
    "Histogram",
    "Mean",
    "Mechanism",
    "Not",
    "Operator",
    "Quantile",
    "Query",
    "Sum",
]

MAX_BINS = 4096
MAX_QUANTILES = 64
DEFAULT_QUANTILE_BINS = 256


class Mechanism(enum.Enum):
    """Noise mechanism for a release."""

    LAPLACE = "laplace"  # discrete Laplace: pure epsilon-DP
    GAUSSIAN = "gaussian"  # discrete Gaussian: (epsilon, delta)-DP


class Operator(enum.Enum):
    """Comparison operators a filter may use."""

    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"


FilterValue = float | str | bool


@dataclass(frozen=True, slots=True)
class Comparison:
    """``column op value`` (or ``column in (v1, v2, ...)``)."""

    column: str
    op: Operator
    values: tuple[FilterValue, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise InvalidRequestError(f"comparison on {self.column!r} needs a value")
        if self.op is not Operator.IN and len(self.values) != 1:
            raise InvalidRequestError(
                f"operator {self.op.value} on {self.column!r} takes one value"
            )
        for v in self.values:
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidRequestError(f"filter value for {self.column!r} must be finite")


@dataclass(frozen=True, slots=True)
class All:
    """Conjunction: every item holds."""

    items: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Any:
    """Disjunction: at least one item holds."""

    items: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """Negation."""

    item: Filter


Filter = Comparison | All | Any | Not


def _check_bounds(bounds: tuple[float, float] | None, what: str) -> None:
    if bounds is None:
        return
    lower, upper = bounds
    if not (math.isfinite(lower) and math.isfinite(upper)):
        raise InvalidRequestError(f"{what}: bounds must be finite; got {bounds!r}")
    if not lower < upper:
        raise InvalidRequestError(f"{what}: lower bound {lower} must be below upper {upper}")


@dataclass(frozen=True, slots=True)
class Count:
    """Number of rows (matching ``where``), optionally per group."""

    dataset: str
    where: Filter | None = None
    group_by: str | None = None


@dataclass(frozen=True, slots=True)
class Sum:
    """Sum of a numeric column, each value clamped to ``bounds`` (or the public bounds)."""

    dataset: str
    column: str
    where: Filter | None = None
    group_by: str | None = None
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.bounds, f"sum of {self.column!r}")


@dataclass(frozen=True, slots=True)
class Mean:
    """Mean of a numeric column: released as a noisy sum and a noisy count."""

    dataset: str
    column: str
    where: Filter | None = None
    group_by: str | None = None
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.bounds, f"mean of {self.column!r}")


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts per category (category/bool columns) or per equal-width bin (numeric columns)."""

    dataset: str
    column: str
    where: Filter | None = None
    group_by: str | None = None
    bounds: tuple[float, float] | None = None
    bins: int = 10

    def __post_init__(self) -> None:
        _check_bounds(self.bounds, f"histogram of {self.column!r}")
        if not 1 <= self.bins <= MAX_BINS:
            raise InvalidRequestError(f"bins must be in [1, {MAX_BINS}]; got {self.bins}")


@dataclass(frozen=True, slots=True)
class Quantile:
    """Quantiles of a numeric column, from a DP histogram of ``bins`` equal-width bins."""

    dataset: str
    column: str
    quantiles: tuple[float, ...] = (0.5,)
    where: Filter | None = None
    group_by: str | None = None
    bounds: tuple[float, float] | None = None
    bins: int = DEFAULT_QUANTILE_BINS

    def __post_init__(self) -> None:
        _check_bounds(self.bounds, f"quantile of {self.column!r}")
        if not 1 <= len(self.quantiles) <= MAX_QUANTILES:
            raise InvalidRequestError(f"give 1 to {MAX_QUANTILES} quantiles")
        for q in self.quantiles:
            if not (math.isfinite(q) and 0.0 <= q <= 1.0):
                raise InvalidRequestError(f"quantile {q!r} must be in [0, 1]")
        if not 2 <= self.bins <= MAX_BINS:
            raise InvalidRequestError(f"bins must be in [2, {MAX_BINS}]; got {self.bins}")


Query = Count | Sum | Mean | Histogram | Quantile
