"""Synthetic cross-border credit data: the demo dataset each jurisdiction's node serves.

The two jurisdictions differ on purpose (non-IID): Hong Kong applicants are older, earn more,
rent or live in public housing more often and default less (about 6%); Shenzhen applicants
are younger, earn less, are more often self-employed and default more (about 12%). The
``defaulted`` label comes from one logistic model over standardised features, shared by every
jurisdiction, so a federated model has real signal to learn (ROC-AUC about 0.8).

Generation is vectorised numpy from ``np.random.default_rng`` seeded with the seed *and* the
jurisdiction, so equal arguments give equal data and the two nodes never share a stream.
This module only writes files; reading data files happens in ``nodes/`` alone.

>>> data = synthetic_credit(jurisdiction="hong-kong", rows=5, seed=7)
>>> sorted(data) == sorted(c.name for c in CREDIT_SCHEMA.columns)
True
>>> data["age"].dtype, data["defaulted"].dtype, data["housing"].dtype
(dtype('int64'), dtype('bool'), dtype('O'))
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow.csv import write_csv
from pyarrow.parquet import write_table

from federation.errors import InvalidRequestError
from federation.schema import Column, ColumnType, DatasetSchema

__all__ = ["CREDIT_SCHEMA", "JURISDICTIONS", "synthetic_credit", "write_dataset"]

JURISDICTIONS: tuple[str, ...] = ("hong-kong", "shenzhen")

EMPLOYMENT: tuple[str, ...] = ("employed", "self_employed", "unemployed", "retired", "student")
HOUSING: tuple[str, ...] = ("own", "mortgage", "rent", "public", "family")

CREDIT_SCHEMA = DatasetSchema(
    name="credit",
    description="Synthetic consumer-credit applicants; the label is 'defaulted'.",
    columns=(
        Column("age", ColumnType.INT, 18, 90, description="age in years"),
        Column("income", ColumnType.FLOAT, 0, 500_000, description="annual income, HKD"),
        Column("debt_ratio", ColumnType.FLOAT, 0, 3, description="annual debt service / income"),
        Column("credit_lines", ColumnType.INT, 0, 30, description="open credit lines"),
        Column("years_employed", ColumnType.INT, 0, 50, description="years with current employer"),
        Column("employment", ColumnType.CATEGORY, domain=EMPLOYMENT, description="status"),
        Column("housing", ColumnType.CATEGORY, domain=HOUSING, description="housing tenure"),
        Column("has_mortgage", ColumnType.BOOL, description="holds a mortgage"),
        Column("loan_amount", ColumnType.FLOAT, 0, 2_000_000, description="outstanding debt, HKD"),
        Column("defaulted", ColumnType.BOOL, description="defaulted within 12 months (label)"),
    ),
)


@dataclass(frozen=True, slots=True)
class _Profile:
    """Population parameters of one jurisdiction (every field mixes linearly)."""

    employment: tuple[float, ...]  # probabilities in EMPLOYMENT order
    housing: tuple[float, ...]  # probabilities in HOUSING order (middle-aged band)
    age_mean: float  # of the working population
    age_sd: float
    income_median: float  # HKD per year, employed, at the peak-earning age
    income_sigma: float  # of log income
    mortgage_median: float  # HKD outstanding
    credit_lines_base: float
    intercept: float  # of the default logit, tuned to the target default rate


_PROFILES: dict[str, _Profile] = {
    "hong-kong": _Profile(
        employment=(0.66, 0.10, 0.04, 0.15, 0.05),
        housing=(0.18, 0.18, 0.33, 0.27, 0.04),
        age_mean=45.0,
        age_sd=11.0,
        income_median=240_000.0,
        income_sigma=0.45,
        mortgage_median=1_100_000.0,
        credit_lines_base=3.5,
        intercept=-3.0,
    ),
    "shenzhen": _Profile(
        employment=(0.56, 0.24, 0.07, 0.05, 0.08),
        housing=(0.20, 0.28, 0.24, 0.05, 0.23),
        age_mean=35.0,
        age_sd=9.0,
        income_median=150_000.0,
        income_sigma=0.50,
        mortgage_median=750_000.0,
        credit_lines_base=2.5,
        intercept=-2.75,
    ),
}

# Employment effects on log income and on the default logit, in EMPLOYMENT order.
_INCOME_FACTOR: npt.NDArray[np.float64] = np.log(np.array([1.0, 1.1, 0.2, 0.45, 0.12]))
_EMPLOYMENT_RISK: npt.NDArray[np.float64] = np.array([0.0, 0.19, 0.5, 0.0, 0.165])
_HOUSING_RISK: npt.NDArray[np.float64] = np.array([-0.165, 0.0, 0.11, 0.055, 0.0])
# Housing odds multipliers for the young (< 30) and the old (>= 55), in HOUSING order.
_HOUSING_YOUNG: npt.NDArray[np.float64] = np.array([0.3, 0.5, 1.3, 0.8, 3.0])
_HOUSING_OLD: npt.NDArray[np.float64] = np.array([2.0, 0.7, 0.8, 1.2, 0.4])
_MORTGAGE_GIVEN_HOUSING: npt.NDArray[np.float64] = np.array([0.06, 0.97, 0.03, 0.01, 0.02])

_CHUNK_ROWS = 1 << 18

# Fixed standardisation (centre, scale) for the default logit: constants, not sample
# statistics, so every jurisdiction and every sample size shares one label model.
_LOGIT_TERMS: tuple[tuple[str, float, float, float], ...] = (
    # column, centre, scale, coefficient
    ("debt_ratio", 0.35, 0.25, 0.52),
    ("log_income", 11.9, 0.7, -0.30),
    ("age", 40.0, 13.0, -0.19),
    ("credit_lines", 4.0, 2.5, 0.165),
    ("years_employed", 6.0, 6.0, -0.165),
)


def synthetic_credit(
    *, jurisdiction: Literal["hong-kong", "shenzhen"] | str, rows: int, seed: int
) -> dict[str, npt.NDArray[Any]]:
    """Generate ``rows`` synthetic credit applicants of one jurisdiction.

    Args:
        jurisdiction: ``"hong-kong"`` or ``"shenzhen"``; any other name gives a population
            between the two, fixed by a stable hash of the name.
        rows: number of rows (>= 0).
        seed: non-negative seed; combined with the jurisdiction, so two nodes given the
            same seed still draw different rows.

    Returns:
        One array per ``CREDIT_SCHEMA`` column, in schema order: int64 for int columns,
        float64 for float columns, bool for bool columns, and object arrays of ``str`` for
        category columns. Every value is inside the schema's public bounds and domains.

    Raises:
        InvalidRequestError: empty jurisdiction, negative ``rows`` or ``seed``.
    """
    if not isinstance(jurisdiction, str) or not jurisdiction:
        raise InvalidRequestError("jurisdiction must be a non-empty name, e.g. 'hong-kong'")
    for name, value in (("rows", rows), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise InvalidRequestError(f"{name} must be an integer >= 0; got {value!r}")
    profile = _profile(jurisdiction)
    rng = np.random.default_rng([int(seed), zlib.crc32(jurisdiction.encode("utf-8"))])
    n = int(rows)
    out: dict[str, npt.NDArray[Any]] = {}
    # Chunks keep the many temporaries small and reused: at 10M rows, allocating them
    # whole costs more than drawing the numbers.
    for start in range(0, max(n, 1), _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        chunk = _draw_rows(rng, profile, stop - start)
        for name, values in chunk.items():
            if name not in out:
                out[name] = np.empty(n, dtype=values.dtype)
            out[name][start:stop] = values
    out["employment"] = np.array(EMPLOYMENT, dtype=object)[out["employment"]]
    out["housing"] = np.array(HOUSING, dtype=object)[out["housing"]]
    return {column.name: out[column.name] for column in CREDIT_SCHEMA.columns}


def _draw_rows(rng: np.random.Generator, profile: _Profile, n: int) -> dict[str, npt.NDArray[Any]]:
    """Draw ``n`` rows; category columns as codes into EMPLOYMENT and HOUSING."""
    employment = _categorical(rng, np.array(profile.employment), n)
    age = _age(rng, profile, employment)
    income = _income(rng, profile, employment, age)
    years_employed = _years_employed(rng, employment, age)
    housing = _housing(rng, profile, age)
    has_mortgage = rng.random(n) < _MORTGAGE_GIVEN_HOUSING[housing]
    loan_amount = _loan_amount(rng, profile, has_mortgage, income)
    debt_ratio = _debt_ratio(rng, has_mortgage, loan_amount, income)
    lam = profile.credit_lines_base * np.sqrt(income / profile.income_median + 0.2)
    credit_lines = np.clip(rng.poisson(lam + 0.04 * (age - 18)), 0, 30).astype(np.int64)
    features = {
        "debt_ratio": debt_ratio,
        "log_income": np.log(np.maximum(income, 1_000.0)),
        "age": age,
        "credit_lines": credit_lines,
        "years_employed": years_employed,
    }
    logit = profile.intercept + _EMPLOYMENT_RISK[employment] + _HOUSING_RISK[housing]
    for column, centre, scale, coefficient in _LOGIT_TERMS:
        logit += (coefficient / scale) * (features[column] - centre)
    return {
        "age": age,
        "income": income,
        "debt_ratio": debt_ratio,
        "credit_lines": credit_lines,
        "years_employed": years_employed,
        "employment": employment,
        "housing": housing,
        "has_mortgage": has_mortgage,
        "loan_amount": loan_amount,
        "defaulted": rng.random(n) < 1.0 / (1.0 + np.exp(-logit)),
    }


def write_dataset(
    columns: Mapping[str, npt.NDArray[Any]], path: Path, *, schema: DatasetSchema
) -> Path:
    """Write columns to a CSV or Parquet file, chosen by the suffix of ``path``.

    Columns are written in schema order with their schema types: int64, float64, bool
    (``true``/``false`` in CSV) and category columns as their string values. Missing parent
    folders are created; an existing file is replaced.

    Args:
        columns: one array per schema column, e.g. from ``synthetic_credit``.
        path: target file, ending in ``.csv`` or ``.parquet``.
        schema: the public schema the columns must satisfy.

    Returns:
        ``path``.

    Raises:
        InvalidRequestError: unknown suffix, a missing or extra column, unequal lengths, a
            wrong dtype, or a value outside the column's public bounds or domain.
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InvalidRequestError(f"dataset file {path.name!r} must end in .csv or .parquet")
    table = _to_arrow(columns, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        write_csv(table, str(path))
    else:
        write_table(table, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Generation helpers


def _profile(jurisdiction: str) -> _Profile:
    """Return the profile of a known jurisdiction, or a stable mixture for any other name."""
    if jurisdiction in _PROFILES:
        return _PROFILES[jurisdiction]
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    weight = 0.25 + 0.5 * zlib.crc32(jurisdiction.encode("utf-8")) / 2**32
    hk, sz = _PROFILES["hong-kong"], _PROFILES["shenzhen"]
    mixed: dict[str, Any] = {}
    for field in dataclasses.fields(_Profile):
        a, b = getattr(hk, field.name), getattr(sz, field.name)
        if isinstance(a, tuple):
            mixed[field.name] = tuple(
                weight * x + (1 - weight) * y for x, y in zip(a, b, strict=True)
            )
        else:
            mixed[field.name] = weight * a + (1 - weight) * b
    return _Profile(**mixed)


def _categorical(
    rng: np.random.Generator, probabilities: npt.NDArray[np.float64], n: int
) -> npt.NDArray[np.intp]:
    """Draw ``n`` codes from one categorical distribution by inverting its CDF."""
    cdf = np.cumsum(probabilities / probabilities.sum())
    cdf[-1] = 1.0  # rounding must not leave a gap above the last category
    return np.searchsorted(cdf, rng.random(n), side="right")


def _age(
    rng: np.random.Generator, profile: _Profile, employment: npt.NDArray[np.intp]
) -> npt.NDArray[np.int64]:
    mean = np.array([profile.age_mean, profile.age_mean, profile.age_mean - 3, 68.0, 21.0])
    sd = np.array([profile.age_sd, profile.age_sd, profile.age_sd, 6.0, 2.5])
    age = np.rint(mean[employment] + sd[employment] * rng.standard_normal(len(employment)))
    age = np.where(employment == EMPLOYMENT.index("retired"), np.maximum(age, 50), age)
    age = np.where(employment == EMPLOYMENT.index("student"), np.minimum(age, 35), age)
    return np.clip(age, 18, 90).astype(np.int64)


def _income(
    rng: np.random.Generator,
    profile: _Profile,
    employment: npt.NDArray[np.intp],
    age: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    log_income = (
        math.log(profile.income_median)
        + _INCOME_FACTOR[employment]
        - 0.0006 * (np.minimum(age, 65) - 48.0) ** 2
        + profile.income_sigma * rng.standard_normal(len(age))
    )
    return np.clip(np.round(np.exp(log_income), 2), 0.0, 500_000.0)


def _years_employed(
    rng: np.random.Generator, employment: npt.NDArray[np.intp], age: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    # Only the employed and self-employed have a current employer; tenure is uniform on
    # [0, 2 * share * working years), which is much faster than a binomial draw.
    share = np.array([0.30, 0.40, 0.0, 0.0, 0.0])[employment]
    years = np.floor(rng.random(len(age)) * (2.0 * share) * np.maximum(age - 20, 0))
    return np.clip(years, 0, 50).astype(np.int64)


def _housing(
    rng: np.random.Generator, profile: _Profile, age: npt.NDArray[np.int64]
) -> npt.NDArray[np.intp]:
    base = np.array(profile.housing)
    odds = np.stack([base * _HOUSING_YOUNG, base, base * _HOUSING_OLD])
    # One search over the three age bands' CDFs laid end to end: band b's CDF is shifted
    # to (b, b + 1], and a row of band b searches with b + uniform.
    cdfs = np.cumsum(odds / odds.sum(axis=1, keepdims=True), axis=1)
    cdfs[:, -1] = 1.0
    band = np.digitize(age, [30, 55])  # 0: young, 1: middle, 2: old
    index = np.searchsorted(
        (cdfs + np.arange(3)[:, None]).ravel(), band + rng.random(len(age)), side="right"
    )
    index -= len(HOUSING) * band
    # band + uniform can round up to band + 1; keep such a row in its band's last category.
    return np.minimum(index, len(HOUSING) - 1)


def _loan_amount(
    rng: np.random.Generator,
    profile: _Profile,
    has_mortgage: npt.NDArray[np.bool_],
    income: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    # Mortgages scale with income; a third of the others owe nothing, the rest a personal loan.
    relative_income = np.maximum(income, 10_000.0) / profile.income_median
    median = np.where(has_mortgage, profile.mortgage_median * np.sqrt(relative_income), 60_000.0)
    spread = np.where(has_mortgage, 0.45, 1.0)
    amount = median * np.exp(spread * rng.standard_normal(len(income)))
    amount[~has_mortgage & (rng.random(len(income)) < 0.35)] = 0.0
    return np.clip(np.round(amount, 2), 0.0, 2_000_000.0)


def _debt_ratio(
    rng: np.random.Generator,
    has_mortgage: npt.NDArray[np.bool_],
    loan_amount: npt.NDArray[np.float64],
    income: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    # Annual debt service: mortgages amortise slowly, personal loans fast.
    service_rate = np.where(has_mortgage, 0.07, 0.25)
    other = rng.gamma(1.5, 0.06, len(income))
    ratio = loan_amount * service_rate / np.maximum(income, 20_000.0) + other
    return np.clip(np.round(ratio, 4), 0.0, 3.0)


# ---------------------------------------------------------------------------------------------
# Writing


def _to_arrow(columns: Mapping[str, npt.NDArray[Any]], schema: DatasetSchema) -> pa.Table:
    """Check the columns against the schema and build an Arrow table in schema order."""
    names = [c.name for c in schema.columns]
    missing = [name for name in names if name not in columns]
    extra = sorted(set(columns) - set(names))
    if missing or extra:
        raise InvalidRequestError(
            f"dataset {schema.name!r}: columns do not match the schema "
            f"(missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})"
        )
    lengths = {len(columns[name]) for name in names}
    if len(lengths) > 1:
        raise InvalidRequestError(f"dataset {schema.name!r}: columns have different lengths")
    arrays = [_to_arrow_column(np.asarray(columns[c.name]), c) for c in schema.columns]
    return pa.table(arrays, names=names)


def _to_arrow_column(values: npt.NDArray[Any], column: Column) -> pa.Array:
    """Convert one column to its Arrow type, checking dtype, bounds and domain."""
    where = f"column {column.name!r} ({column.type.value})"
    kind = values.dtype.kind
    if values.ndim != 1:
        raise InvalidRequestError(f"{where} must be a 1-D array; got shape {values.shape}")
    if column.type is ColumnType.CATEGORY:
        if kind not in "OUS":
            raise InvalidRequestError(f"{where} must hold strings; got dtype {values.dtype}")
        array = pa.array(values, type=pa.string())
        if len(array) and not pc.all(pc.is_in(array, value_set=pa.array(column.domain))).as_py():
            raise InvalidRequestError(
                f"{where} has values outside its public domain: {', '.join(column.domain)}"
            )
        return array
    expected = {ColumnType.INT: "iu", ColumnType.FLOAT: "iuf", ColumnType.BOOL: "b"}[column.type]
    if kind not in expected:
        raise InvalidRequestError(f"{where} cannot be written from dtype {values.dtype}")
    if column.type is ColumnType.BOOL:
        return pa.array(values, type=pa.bool_())
    dtype = np.int64 if column.type is ColumnType.INT else np.float64
    numbers = values.astype(dtype)
    if column.type is ColumnType.FLOAT and not np.isfinite(numbers).all():
        raise InvalidRequestError(f"{where} holds NaN or infinite values")
    lower, upper = column.lower, column.upper
    out_of_bounds = (
        lower is not None
        and upper is not None
        and len(numbers) > 0
        and (numbers.min() < lower or numbers.max() > upper)
    )
    if out_of_bounds:
        raise InvalidRequestError(
            f"{where} has values outside its public bounds [{lower:g}, {upper:g}]"
        )
    return pa.array(numbers)
