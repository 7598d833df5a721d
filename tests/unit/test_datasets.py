"""Tests for federation.datasets: determinism, bounds, non-IID shape, signal, file output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from federation.datasets import CREDIT_SCHEMA, JURISDICTIONS, synthetic_credit, write_dataset
from federation.errors import InvalidRequestError
from federation.schema import ColumnType, DatasetSchema, check_compatible

Columns = dict[str, npt.NDArray[Any]]
ROWS = 40_000


@pytest.fixture(scope="module")
def hong_kong() -> Columns:
    return synthetic_credit(jurisdiction="hong-kong", rows=ROWS, seed=11)


@pytest.fixture(scope="module")
def shenzhen() -> Columns:
    return synthetic_credit(jurisdiction="shenzhen", rows=ROWS, seed=11)


def test_schema_is_named_credit_and_covers_the_columns(hong_kong: Columns) -> None:
    assert CREDIT_SCHEMA.name == "credit"
    assert list(hong_kong) == [c.name for c in CREDIT_SCHEMA.columns]
    assert JURISDICTIONS == ("hong-kong", "shenzhen")
    assert check_compatible({j: CREDIT_SCHEMA for j in JURISDICTIONS}) == []


def test_dtypes_follow_the_schema(hong_kong: Columns) -> None:
    for column in CREDIT_SCHEMA.columns:
        values = hong_kong[column.name]
        assert values.shape == (ROWS,)
        if column.type is ColumnType.INT:
            assert values.dtype == np.int64
        elif column.type is ColumnType.FLOAT:
            assert values.dtype == np.float64
        elif column.type is ColumnType.BOOL:
            assert values.dtype == np.bool_
        else:
            assert values.dtype == object
            assert all(isinstance(v, str) for v in values[:100])


def test_same_arguments_give_the_same_data() -> None:
    first = synthetic_credit(jurisdiction="shenzhen", rows=1_000, seed=3)
    second = synthetic_credit(jurisdiction="shenzhen", rows=1_000, seed=3)
    for name, values in first.items():
        np.testing.assert_array_equal(values, second[name])


def test_seed_and_jurisdiction_both_change_the_data() -> None:
    base = synthetic_credit(jurisdiction="hong-kong", rows=1_000, seed=3)
    other_seed = synthetic_credit(jurisdiction="hong-kong", rows=1_000, seed=4)
    other_place = synthetic_credit(jurisdiction="shenzhen", rows=1_000, seed=3)
    assert not np.array_equal(base["income"], other_seed["income"])
    assert not np.array_equal(base["income"], other_place["income"])


@pytest.mark.parametrize("jurisdiction", [*JURISDICTIONS, "macau", "x"])
def test_values_respect_public_bounds_and_domains(jurisdiction: str) -> None:
    data = synthetic_credit(jurisdiction=jurisdiction, rows=20_000, seed=5)
    for column in CREDIT_SCHEMA.columns:
        values = data[column.name]
        if column.type.is_numeric:
            assert column.lower is not None
            assert column.upper is not None
            assert values.min() >= column.lower, column.name
            assert values.max() <= column.upper, column.name
            assert np.isfinite(values).all()
        elif column.type is ColumnType.CATEGORY:
            assert set(np.unique(values)) <= set(column.domain), column.name
            assert len(set(np.unique(values))) == len(column.domain), column.name


def test_jurisdictions_are_not_identically_distributed(
    hong_kong: Columns, shenzhen: Columns
) -> None:
    assert hong_kong["income"].mean() > 1.3 * shenzhen["income"].mean()
    assert hong_kong["age"].mean() > shenzhen["age"].mean() + 5
    hk_default = hong_kong["defaulted"].mean()
    sz_default = shenzhen["defaulted"].mean()
    assert 0.05 <= hk_default <= 0.075
    assert 0.10 <= sz_default <= 0.14
    assert _share(shenzhen, "employment", "self_employed") > 2 * _share(
        hong_kong, "employment", "self_employed"
    )
    for housing in ("rent", "public"):
        assert _share(hong_kong, "housing", housing) > _share(shenzhen, "housing", housing)


def test_mortgage_flag_follows_housing(hong_kong: Columns) -> None:
    mortgaged = hong_kong["housing"] == "mortgage"
    assert hong_kong["has_mortgage"][mortgaged].mean() > 0.9
    assert hong_kong["has_mortgage"][~mortgaged].mean() < 0.1


def test_other_names_give_a_stable_mixture(hong_kong: Columns, shenzhen: Columns) -> None:
    first = synthetic_credit(jurisdiction="macau", rows=ROWS, seed=11)
    again = synthetic_credit(jurisdiction="macau", rows=ROWS, seed=11)
    np.testing.assert_array_equal(first["income"], again["income"])
    assert shenzhen["income"].mean() < first["income"].mean() < hong_kong["income"].mean()
    assert hong_kong["defaulted"].mean() < first["defaulted"].mean() < shenzhen["defaulted"].mean()


@pytest.mark.parametrize("jurisdiction", JURISDICTIONS)
def test_label_carries_signal(jurisdiction: str) -> None:
    data = synthetic_credit(jurisdiction=jurisdiction, rows=ROWS, seed=2)
    defaulted = data["defaulted"]
    low, high = np.quantile(data["debt_ratio"], [0.1, 0.9])
    bottom = defaulted[data["debt_ratio"] <= low].mean()
    top = defaulted[data["debt_ratio"] >= high].mean()
    assert top > 4 * bottom
    assert defaulted[data["employment"] == "unemployed"].mean() > defaulted.mean()
    poorer = data["income"] < np.median(data["income"])
    assert defaulted[poorer].mean() > 1.3 * defaulted[~poorer].mean()


def test_zero_rows() -> None:
    data = synthetic_credit(jurisdiction="hong-kong", rows=0, seed=0)
    assert all(len(values) == 0 for values in data.values())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"jurisdiction": "", "rows": 1, "seed": 0}, "jurisdiction"),
        ({"jurisdiction": "hong-kong", "rows": -1, "seed": 0}, "rows"),
        ({"jurisdiction": "hong-kong", "rows": 1, "seed": -1}, "seed"),
        ({"jurisdiction": "hong-kong", "rows": 1.5, "seed": 0}, "rows"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        synthetic_credit(**kwargs)


# ------------------------------------------------------------------ writing


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_written_file_reads_back_with_the_same_values(
    tmp_path: Path, hong_kong: Columns, suffix: str
) -> None:
    path = tmp_path / "nested" / f"credit{suffix}"
    assert write_dataset(hong_kong, path, schema=CREDIT_SCHEMA) == path
    table = pa_csv.read_csv(path) if suffix == ".csv" else pq.read_table(path)
    assert table.column_names == [c.name for c in CREDIT_SCHEMA.columns]
    for name, values in hong_kong.items():
        read = table.column(name).to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(read, values, err_msg=name)
        assert read.dtype == values.dtype, name


def test_csv_spells_bools_and_categories_as_text(tmp_path: Path) -> None:
    data = synthetic_credit(jurisdiction="shenzhen", rows=50, seed=1)
    path = write_dataset(data, tmp_path / "credit.csv", schema=CREDIT_SCHEMA)
    header, *lines = path.read_text().splitlines()
    assert header.replace('"', "").split(",") == [c.name for c in CREDIT_SCHEMA.columns]
    first = lines[0].replace('"', "").split(",")
    assert first[7] in ("true", "false")
    assert first[9] in ("true", "false")
    assert first[5] in CREDIT_SCHEMA.column("employment").domain


def test_write_accepts_unicode_string_arrays(tmp_path: Path) -> None:
    data = synthetic_credit(jurisdiction="hong-kong", rows=20, seed=1)
    data["housing"] = data["housing"].astype(str)
    table = pq.read_table(write_dataset(data, tmp_path / "c.parquet", schema=CREDIT_SCHEMA))
    assert table.column("housing").to_pylist() == list(data["housing"])


def test_write_zero_rows(tmp_path: Path) -> None:
    data = synthetic_credit(jurisdiction="hong-kong", rows=0, seed=0)
    table = pq.read_table(write_dataset(data, tmp_path / "c.parquet", schema=CREDIT_SCHEMA))
    assert table.num_rows == 0


def _tweak(data: Columns, name: str, values: npt.NDArray[Any] | None) -> Columns:
    changed = dict(data)
    if values is None:
        del changed[name]
    else:
        changed[name] = values
    return changed


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: _tweak(d, "age", None), "missing: age"),
        (lambda d: {**d, "extra": d["age"]}, "extra: extra"),
        (lambda d: _tweak(d, "age", d["age"][:-1]), "different lengths"),
        (lambda d: _tweak(d, "age", d["age"] + 100), "outside its public bounds"),
        (lambda d: _tweak(d, "income", d["income"] * np.nan), "NaN"),
        (lambda d: _tweak(d, "age", d["age"].astype(np.float64)), "dtype float64"),
        (lambda d: _tweak(d, "defaulted", d["defaulted"].astype(np.int64)), "dtype int64"),
        (lambda d: _tweak(d, "housing", np.full(len(d["age"]), "castle")), "public domain"),
        (lambda d: _tweak(d, "housing", np.zeros(len(d["age"]))), "must hold strings"),
    ],
)
def test_write_rejects_columns_that_break_the_schema(
    tmp_path: Path, change: Any, fragment: str
) -> None:
    data = synthetic_credit(jurisdiction="hong-kong", rows=10, seed=0)
    path = tmp_path / "bad.csv"
    with pytest.raises(InvalidRequestError, match=fragment):
        write_dataset(change(data), path, schema=CREDIT_SCHEMA)
    assert not path.exists()


def test_write_rejects_unknown_suffix(tmp_path: Path, hong_kong: Columns) -> None:
    with pytest.raises(InvalidRequestError, match=r"\.csv or \.parquet"):
        write_dataset(hong_kong, tmp_path / "credit.json", schema=CREDIT_SCHEMA)


def _share(data: Columns, column: str, value: str) -> float:
    return float((data[column] == value).mean())


def test_a_schema_round_trips_through_json_and_refuses_malformed_input() -> None:
    text = json.dumps(CREDIT_SCHEMA.to_dict())
    assert DatasetSchema.from_dict(json.loads(text)) == CREDIT_SCHEMA
    broken = json.loads(text)
    broken["columns"][0]["type"] = "complex"
    with pytest.raises(InvalidRequestError, match="malformed dataset schema"):
        DatasetSchema.from_dict(broken)
