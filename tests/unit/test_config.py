"""Tests of node configuration: loading, checking, error messages and starter configs."""

from __future__ import annotations

import copy
import dataclasses
import math
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest

from federation.errors import ConfigError, InvalidRequestError
from federation.schema import ColumnType
from nodes.config import (
    OPERATIONS,
    ConsumerPolicy,
    load_config,
    parse_config,
    starter_config,
)

FULL_TOML = """\
[node]
name = "hong-kong"
jurisdiction = "HK"
listen = "127.0.0.1:50051"
state_dir = "state"
max_workers = 4
max_message_bytes = 8388608

[[datasets]]
name = "credit"
source = "data/hong-kong.csv"
description = "Retail credit applications"

  [[datasets.columns]]
  name = "age"
  type = "int"
  lower = 18
  upper = 90
  description = "age in years"

  [[datasets.columns]]
  name = "income"
  type = "float"

  [[datasets.columns]]
  name = "defaulted"
  type = "bool"

  [[datasets.columns]]
  name = "employment"
  type = "category"
  domain = ["employed", "self_employed", "unemployed", "retired", "student"]

[[datasets]]
name = "claims"
source = "data/claims.bin"
format = "parquet"

  [[datasets.columns]]
  name = "amount"
  type = "float"
  lower = 0.0
  upper = 1e5

[consumers.acme-ai]
epsilon = 10.0
delta = 1e-5
max_epsilon_per_release = 2.0
max_delta_per_release = 1e-7
operations = ["describe", "analyze", "train"]
min_cohort = 20
allowed_models = ["logistic"]
noise_multiplier_floor = 0.8
max_rounds = 50

[consumers."uni.example.org"]
epsilon = 0.5

[tls]
ca = "pki/ca.pem"
cert = "pki/hong-kong.pem"
key = "pki/hong-kong.key"
revocation = "pki/revoked.txt"
"""


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x\n")
    return path


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """A directory holding the files FULL_TOML names (their contents are never read)."""
    for name in (
        "data/hong-kong.csv",
        "data/claims.bin",
        "pki/ca.pem",
        "pki/hong-kong.pem",
        "pki/hong-kong.key",
        "pki/revoked.txt",
    ):
        _touch(tmp_path / name)
    return tmp_path


@pytest.fixture
def full(node_dir: Path) -> dict[str, Any]:
    """FULL_TOML parsed: tests mutate a copy to break one rule each."""
    return tomllib.loads(FULL_TOML)


def _write(directory: Path, text: str, name: str = "node.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- valid configs


def test_full_config_loads_every_field(node_dir: Path) -> None:
    config = load_config(_write(node_dir, FULL_TOML))

    assert config.name == "hong-kong"
    assert config.jurisdiction == "HK"
    assert config.listen == "127.0.0.1:50051"
    assert config.state_dir == (node_dir / "state").resolve()
    assert config.max_workers == 4
    assert config.max_message_bytes == 8 * 1024 * 1024

    credit, claims = config.datasets
    assert credit.name == "credit"
    assert credit.source == (node_dir / "data/hong-kong.csv").resolve()
    assert credit.format == "csv"
    assert credit.schema.name == "credit"
    assert credit.schema.description == "Retail credit applications"
    age = credit.schema.column("age")
    assert (age.type, age.lower, age.upper, age.description) == (
        ColumnType.INT,
        18.0,
        90.0,
        "age in years",
    )
    assert not credit.schema.column("income").has_bounds
    assert credit.schema.column("defaulted").domain == ("false", "true")
    assert credit.schema.column("employment").domain[0] == "employed"
    assert claims.format == "parquet"
    assert claims.schema.column("amount").upper == 1e5

    acme = config.consumers["acme-ai"]
    assert acme == ConsumerPolicy(
        name="acme-ai",
        epsilon=10.0,
        delta=1e-5,
        max_epsilon_per_release=2.0,
        max_delta_per_release=1e-7,
        operations=OPERATIONS,
        min_cohort=20,
        allowed_models=("logistic",),
        noise_multiplier_floor=0.8,
        max_rounds=50,
    )
    assert config.consumers["uni.example.org"].name == "uni.example.org"

    assert config.tls is not None
    assert config.tls.ca == (node_dir / "pki/ca.pem").resolve()
    assert config.tls.cert == (node_dir / "pki/hong-kong.pem").resolve()
    assert config.tls.key == (node_dir / "pki/hong-kong.key").resolve()
    assert config.tls.revocation == (node_dir / "pki/revoked.txt").resolve()


def test_parse_config_equals_load_config(node_dir: Path, full: dict[str, Any]) -> None:
    loaded = load_config(_write(node_dir, FULL_TOML))
    assert parse_config(full, base_dir=node_dir) == loaded


def test_defaults_fill_optional_keys(tmp_path: Path) -> None:
    _touch(tmp_path / "loans.parquet")
    path = _write(
        tmp_path,
        """\
        [node]
        name = "shenzhen"
        listen = "localhost:0"

        [[datasets]]
        name = "loans"
        source = "loans.parquet"
          [[datasets.columns]]
          name = "amount"
          type = "float"

        [consumers.big]
        epsilon = 10
        [consumers.small]
        epsilon = 0.25
        delta = 0.0
        """,
    )
    config = load_config(path)

    assert config.jurisdiction == ""
    assert config.state_dir == (tmp_path / "state" / "shenzhen").resolve()
    assert config.tls is None
    assert config.max_workers == 8
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.datasets[0].format == "parquet"
    assert config.datasets[0].schema.description == ""
    big = config.consumers["big"]
    assert big.epsilon == 10.0
    assert isinstance(big.epsilon, float)
    assert big.delta == 1e-6
    assert big.max_epsilon_per_release == 1.0
    assert big.max_delta_per_release == pytest.approx(1e-7)
    assert big.operations == frozenset({"describe", "analyze"})
    assert big.min_cohort == 0
    assert big.allowed_models == ("logistic", "mlp")
    assert big.noise_multiplier_floor == 0.5
    assert big.max_rounds == 100
    small = config.consumers["small"]
    assert small.max_epsilon_per_release == 0.25  # min(1.0, epsilon)
    assert small.max_delta_per_release == 0.0


def test_consumer_policy_defaults_when_built_directly() -> None:
    policy = ConsumerPolicy(name="acme-ai", epsilon=3.0, delta=1e-6)
    assert policy.max_epsilon_per_release == 1.0
    assert policy.max_delta_per_release == pytest.approx(1e-7)
    with pytest.raises(ConfigError, match=r"max_epsilon_per_release: .* at most epsilon"):
        ConsumerPolicy(name="acme-ai", epsilon=1.0, max_epsilon_per_release=2.0)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    _touch(tmp_path / "shared" / "data.csv")
    _touch(tmp_path / "site" / "certs" / "ca.pem")
    _touch(tmp_path / "site" / "certs" / "node.pem")
    _touch(tmp_path / "site" / "certs" / "node.key")
    path = _write(
        tmp_path / "site",
        """\
        [node]
        name = "n1"
        listen = "127.0.0.1:0"
        state_dir = "../var/n1"
        [[datasets]]
        name = "d"
        source = "../shared/data.csv"
          [[datasets.columns]]
          name = "x"
          type = "int"
        [consumers.c]
        epsilon = 1.0
        [tls]
        ca = "certs/ca.pem"
        cert = "certs/node.pem"
        key = "certs/node.key"
        """,
    )
    config = load_config(path)

    assert config.state_dir == (tmp_path / "var" / "n1").resolve()
    assert config.state_dir.is_absolute()
    assert not config.state_dir.exists()  # the loader creates nothing
    assert config.datasets[0].source == (tmp_path / "shared" / "data.csv").resolve()
    assert config.tls is not None
    assert config.tls.key == (tmp_path / "site" / "certs" / "node.key").resolve()
    assert config.tls.revocation is None


def test_config_is_immutable(node_dir: Path, full: dict[str, Any]) -> None:
    config = parse_config(full, base_dir=node_dir)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.consumers["acme-ai"].epsilon = 1e9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.consumers["mallory"] = config.consumers["acme-ai"]  # type: ignore[index]
    assert isinstance(config.datasets, tuple)
    assert isinstance(config.consumers["acme-ai"].operations, frozenset)

    policies = dict(config.consumers)
    rebuilt = dataclasses.replace(config, consumers=policies)
    policies.clear()
    assert set(rebuilt.consumers) == {"acme-ai", "uni.example.org"}


def test_dataset_lookup(node_dir: Path, full: dict[str, Any]) -> None:
    config = parse_config(full, base_dir=node_dir)
    assert config.dataset("claims").name == "claims"
    with pytest.raises(InvalidRequestError, match=r"no dataset 'loans'.*credit, claims"):
        config.dataset("loans")


@pytest.mark.parametrize(
    ("listen", "host", "port", "loopback"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051, True),
        ("127.8.9.10:1", "127.8.9.10", 1, True),
        ("localhost:0", "localhost", 0, True),
        ("[::1]:50051", "::1", 50051, True),
        ("0.0.0.0:50051", "0.0.0.0", 50051, False),
        ("[::]:50051", "::", 50051, False),
        ("10.1.2.3:443", "10.1.2.3", 443, False),
        ("node-1.example.org:443", "node-1.example.org", 443, False),
    ],
)
def test_listen_address_parts(
    node_dir: Path, full: dict[str, Any], listen: str, host: str, port: int, loopback: bool
) -> None:
    full["node"]["listen"] = listen
    config = parse_config(full, base_dir=node_dir)
    assert (config.listen_host, config.listen_port, config.is_loopback) == (host, port, loopback)


# --------------------------------------------------------------------------- error paths

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: object) -> Mutation:
    """Return a mutation that sets a dotted key path (``[i]`` indexes arrays)."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]

    return mutate


def _duplicate_dataset(doc: dict[str, Any]) -> None:
    doc["datasets"].append(copy.deepcopy(doc["datasets"][0]))


def _duplicate_column(doc: dict[str, Any]) -> None:
    doc["datasets"][0]["columns"].append(copy.deepcopy(doc["datasets"][0]["columns"][1]))


ERROR_CASES: list[tuple[str, Mutation, str]] = [
    # required keys
    ("no node table", _delete("node"), "node: missing required table [node]"),
    ("no node name", _delete("node/name"), "node.name: missing required key"),
    ("no listen", _delete("node/listen"), "node.listen: missing required key"),
    ("no datasets", _delete("datasets"), "datasets: at least one dataset is required"),
    ("empty datasets", _set("datasets", []), "datasets: at least one dataset is required"),
    ("no consumers", _delete("consumers"), "consumers: at least one consumer is required"),
    ("empty consumers", _set("consumers", {}), "consumers: at least one consumer is required"),
    ("no epsilon", _delete("consumers/acme-ai/epsilon"), "consumers.acme-ai.epsilon: missing"),
    ("no source", _delete("datasets/0/source"), "datasets[0].source: missing required key"),
    ("no columns", _delete("datasets/1/columns"), "datasets[1].columns: at least one column"),
    ("no type", _delete("datasets/0/columns/1/type"), "datasets[0].columns[1].type: missing"),
    ("no tls key", _delete("tls/key"), "tls.key: missing required key"),
    # unknown keys
    (
        "consumer typo",
        _set("consumers/acme-ai/epsilom", 1.0),
        "unknown key 'epsilom' in consumers.acme-ai (did you mean 'epsilon'?); "
        "known keys: allowed_models, delta, epsilon,",
    ),
    ("top-level typo", _set("nodes", {}), "unknown key 'nodes' at top level"),
    ("node typo", _set("node/listen_addr", "x"), "unknown key 'listen_addr' in node"),
    ("dataset typo", _set("datasets/0/path", "x"), "unknown key 'path' in datasets[0]"),
    (
        "column typo",
        _set("datasets/0/columns/0/min", 0),
        "unknown key 'min' in datasets[0].columns[0]",
    ),
    ("tls typo", _set("tls/crl", "x"), "unknown key 'crl' in tls"),
    # too small for a weights chunk while a consumer may train (every job failed)
    (
        "message limit below a chunk",
        _set("node/max_message_bytes", 1048576),
        "node.max_message_bytes: must be at least 2162688 when a consumer may train (acme-ai)",
    ),
    # a consumer certificate's name with a dot, unquoted (review)
    (
        "dotted consumer name",
        _set("consumers/acme", {"ai": {"epsilon": 1.0}}),
        "consumers.acme.ai: a table where a policy key belongs; a consumer name with a dot "
        'must be quoted: [consumers."acme.ai"]',
    ),
    # bounds no query could use (every query refused; training scaled the column to 0)
    (
        "huge bounds",
        _set("datasets/0/columns/0/upper", 1e308),
        "datasets[0].columns[0]: bounds [18, 1e+308] must lie within ±1e+15",
    ),
    (
        "narrow bounds",
        _set("datasets/0/columns/0/upper", 18 + 1e-12),
        "datasets[0].columns[0]: bounds [18, 18] must lie within ±1e+15 and be at least 1e-09",
    ),
    # wrong types
    (
        "bool epsilon",
        _set("consumers/acme-ai/epsilon", True),
        "epsilon: expected a number; got true",
    ),
    (
        "string epsilon",
        _set("consumers/acme-ai/epsilon", "10"),
        "consumers.acme-ai.epsilon: expected a number; got '10'",
    ),
    (
        "float workers",
        _set("node/max_workers", 8.0),
        "node.max_workers: expected an integer; got 8",
    ),
    ("bool cohort", _set("consumers/acme-ai/min_cohort", False), "min_cohort: expected an integer"),
    ("int name", _set("node/name", 7), "node.name: expected a string; got 7"),
    (
        "operations not array",
        _set("consumers/acme-ai/operations", "describe"),
        "consumers.acme-ai.operations: expected an array of strings; got 'describe'",
    ),
    (
        "domain item",
        _set("datasets/0/columns/3/domain", ["employed", 3]),
        "datasets[0].columns[3].domain[1]: expected a string; got 3",
    ),
    ("bool bound", _set("datasets/0/columns/0/lower", True), "columns[0].lower: expected a number"),
    ("datasets table", _set("datasets", {"name": "x"}), "datasets: expected an array of tables"),
    ("consumer value", _set("consumers/acme-ai", 3), "consumers.acme-ai: expected a table"),
    ("tls not table", _set("tls", "pki"), "tls: expected a table ([tls]); got 'pki'"),
    # values out of range
    (
        "column type",
        _set("datasets/0/columns/2/type", "string"),
        "datasets[0].columns[2].type: expected one of int, float, bool, category; got 'string'",
    ),
    (
        "negative epsilon",
        _set("consumers/acme-ai/epsilon", -1),
        "consumers.acme-ai.epsilon: must be a finite number > 0; got -1",
    ),
    ("inf epsilon", _set("consumers/acme-ai/epsilon", math.inf), "finite number > 0; got inf"),
    ("nan epsilon", _set("consumers/acme-ai/epsilon", math.nan), "finite number > 0; got nan"),
    ("delta one", _set("consumers/acme-ai/delta", 1.0), "consumers.acme-ai.delta: must be"),
    (
        "cap above total",
        _set("consumers/acme-ai/max_epsilon_per_release", 11),
        "consumers.acme-ai.max_epsilon_per_release: must be > 0 and at most epsilon (10); got 11",
    ),
    (
        "delta cap above total",
        _set("consumers/acme-ai/max_delta_per_release", 1e-3),
        "consumers.acme-ai.max_delta_per_release: must be >= 0 and at most delta",
    ),
    (
        "unknown operation",
        _set("consumers/acme-ai/operations", ["describe", "trian"]),
        "consumers.acme-ai.operations: expected some of analyze, describe, train; got 'trian'",
    ),
    (
        "analyze without describe",
        _set("consumers/acme-ai/operations", ["analyze", "train"]),
        "consumers.acme-ai.operations: must include 'describe' with analyze and train",
    ),
    ("negative cohort", _set("consumers/acme-ai/min_cohort", -1), "min_cohort: must be"),
    ("negative floor", _set("consumers/acme-ai/noise_multiplier_floor", -0.1), "floor: must"),
    ("zero rounds", _set("consumers/acme-ai/max_rounds", 0), "max_rounds: must be an integer >= 1"),
    (
        "zero model size",
        _set("consumers/acme-ai/max_model_parameters", 0),
        "consumers.acme-ai.max_model_parameters: must be an integer >= 1",
    ),
    ("model twice", _set("consumers/acme-ai/allowed_models", ["mlp", "mlp"]), "lists a model"),
    (
        "quoted consumer",
        _set("consumers/uni.example.org/epsilon", 0),
        'consumers."uni.example.org".epsilon: must be a finite number > 0; got 0',
    ),
    ("zero workers", _set("node/max_workers", 0), "node.max_workers: must be an integer 1-1024"),
    ("tiny messages", _set("node/max_message_bytes", 10), "node.max_message_bytes: must be"),
    (
        "read limit above max_request_s",
        _set("node/max_request_read_s", 301),
        "node.max_request_read_s: must be a number of seconds > 0 and <= max_request_s (300); "
        "got 301",
    ),
    ("zero read limit", _set("node/max_request_read_s", 0), "node.max_request_read_s: must be"),
    (
        "string read limit",
        _set("node/max_request_read_s", "10"),
        "node.max_request_read_s: expected a number; got '10'",
    ),
    ("node name", _set("node/name", "hong kong"), "node.name: must be 1-64 letters"),
    ("jurisdiction", _set("node/jurisdiction", "H K"), "node.jurisdiction: must be a code"),
    ("dataset name", _set("datasets/0/name", "credit/2"), "datasets[0].name: must be 1-64"),
    (
        "duplicate dataset",
        _duplicate_dataset,
        "datasets[2].name: duplicate dataset name 'credit' (also datasets[0])",
    ),
    (
        "duplicate column",
        _duplicate_column,
        "datasets[0].columns[4].name: duplicate column name 'income' (also columns[1])",
    ),
    (
        "half bounds",
        _delete("datasets/0/columns/0/upper"),
        "datasets[0].columns[0]: column 'age': give both lower and upper",
    ),
    (
        "inverted bounds",
        _set("datasets/0/columns/0/lower", 100),
        "datasets[0].columns[0]: column 'age': lower 100.0 must be below upper 90.0",
    ),
    (
        "category without domain",
        _delete("datasets/0/columns/3/domain"),
        "datasets[0].columns[3]: category column 'employment' needs a public domain",
    ),
    (
        "domain on int",
        _set("datasets/0/columns/0/domain", ["1"]),
        "datasets[0].columns[0].domain: only category columns take a domain",
    ),
    ("bad column name", _set("datasets/0/columns/1/name", "in come"), "columns[1]: column name"),
    # files
    (
        "missing source",
        _set("datasets/0/source", "data/nope.csv"),
        "datasets[0].source: data file not found: ",
    ),
    ("source is a directory", _set("datasets/0/source", "data"), "datasets[0].source: not a"),
    ("empty source", _set("datasets/0/source", ""), "datasets[0].source: expected a path"),
    (
        "unknown suffix",
        _delete("datasets/1/format"),
        "datasets[1].source: cannot tell the format from the name 'claims.bin'",
    ),
    (
        "bad format",
        _set("datasets/1/format", "json"),
        "datasets[1].format: expected one of csv, parquet; got 'json'",
    ),
    ("missing tls file", _set("tls/revocation", "pki/crl.pem"), "tls.revocation: file not found"),
    # listen addresses
    ("no port", _set("node/listen", "localhost"), "node.listen: expected 'host:port'"),
    ("port too big", _set("node/listen", "127.0.0.1:65536"), "got '127.0.0.1:65536'"),
    ("unbracketed v6", _set("node/listen", "::1:50051"), "node.listen: expected 'host:port'"),
    ("bad v6", _set("node/listen", "[zz]:1"), "node.listen: expected 'host:port'"),
    ("no host", _set("node/listen", ":50051"), "node.listen: expected 'host:port'"),
    ("space", _set("node/listen", "my host:1"), "node.listen: expected 'host:port'"),
    ("signed port", _set("node/listen", "localhost:+80"), "node.listen: expected 'host:port'"),
    # training device
    ("gpu device", _set("node/device", "gpu"), 'node.device: must be "cpu", "cuda", "cuda:N"'),
    ("device index", _set("node/device", "cuda:-1"), "node.device: must be"),
    ("device type", _set("node/device", 0), "node.device"),
]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_training_device_is_read_from_the_config(
    node_dir: Path, full: dict[str, Any], device: str
) -> None:
    assert parse_config(full, base_dir=node_dir).device == "cpu"  # the default
    full["node"]["device"] = device
    assert parse_config(full, base_dir=node_dir).device == device


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(mutate, message, id=case) for case, mutate, message in ERROR_CASES],
)
def test_bad_config_names_the_key(
    node_dir: Path, full: dict[str, Any], mutate: Mutation, message: str
) -> None:
    mutate(full)
    with pytest.raises(ConfigError) as info:
        parse_config(full, base_dir=node_dir)
    assert message in str(info.value)


def test_load_config_prefixes_the_file_name(node_dir: Path) -> None:
    path = _write(node_dir, FULL_TOML.replace("epsilon = 10.0", "epsilon = -1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(info.value) == f"{path}: consumers.acme-ai.epsilon: must be a finite number > 0; got -1"
    )


def test_load_config_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node.toml: config file not found"):
        load_config(tmp_path / "node.toml")


def test_load_config_reports_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_load_config_reports_toml_syntax_with_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[node]\nname = "a"\nlisten 127.0.0.1:1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 3" in str(info.value)


def test_load_config_reports_bad_encoding(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


# --------------------------------------------------------------------------- starter config

DISTINCTIVE_NUMBERS = ["48213", "731.9375", "99871"]
DISTINCTIVE_STRINGS = ["zanzibar", "quokka-7731", "Xylophone Street"]


def _numeric_table() -> pa.Table:
    return pa.table(
        {
            "age": pa.array([48213, 31, 99871, 40, 52, 61], pa.int64()),
            "income": pa.array([731.9375, 1.5, 2.25, 3.0, 4.5, 5.75], pa.float64()),
            "smoker": pa.array([True, False, True, False, False, True]),
        }
    )


def _mixed_table() -> pa.Table:
    return (
        _numeric_table()
        .append_column(
            "region", pa.array(["zanzibar", "north", "north", "south", "zanzibar", "south"])
        )
        .append_column(
            "street",  # free text: every value distinct
            pa.array(["Xylophone Street", "b", "c", "d", "e", "quokka-7731"]),
        )
    )


def _assert_no_data_values(text: str) -> None:
    for value in DISTINCTIVE_NUMBERS + DISTINCTIVE_STRINGS:
        assert value not in text


def test_starter_config_for_numeric_csv_loads_as_is(tmp_path: Path) -> None:
    data = tmp_path / "hong-kong.csv"
    pa_csv.write_csv(_numeric_table(), data)

    text = starter_config(data, name="hong-kong", jurisdiction="HK")

    _assert_no_data_values(text)
    config = load_config(_write(tmp_path, text))
    assert (config.name, config.jurisdiction) == ("hong-kong", "HK")
    assert config.tls is None
    assert config.is_loopback
    (dataset,) = config.datasets
    assert dataset.name == "hong-kong"
    assert dataset.source == data.resolve()
    assert dataset.format == "csv"
    types = {c.name: c.type for c in dataset.schema.columns}
    assert types == {"age": ColumnType.INT, "income": ColumnType.FLOAT, "smoker": ColumnType.BOOL}
    assert not any(c.has_bounds for c in dataset.schema.columns)
    (policy,) = config.consumers.values()
    assert policy.operations == frozenset({"describe", "analyze"})
    assert policy.max_epsilon_per_release < policy.epsilon


def test_starter_config_leaves_bounds_as_commented_placeholders(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    pa_csv.write_csv(_numeric_table(), data)
    text = starter_config(data)
    assert "# lower =" in text
    assert "# upper =" in text
    assert "domain knowledge" in text
    columns = tomllib.loads(text)["datasets"][0]["columns"]
    assert all("lower" not in c and "upper" not in c for c in columns)
    assert "# [tls]" in text


def test_starter_config_for_csv_with_strings(tmp_path: Path) -> None:
    data = tmp_path / "mixed.csv"
    pa_csv.write_csv(_mixed_table(), data)

    text = starter_config(data, dataset="credit")

    _assert_no_data_values(text)
    assert "north" not in text
    columns = tomllib.loads(text)["datasets"][0]["columns"]
    region = next(c for c in columns if c["name"] == "region")
    assert region == {"name": "region", "type": "category", "domain": []}
    assert "street" not in {c["name"] for c in columns}
    assert '# Column "street" is left out' in text
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="category column 'region' needs a public domain"):
        load_config(path)
    _write(tmp_path, text.replace("domain = []", 'domain = ["east", "west"]'))
    assert load_config(path).dataset("credit").schema.column("region").domain == ("east", "west")


def test_starter_config_for_parquet(tmp_path: Path) -> None:
    table = _mixed_table().append_column(
        "grade", pa.array(["a", "b", "a", "b", "a", "b"]).dictionary_encode()
    )
    data = tmp_path / "shen zhen.parquet"
    pa_parquet.write_table(table, data)

    text = starter_config(data, name="shenzhen", jurisdiction="CN-GD")

    _assert_no_data_values(text)
    document = tomllib.loads(text)
    (dataset,) = document["datasets"]
    assert dataset["name"] == "shen_zhen"
    assert dataset["format"] == "parquet"
    assert Path(dataset["source"]) == data.absolute()
    types = {c["name"]: c["type"] for c in dataset["columns"]}
    assert types == {
        "age": "int",
        "income": "float",
        "smoker": "bool",
        "region": "category",
        "grade": "category",
    }
    filled = text.replace("domain = []", 'domain = ["x", "y"]')
    config = load_config(_write(tmp_path, filled))
    assert config.jurisdiction == "CN-GD"


def test_starter_config_skips_unusable_column_names(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    pa_csv.write_csv(pa.table({"first name": [1, 2], "ok": [1.5, 2.5]}), data)
    text = starter_config(data)
    assert '# Column "first name" is left out' in text
    load_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("file_name", "kwargs", "message"),
    [
        ("missing.csv", {}, "data file not found"),
        ("data.json", {}, "expected a .csv, .parquet or .pq file"),
        ("ok.csv", {"name": "my node"}, "name: must be 1-64 letters"),
        ("ok.csv", {"dataset": "a/b"}, "dataset: must be 1-64 letters"),
        ("ok.csv", {"jurisdiction": ""}, "jurisdiction: must be a code"),
    ],
)
def test_starter_config_rejects_bad_input(
    tmp_path: Path, file_name: str, kwargs: dict[str, str], message: str
) -> None:
    pa_csv.write_csv(_numeric_table(), tmp_path / "ok.csv")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(ConfigError, match=message):
        starter_config(tmp_path / file_name, **kwargs)


def test_starter_config_unreadable_parquet_hides_contents(tmp_path: Path) -> None:
    data = tmp_path / "broken.parquet"
    data.write_text("zanzibar,quokka-7731\n")
    with pytest.raises(ConfigError) as info:
        starter_config(data)
    assert "cannot read as parquet" in str(info.value)
    _assert_no_data_values(str(info.value))
