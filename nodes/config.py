"""Node configuration: read and check ``node.toml``, and draft one from a data file.

The operator writes ``node.toml`` next to the data and runs
``federation node serve --config node.toml``. Everything here is checked at startup: a
bad config raises :class:`~federation.errors.ConfigError` with one message that names the
key path (``datasets[0].columns[2].type``), the rule and the value received. The loader
only checks that data files exist; it never opens them. :func:`starter_config` does read
a data file, but only to guess column types, and writes no data value into its output.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, cast

from federation.errors import ConfigError, InvalidRequestError
from federation.schema import MAX_ABS_BOUND, MIN_BOUNDS_WIDTH, Column, ColumnType, DatasetSchema
from federation.wire import CHUNK_BYTES
from nodes.limits import REQUEST_READ_S

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "OPERATIONS",
    "ConsumerPolicy",
    "DatasetConfig",
    "NodeConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
    "starter_config",
]

OPERATIONS = frozenset({"describe", "analyze", "train"})

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RULE = "must be 1-64 letters, digits, '-' or '_'"
_CODE_RULE = "must be a code of at most 64 characters without spaces"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
_TRAIN_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024  # a weights chunk and its framing
_MAX_CONCURRENT_REQUESTS = 1024
_DEVICE_RE = re.compile(r"cpu|mps|(cuda|xpu)(:[0-9]{1,3})?")
_MAX_REQUEST_S = 86_400.0  # a day: beyond that a "deadline" no longer protects anything
_DERIVED = math.nan  # default meaning "derive from the other fields" (see ConsumerPolicy)

Format = Literal["csv", "parquet"]


class _FieldError(ConfigError):
    """A dataclass invariant broken by one field; the loader prefixes the key path."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"{name}: {rule}")
        self.field = name
        self.rule = rule


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    """One dataset a node serves.

    Attributes:
        name: dataset name consumers ask for (letters, digits, ``-``, ``_``).
        source: absolute path of the CSV or Parquet file.
        format: ``"csv"`` or ``"parquet"``.
        schema: the operator's public schema (types, bounds, domains).
    """

    name: str
    source: Path
    format: Format
    schema: DatasetSchema

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise _FieldError("name", f"{_NAME_RULE}; got {self.name!r}")
        if not self.source.is_absolute():
            raise _FieldError("source", f"must be an absolute path; got {str(self.source)!r}")
        if self.format not in ("csv", "parquet"):
            raise _FieldError("format", f"expected one of csv, parquet; got {self.format!r}")
        if self.schema.name != self.name:
            raise _FieldError(
                "name", f"differs from the schema's {self.schema.name!r}; got {self.name!r}"
            )


@dataclass(frozen=True, slots=True)
class ConsumerPolicy:
    """What one consumer may do on this node, and how much privacy it may spend.

    Attributes:
        name: the consumer identity: the Common Name of its client TLS certificate.
        epsilon: total ε budget over the node's lifetime, > 0.
        delta: total δ budget, 0 <= δ < 1.
        max_epsilon_per_release: cap on the ε of one release, <= ``epsilon``; left out, it
            is ``min(1.0, epsilon)``.
        max_delta_per_release: cap on the δ of one release, <= ``delta``; left out, it is
            ``delta / 10``.
        operations: allowed RPCs, a subset of :data:`OPERATIONS`; ``analyze`` and ``train``
            need ``describe`` too (coordinators check schemas before spending).
        min_cohort: smallest noisy cohort the node releases statistics about, >= 0 (0: off).
            Post-processing of a DP count, so no extra privacy cost and no extra guarantee:
            see ``nodes.cohort`` for what it means.
        allowed_models: model names this consumer may train (from the node's allow-list).
        noise_multiplier_floor: smallest DP-SGD noise multiplier accepted, >= 0.
        max_rounds: most rounds a training job is declared with and charged for at
            this node (retried rounds count), >= 1.
        max_model_parameters: most values (parameters and buffers) of a model this
            consumer may train here, >= 1; the default holds every ``mlp`` whose encoded
            input is up to 7,900 wide (8 layers of 4096: 117.5M, plus 4096 per input;
            a category counts one input per domain value), so ``wide-mlp``, wider
            one-hot inputs and large
            architectures of the operator's need it raised.
        max_concurrent_requests: requests of this consumer the node runs at once, 1-1024;
            more are refused at once with ``RESOURCE_EXHAUSTED`` marked busy
            (``NodeBusyError`` at the client; nothing charged).

    Raises:
        ConfigError: a field breaks its rule (the message names the field).
    """

    name: str
    epsilon: float
    delta: float = 1e-6
    max_epsilon_per_release: float = _DERIVED
    max_delta_per_release: float = _DERIVED
    operations: frozenset[str] = frozenset({"describe", "analyze"})
    min_cohort: int = 0
    allowed_models: tuple[str, ...] = ("logistic", "mlp")
    noise_multiplier_floor: float = 0.5
    max_rounds: int = 100
    max_model_parameters: int = 150_000_000
    max_concurrent_requests: int = 4

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or not self.name.isprintable():
            raise _FieldError("name", f"must be a certificate Common Name; got {self.name!r}")
        if math.isnan(self.max_epsilon_per_release):
            object.__setattr__(self, "max_epsilon_per_release", min(1.0, self.epsilon))
        if math.isnan(self.max_delta_per_release):
            object.__setattr__(self, "max_delta_per_release", self.delta / 10)
        object.__setattr__(self, "operations", frozenset(self.operations))
        object.__setattr__(self, "allowed_models", tuple(self.allowed_models))
        self._check_budget()
        self._check_permissions()

    def _check_budget(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise _FieldError("epsilon", f"must be a finite number > 0; got {_num(self.epsilon)}")
        if not (math.isfinite(self.delta) and 0 <= self.delta < 1):
            raise _FieldError("delta", f"must be a number >= 0 and < 1; got {_num(self.delta)}")
        cap = self.max_epsilon_per_release
        if not (math.isfinite(cap) and 0 < cap <= self.epsilon):
            raise _FieldError(
                "max_epsilon_per_release",
                f"must be > 0 and at most epsilon ({_num(self.epsilon)}); got {_num(cap)}",
            )
        cap = self.max_delta_per_release
        if not (math.isfinite(cap) and 0 <= cap <= self.delta):
            raise _FieldError(
                "max_delta_per_release",
                f"must be >= 0 and at most delta ({_num(self.delta)}); got {_num(cap)}",
            )

    def _check_permissions(self) -> None:
        unknown = sorted(self.operations - OPERATIONS)
        if unknown:
            raise _FieldError(
                "operations",
                f"expected some of {', '.join(sorted(OPERATIONS))}; got {unknown[0]!r}",
            )
        spending = sorted(self.operations & {"analyze", "train"})
        if spending and "describe" not in self.operations:
            raise _FieldError(
                "operations",
                f"must include 'describe' with {' and '.join(spending)}: a coordinator checks the "
                "dataset's schema (public metadata) at every node before it asks for "
                "anything that spends budget",
            )
        if self.min_cohort < 0:
            raise _FieldError("min_cohort", f"must be an integer >= 0; got {self.min_cohort}")
        for model in self.allowed_models:
            if not _NAME_RE.fullmatch(model):
                raise _FieldError("allowed_models", f"not a model name; got {model!r}")
        if len(set(self.allowed_models)) != len(self.allowed_models):
            raise _FieldError(
                "allowed_models", f"lists a model twice; got {list(self.allowed_models)}"
            )
        floor = self.noise_multiplier_floor
        if not (math.isfinite(floor) and floor >= 0):
            raise _FieldError("noise_multiplier_floor", f"must be finite and >= 0; got {floor}")
        if self.max_rounds < 1:
            raise _FieldError("max_rounds", f"must be an integer >= 1; got {self.max_rounds}")
        if self.max_model_parameters < 1:
            raise _FieldError(
                "max_model_parameters", f"must be an integer >= 1; got {self.max_model_parameters}"
            )
        if not 1 <= self.max_concurrent_requests <= _MAX_CONCURRENT_REQUESTS:
            raise _FieldError(
                "max_concurrent_requests",
                f"must be an integer 1-{_MAX_CONCURRENT_REQUESTS}; "
                f"got {self.max_concurrent_requests}",
            )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual-TLS material of a node: absolute paths of PEM files.

    Attributes:
        ca: certificate authority that signs consumer (client) certificates.
        cert: this node's certificate chain.
        key: this node's private key.
        revocation: file listing revoked certificates, or None.
    """

    ca: Path
    cert: Path
    key: Path
    revocation: Path | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's whole configuration, checked.

    Attributes:
        name: node name, e.g. ``"hong-kong"`` (letters, digits, ``-``, ``_``).
        jurisdiction: where the data lives, e.g. ``"HK"``; may be empty.
        listen: ``host:port`` to serve on (IPv6 as ``[::1]:50051``); port 0 picks a free one.
        state_dir: absolute directory for the ledger and audit log (the server creates it).
        datasets: the datasets served, names unique.
        consumers: consumer name -> policy; a read-only mapping.
        tls: mutual-TLS material, or None (plain text, for loopback testing only).
        max_workers: gRPC server threads.
        max_message_bytes: gRPC message size limit.
        max_request_s: server-side deadline of one request in seconds, 0 < s <= 86400;
            a request still running after it is cancelled, whatever its client asked for.
        max_request_read_s: seconds an admitted Describe, Analyze or health call may take
            to deliver its request message, 0 < s <= ``max_request_s``; a call still
            without it is cancelled. Left out, it is ``min(10, max_request_s)``.
        device: the torch device DP-SGD trains on: ``"cpu"`` (default), ``"cuda"``,
            ``"cuda:N"``, ``"mps"`` or ``"xpu[:N]"``; the node refuses to start if it is
            not available. Analytics always run on the CPU.
        architectures: the operator's own model architectures, name -> where its builder
            is (``"package.module:function"``, or ``"/abs/path/file.py:function"``; the
            loader makes a relative file path absolute). The node imports them at start
            (``federation.architectures.load_builder``); consumers may train them where
            their ``allowed_models`` name them.

    Raises:
        ConfigError: a field breaks its rule (the message names the field).
    """

    name: str
    jurisdiction: str
    listen: str
    state_dir: Path
    datasets: tuple[DatasetConfig, ...]
    consumers: Mapping[str, ConsumerPolicy]
    tls: TlsConfig | None = None
    max_workers: int = 8
    max_message_bytes: int = 4 * 1024 * 1024
    max_request_s: float = 300.0
    max_request_read_s: float = _DERIVED
    device: str = "cpu"
    architectures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A private copy behind a read-only view: no caller can change a policy at runtime.
        object.__setattr__(self, "consumers", MappingProxyType(dict(self.consumers)))
        object.__setattr__(self, "architectures", MappingProxyType(dict(self.architectures)))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if not _NAME_RE.fullmatch(self.name):
            raise _FieldError("name", f"{_NAME_RULE}; got {self.name!r}")
        if not _is_code(self.jurisdiction):
            raise _FieldError("jurisdiction", f"{_CODE_RULE}; got {self.jurisdiction!r}")
        _split_listen(self.listen)
        if not self.state_dir.is_absolute():
            raise _FieldError("state_dir", f"must be absolute; got {str(self.state_dir)!r}")
        self._check_contents()
        if not 1 <= self.max_workers <= 1024:
            raise _FieldError("max_workers", f"must be an integer 1-1024; got {self.max_workers}")
        if not 1024 <= self.max_message_bytes <= _MAX_GRPC_MESSAGE_BYTES:
            raise _FieldError(
                "max_message_bytes",
                f"must be an integer 1024-{_MAX_GRPC_MESSAGE_BYTES}; got {self.max_message_bytes}",
            )
        trainers = sorted(n for n, c in self.consumers.items() if "train" in c.operations)
        if trainers and self.max_message_bytes < _TRAIN_MESSAGE_BYTES:
            # Found by review: accepted, then every training job failed at its first chunk.
            raise _FieldError(
                "max_message_bytes",
                f"must be at least {_TRAIN_MESSAGE_BYTES} when a consumer may train "
                f"({', '.join(trainers)}): weights stream in {CHUNK_BYTES}-byte chunks; got "
                f"{self.max_message_bytes}",
            )
        if not (math.isfinite(self.max_request_s) and 0 < self.max_request_s <= _MAX_REQUEST_S):
            raise _FieldError(
                "max_request_s",
                f"must be a number of seconds > 0 and <= {_num(_MAX_REQUEST_S)}; "
                f"got {_num(self.max_request_s)}",
            )
        self._check_read_limit()
        if not _DEVICE_RE.fullmatch(self.device):
            raise _FieldError(
                "device",
                f'must be "cpu", "cuda", "cuda:N", "mps" or "xpu[:N]"; got {self.device!r}',
            )

    def _check_read_limit(self) -> None:
        if math.isnan(self.max_request_read_s):
            object.__setattr__(self, "max_request_read_s", min(REQUEST_READ_S, self.max_request_s))
        read_s = self.max_request_read_s
        if not (math.isfinite(read_s) and 0 < read_s <= self.max_request_s):
            raise _FieldError(
                "max_request_read_s",
                f"must be a number of seconds > 0 and <= max_request_s "
                f"({_num(self.max_request_s)}); got {_num(read_s)}",
            )

    def _check_contents(self) -> None:
        if not self.datasets:
            raise _FieldError("datasets", "at least one dataset is required ([[datasets]])")
        names = [d.name for d in self.datasets]
        for name in names:
            if names.count(name) > 1:
                raise _FieldError("datasets", f"dataset name {name!r} is used twice")
        if not self.consumers:
            raise _FieldError("consumers", "at least one consumer is required ([consumers.NAME])")
        for key, policy in self.consumers.items():
            if key != policy.name:
                raise _FieldError("consumers", f"key {key!r} differs from policy {policy.name!r}")

    def dataset(self, name: str) -> DatasetConfig:
        """Return the dataset called ``name``.

        Raises:
            InvalidRequestError: no such dataset (the message lists the known ones).
        """
        for dataset in self.datasets:
            if dataset.name == name:
                return dataset
        known = ", ".join(d.name for d in self.datasets)
        raise InvalidRequestError(
            f"node {self.name!r} has no dataset {name!r}; its datasets are: {known}"
        )

    @property
    def listen_host(self) -> str:
        """The host part of ``listen``, without the brackets of an IPv6 address."""
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of ``listen`` (0: the server picks a free port)."""
        return _split_listen(self.listen)[1]

    @property
    def is_loopback(self) -> bool:
        """Whether the node listens only on this machine (127.x.x.x, ::1 or localhost)."""
        host = self.listen_host
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _is_code(text: str) -> bool:
    """Whether ``text`` is a short code such as ``HK`` or ``CN-GD`` (printable, no spaces)."""
    return len(text) <= 64 and text.isprintable() and not any(c.isspace() for c in text)


def _split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) or raise a ``listen`` field error."""
    error = _FieldError(
        "listen", f"expected 'host:port' (IPv6 as '[::1]:50051'), port 0-65535; got {listen!r}"
    )
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise error
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise error from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise error
    return host, int(port)


# --------------------------------------------------------------------------- loading


def load_config(path: Path) -> NodeConfig:
    """Read and check a node config file.

    Relative paths inside the file (data sources, state directory, TLS files) are resolved
    against the file's directory. Data files must exist but are not opened.

    Args:
        path: the ``node.toml`` file.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML, or breaks a rule; the
            message starts with ``path`` and names the key.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    try:
        return parse_config(data, base_dir=path.absolute().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def parse_config(data: Mapping[str, object], *, base_dir: Path) -> NodeConfig:
    """Check parsed TOML and build the node configuration.

    Args:
        data: the document, as ``tomllib`` returns it.
        base_dir: directory that relative paths are resolved against.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: the first broken rule; the message starts with the key path.
    """
    _check_keys(data, "", ("node", "datasets", "consumers", "tls", "architectures"))
    if "node" not in data:
        raise ConfigError("node: missing required table [node]")
    node = _table(data["node"], "node", "[node]")
    _check_keys(node, "node", _NODE_KEYS)
    name = _string(node, "node", "name")
    jurisdiction = _string(node, "node", "jurisdiction", default="")
    listen = _string(node, "node", "listen")
    state_dir = _string(node, "node", "state_dir", default=f"state/{name}")
    max_workers = _integer(node, "node", "max_workers", default=8)
    max_message_bytes = _integer(node, "node", "max_message_bytes", default=4 * 1024 * 1024)
    max_request_s = _number(node, "node", "max_request_s", default=300.0)
    max_request_read_s = _number(node, "node", "max_request_read_s", default=_DERIVED)
    device = _string(node, "node", "device", default="cpu")
    datasets = _datasets(data, base_dir)
    consumers = _consumers(data)
    tls = _tls(data["tls"], base_dir) if "tls" in data else None
    architectures = _architectures(data.get("architectures", {}), base_dir)
    try:
        return NodeConfig(
            name=name,
            jurisdiction=jurisdiction,
            listen=listen,
            state_dir=_resolve(base_dir, state_dir, "node.state_dir"),
            datasets=datasets,
            consumers=consumers,
            tls=tls,
            max_workers=max_workers,
            max_message_bytes=max_message_bytes,
            max_request_s=max_request_s,
            max_request_read_s=max_request_read_s,
            device=device,
            architectures=architectures,
        )
    except _FieldError as err:
        where = err.field if err.field in ("datasets", "consumers") else f"node.{err.field}"
        raise ConfigError(f"{where}: {err.rule}") from err


_NODE_KEYS = (
    "name",
    "jurisdiction",
    "listen",
    "state_dir",
    "max_workers",
    "max_message_bytes",
    "max_request_s",
    "max_request_read_s",
    "device",
)
_DATASET_KEYS = ("name", "source", "format", "description", "columns")
_COLUMN_KEYS = ("name", "type", "lower", "upper", "domain", "description")
_CONSUMER_KEYS = (
    "epsilon",
    "delta",
    "max_epsilon_per_release",
    "max_delta_per_release",
    "operations",
    "min_cohort",
    "allowed_models",
    "noise_multiplier_floor",
    "max_rounds",
    "max_model_parameters",
    "max_concurrent_requests",
)
_TLS_KEYS = ("ca", "cert", "key", "revocation")


def _architectures(raw: object, base_dir: Path) -> dict[str, str]:
    """Read ``[architectures]``: name -> ``"module:function"`` or ``"file.py:function"``.

    Only the form is checked here (names, targets; a relative ``.py`` path made absolute
    against ``base_dir``); the node imports them when it starts.
    """
    table = _table(raw, "architectures", "[architectures]")
    out: dict[str, str] = {}
    for name, value in table.items():
        where = _key_path("architectures", name)
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: an architecture name is {_NAME_RULE}")
        if not isinstance(value, str) or ":" not in value:
            raise ConfigError(
                f"{where}: expected 'package.module:function' or 'file.py:function'; "
                f"got {_show(value)}"
            )
        module, _, function = value.rpartition(":")
        if module.endswith(".py"):
            module = str(_resolve(base_dir, module, where))
        out[name] = f"{module}:{function}"
    return out


def _datasets(data: Mapping[str, object], base_dir: Path) -> tuple[DatasetConfig, ...]:
    """Read every ``[[datasets]]`` table; names must be unique."""
    raw = data.get("datasets")
    if raw is None:
        raise ConfigError("datasets: at least one dataset is required ([[datasets]])")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"datasets: expected an array of tables ([[datasets]]); got {_show(raw)}")
    if not raw:
        raise ConfigError("datasets: at least one dataset is required ([[datasets]])")
    datasets: list[DatasetConfig] = []
    for i, table in enumerate(cast(list[Mapping[str, object]], raw)):
        dataset = _dataset(table, f"datasets[{i}]", base_dir)
        for j, earlier in enumerate(datasets):
            if earlier.name == dataset.name:
                raise ConfigError(
                    f"datasets[{i}].name: duplicate dataset name {dataset.name!r} "
                    f"(also datasets[{j}])"
                )
        datasets.append(dataset)
    return tuple(datasets)


def _dataset(table: Mapping[str, object], where: str, base_dir: Path) -> DatasetConfig:
    """Read one ``[[datasets]]`` table: its file must exist, its columns must check."""
    _check_keys(table, where, _DATASET_KEYS)
    name = _string(table, where, "name")
    raw_source = _string(table, where, "source")
    source = _resolve(base_dir, raw_source, f"{where}.source")
    if not source.exists():
        raise ConfigError(f"{where}.source: data file not found: {source}")
    if not source.is_file():
        raise ConfigError(f"{where}.source: not a regular file: {source}")
    fmt = _string(table, where, "format", default=_format_of(source) or "")
    if fmt not in ("csv", "parquet"):
        if "format" in table:
            raise ConfigError(f"{where}.format: expected one of csv, parquet; got {fmt!r}")
        raise ConfigError(
            f"{where}.source: cannot tell the format from the name {source.name!r} "
            '(expected .csv, .parquet or .pq); set format = "csv" or "parquet"'
        )
    schema = _schema(table, where, name)
    try:
        return DatasetConfig(name=name, source=source, format=cast(Format, fmt), schema=schema)
    except _FieldError as err:
        raise ConfigError(f"{where}.{err.field}: {err.rule}") from err


def _schema(table: Mapping[str, object], where: str, name: str) -> DatasetSchema:
    """Read the ``[[datasets.columns]]`` of one dataset into its public schema."""
    raw = table.get("columns")
    if raw is None or raw == []:
        raise ConfigError(f"{where}.columns: at least one column is required")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(
            f"{where}.columns: expected an array of tables ([[datasets.columns]]); got {_show(raw)}"
        )
    columns: list[Column] = []
    for j, column_table in enumerate(cast(list[Mapping[str, object]], raw)):
        column = _column(column_table, f"{where}.columns[{j}]")
        for k, earlier in enumerate(columns):
            if earlier.name == column.name:
                raise ConfigError(
                    f"{where}.columns[{j}].name: duplicate column name {column.name!r} "
                    f"(also columns[{k}])"
                )
        columns.append(column)
    description = _string(table, where, "description", default="")
    return DatasetSchema(name=name, columns=tuple(columns), description=description)


def _column(table: Mapping[str, object], where: str) -> Column:
    """Read one ``[[datasets.columns]]`` table."""
    _check_keys(table, where, _COLUMN_KEYS)
    name = _string(table, where, "name")
    type_name = _string(table, where, "type")
    try:
        column_type = ColumnType(type_name)
    except ValueError:
        known = ", ".join(t.value for t in ColumnType)
        raise ConfigError(f"{where}.type: expected one of {known}; got {type_name!r}") from None
    if "domain" in table and column_type is not ColumnType.CATEGORY:
        raise ConfigError(
            f"{where}.domain: only category columns take a domain; this one is {type_name!r}"
        )
    lower = _number(table, where, "lower") if "lower" in table else None
    upper = _number(table, where, "upper") if "upper" in table else None
    if (
        lower is not None
        and upper is not None
        and lower < upper  # inverted bounds: Column says so
        and (max(abs(lower), abs(upper)) > MAX_ABS_BOUND or upper - lower < MIN_BOUNDS_WIDTH)
    ):
        # Every query on the column would be refused, and training would scale it to 0.
        raise ConfigError(
            f"{where}: bounds [{lower:g}, {upper:g}] must lie within ±{MAX_ABS_BOUND:g} and "
            f"be at least {MIN_BOUNDS_WIDTH:g} apart"
        )
    try:
        return Column(
            name=name,
            type=column_type,
            lower=lower,
            upper=upper,
            domain=_strings(table, where, "domain", default=()),
            description=_string(table, where, "description", default=""),
        )
    except InvalidRequestError as err:
        raise ConfigError(f"{where}: {err}") from err


def _consumers(data: Mapping[str, object]) -> dict[str, ConsumerPolicy]:
    """Read the ``[consumers.NAME]`` tables, keyed by certificate Common Name."""
    raw = data.get("consumers")
    if raw is None or raw == {}:
        raise ConfigError("consumers: at least one consumer is required ([consumers.NAME])")
    consumers = _table(raw, "consumers", "[consumers.NAME]")
    policies: dict[str, ConsumerPolicy] = {}
    for name, value in consumers.items():
        where = _key_path("consumers", name)
        table = _table(value, where, f"[{where}]")
        nested = [k for k, v in table.items() if isinstance(v, Mapping) and k not in _CONSUMER_KEYS]
        if nested:  # [consumers.acme.ai] is the table "ai" inside consumer "acme"
            dotted = f"{name}.{nested[0]}"
            raise ConfigError(
                f"{where}.{nested[0]}: a table where a policy key belongs; a consumer name "
                f'with a dot must be quoted: [consumers."{dotted}"]'
            )
        _check_keys(table, where, _CONSUMER_KEYS)
        try:
            policies[name] = _policy(name, table, where)
        except _FieldError as err:
            path = where if err.field == "name" else f"{where}.{err.field}"
            raise ConfigError(f"{path}: {err.rule}") from err
    return policies


def _policy(name: str, table: Mapping[str, object], where: str) -> ConsumerPolicy:
    """Build one consumer's policy from its table (defaults as in :class:`ConsumerPolicy`)."""
    models = _strings(table, where, "allowed_models", default=("logistic", "mlp"))
    return ConsumerPolicy(
        name=name,
        epsilon=_number(table, where, "epsilon"),
        delta=_number(table, where, "delta", default=1e-6),
        max_epsilon_per_release=_number(table, where, "max_epsilon_per_release", default=_DERIVED),
        max_delta_per_release=_number(table, where, "max_delta_per_release", default=_DERIVED),
        operations=frozenset(_strings(table, where, "operations", default=("describe", "analyze"))),
        min_cohort=_integer(table, where, "min_cohort", default=0),
        allowed_models=models,
        noise_multiplier_floor=_number(table, where, "noise_multiplier_floor", default=0.5),
        max_rounds=_integer(table, where, "max_rounds", default=100),
        max_model_parameters=_integer(table, where, "max_model_parameters", default=150_000_000),
        max_concurrent_requests=_integer(table, where, "max_concurrent_requests", default=4),
    )


def _tls(raw: object, base_dir: Path) -> TlsConfig:
    """Read the optional ``[tls]`` table; every file named must exist."""
    table = _table(raw, "tls", "[tls]")
    _check_keys(table, "tls", _TLS_KEYS)
    paths: dict[str, Path | None] = {}
    for name in _TLS_KEYS:
        if name == "revocation" and name not in table:
            paths[name] = None
            continue
        path = _resolve(base_dir, _string(table, "tls", name), f"tls.{name}")
        if not path.is_file():
            raise ConfigError(f"tls.{name}: file not found: {path}")
        paths[name] = path
    ca, cert, key = (cast(Path, paths[k]) for k in ("ca", "cert", "key"))
    return TlsConfig(ca=ca, cert=cert, key=key, revocation=paths["revocation"])


# --------------------------------------------------------------------------- typed reads


def _check_keys(table: Mapping[str, object], where: str, known: Collection[str]) -> None:
    """Reject keys that are not in ``known`` (typos), suggesting the closest one."""
    for key in table:
        if key in known:
            continue
        place = f"in {where}" if where else "at top level"
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown key {key!r} {place}{hint}; known keys: {', '.join(sorted(known))}"
        )


def _table(value: object, where: str, syntax: str) -> Mapping[str, object]:
    """Return ``value`` as a TOML table, or fail naming the syntax expected."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table ({syntax}); got {_show(value)}")
    return cast(Mapping[str, object], value)


def _required(table: Mapping[str, object], where: str, key: str) -> object:
    if key not in table:
        raise ConfigError(f"{_key_path(where, key)}: missing required key")
    return table[key]


def _string(
    table: Mapping[str, object], where: str, key: str, *, default: str | None = None
) -> str:
    """Read a string; required when ``default`` is None."""
    if default is not None and key not in table:
        return default
    value = _required(table, where, key)
    if not isinstance(value, str):
        raise ConfigError(f"{_key_path(where, key)}: expected a string; got {_show(value)}")
    return value


def _number(
    table: Mapping[str, object], where: str, key: str, *, default: float | None = None
) -> float:
    """Read an integer or float (not a boolean) as a float; required when no default."""
    if default is not None and key not in table:
        return default
    value = _required(table, where, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{_key_path(where, key)}: expected a number; got {_show(value)}")
    return float(value)


def _integer(table: Mapping[str, object], where: str, key: str, *, default: int) -> int:
    """Read an optional integer (not a boolean, not a float)."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_key_path(where, key)}: expected an integer; got {_show(value)}")
    return value


def _strings(
    table: Mapping[str, object], where: str, key: str, *, default: tuple[str, ...]
) -> tuple[str, ...]:
    """Read an optional array of strings."""
    value = table.get(key, default)
    path = _key_path(where, key)
    if isinstance(value, tuple):
        return cast(tuple[str, ...], value)
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected an array of strings; got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]: expected a string; got {_show(item)}")
    return tuple(cast(list[str], value))


def _resolve(base_dir: Path, raw: str, where: str) -> Path:
    """Resolve an operator's path: ``~`` expanded, relative to the config file's directory."""
    if not raw:
        raise ConfigError(f"{where}: expected a path; got ''")
    return (base_dir / Path(raw).expanduser()).resolve()


def _format_of(path: Path) -> Format | None:
    """Guess the data format from a file name, or None."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return None


def _key_path(where: str, key: str) -> str:
    """Join a key to its table's path, quoting keys that are not bare TOML keys."""
    shown = key if _NAME_RE.fullmatch(key) else _toml_string(key)
    return f"{where}.{shown}" if where else shown


def _show(value: object) -> str:
    """Render a received TOML value for an error message, TOML-style and short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(value: float) -> str:
    """Format a number as written: ``-1`` rather than ``-1.0``."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _toml_string(text: str) -> str:
    """Quote ``text`` as a TOML basic string."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\t" or (char.isprintable() and char != "\x7f"):
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


# --------------------------------------------------------------------------- starter config

_SAMPLE_BYTES = 1 << 20  # type guesses read about 1 MiB of CSV, ample for a few thousand rows
_SAMPLE_ROWS = 5000  # and this many Parquet rows (Parquet types come from its metadata)
_MAX_CATEGORIES = 64  # more distinct strings than this looks like free text or identifiers


@dataclass(frozen=True, slots=True)
class _Guess:
    """A suggested column: its type, or None with the reason it is left out."""

    name: str
    type: ColumnType | None
    reason: str = ""


def starter_config(
    data_path: Path, *, name: str = "my-node", jurisdiction: str = "XX", dataset: str | None = None
) -> str:
    """Draft a commented ``node.toml`` for one data file, for the operator to edit.

    Column types are guessed from the first rows of the file. No data value is written:
    numeric bounds and category domains are public promises the operator must choose from
    domain knowledge, so they are left as commented placeholders and empty lists. A file
    whose columns are all numeric or boolean gives a config that loads as it is.

    Args:
        data_path: the CSV or Parquet file (``.csv``, ``.parquet`` or ``.pq``).
        name: the node name to write.
        jurisdiction: the jurisdiction code to write.
        dataset: the dataset name; by default derived from the file name.

    Returns:
        The TOML text.

    Raises:
        ConfigError: a name is invalid, or the file is missing or cannot be read.
    """
    fmt = _format_of(data_path)
    if fmt is None:
        raise ConfigError(f"{data_path}: expected a .csv, .parquet or .pq file")
    if not data_path.is_file():
        raise ConfigError(f"{data_path}: data file not found")
    dataset = dataset if dataset is not None else _dataset_name(data_path)
    for key, value in (("name", name), ("dataset", dataset)):
        if not _NAME_RE.fullmatch(value):
            raise ConfigError(f"{key}: {_NAME_RULE}; got {value!r}")
    if not jurisdiction or not _is_code(jurisdiction):
        raise ConfigError(f"jurisdiction: {_CODE_RULE}; got {jurisdiction!r}")
    import pyarrow as pa

    try:
        guesses = _guess_columns(_sample(data_path, fmt))
    except (pa.ArrowException, OSError) as err:
        # The class only: pyarrow's message can quote the offending cell.
        raise ConfigError(f"{data_path}: cannot read as {fmt} ({type(err).__name__})") from err
    lines = _node_lines(name, jurisdiction)
    lines += _dataset_lines(dataset, data_path.absolute(), fmt)
    for guess in guesses:
        lines += _column_lines(guess)
    lines += _CONSUMER_LINES + _TLS_LINES
    return "\n".join(lines) + "\n"


def _dataset_name(path: Path) -> str:
    """Derive a dataset name from a file name: ``hong-kong.csv`` -> ``hong-kong``."""
    stem = path.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64] or "data"


def _sample(path: Path, fmt: Format) -> pa.Table:
    """Read the first rows of a data file: about 1 MiB of CSV, or one Parquet batch."""
    import pyarrow as pa  # imported here: only drafting a config reads a data file
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pa_parquet

    if fmt == "csv":
        options = pa_csv.ReadOptions(block_size=_SAMPLE_BYTES)
        with pa_csv.open_csv(str(path), read_options=options) as reader:
            batch = next(iter(reader), None)
            schema = reader.schema
    else:
        with pa_parquet.ParquetFile(str(path)) as parquet:
            batch = next(parquet.iter_batches(batch_size=_SAMPLE_ROWS), None)
            schema = parquet.schema_arrow
    return pa.Table.from_batches([] if batch is None else [batch], schema=schema)


def _guess_columns(table: pa.Table) -> list[_Guess]:
    """Guess each column's type from a sample (types only: no value is kept)."""
    guesses: list[_Guess] = []
    seen: set[str] = set()
    for column_name, column in zip(table.column_names, table.columns, strict=True):
        text = str(column_name)
        if text in seen:
            guesses.append(_Guess(text, None, "its name appears twice in the file"))
        elif not text.isascii() or not text.replace("_", "a").isalnum():
            guesses.append(_Guess(text, None, "names must be letters, digits and underscores"))
        else:
            guesses.append(_guess_type(text, column))
        seen.add(text)
    return guesses


def _guess_type(name: str, column: pa.ChunkedArray) -> _Guess:
    """Map an Arrow column to a column type; strings become categories if few distinct."""
    import pyarrow as pa
    import pyarrow.compute as pa_compute

    arrow_type = column.type
    if pa.types.is_boolean(arrow_type):
        return _Guess(name, ColumnType.BOOL)
    if pa.types.is_integer(arrow_type):
        return _Guess(name, ColumnType.INT)
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return _Guess(name, ColumnType.FLOAT)
    if pa.types.is_dictionary(arrow_type):
        return _Guess(name, ColumnType.CATEGORY)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        distinct = int(pa_compute.count_distinct(column, mode="only_valid").as_py())
        present = len(column) - int(column.null_count)
        if 0 < distinct <= _MAX_CATEGORIES and 2 * distinct <= present:
            return _Guess(name, ColumnType.CATEGORY)
        return _Guess(name, None, "free text and identifiers cannot be released")
    return _Guess(name, None, f"type {arrow_type} is not supported")


def _node_lines(name: str, jurisdiction: str) -> list[str]:
    return [
        "# Federation node config: a draft from `starter_config`. Review every line.",
        "# Serve it with: federation node serve --config node.toml",
        "# Relative paths below are relative to this file.",
        "",
        "[node]",
        f"name = {_toml_string(name)}",
        f"jurisdiction = {_toml_string(jurisdiction)}",
        "# Loopback only. To serve other machines, listen on a public address AND set [tls].",
        'listen = "127.0.0.1:50051"',
        'state_dir = "state"            # privacy ledger and audit log: back it up, never share it',
        "max_workers = 8",
        "max_message_bytes = 4194304",
        "max_request_s = 300             # a request still running after this is cancelled",
        "max_request_read_s = 10         # cancel a call whose request is not in by then",
        'device = "cpu"                  # DP-SGD on "cuda" (or "cuda:N") if the node has a GPU',
        "",
    ]


def _dataset_lines(dataset: str, source: Path, fmt: Format) -> list[str]:
    return [
        "[[datasets]]",
        f"name = {_toml_string(dataset)}",
        f"source = {_toml_string(str(source))}",
        f"format = {_toml_string(fmt)}",
        'description = ""',
        "",
        "# Column types were guessed from the first rows of the file: check them.",
        "# Everything below is PUBLIC: every consumer sees it. Bounds and category values must",
        "# come from domain knowledge (a form, a regulation, a data dictionary), never from the",
        "# data: the data's own minimum, maximum or rare values would reveal single records.",
    ]


def _column_lines(guess: _Guess) -> list[str]:
    if guess.type is None:
        return [
            "",
            f"  # Column {_toml_string(guess.name)} is left out: {guess.reason}.",
        ]
    lines = [
        "",
        "  [[datasets.columns]]",
        f"  name = {_toml_string(guess.name)}",
        f"  type = {_toml_string(guess.type.value)}",
    ]
    if guess.type.is_numeric:
        lines += [
            "  # Public bounds: choose them from domain knowledge, never copy them from the",
            "  # data (its min or max would reveal a record). Without bounds this column can be",
            "  # counted but not summed, averaged or binned with differential privacy. Set both:",
            "  # lower =",
            "  # upper =",
        ]
    elif guess.type is ColumnType.CATEGORY:
        lines += [
            "  # TODO: list every value this column may take, from public documentation, not",
            "  # the values seen in the file (a rare value can identify a person). Required.",
            "  domain = []",
        ]
    return lines


_CONSUMER_LINES = [
    "",
    "# One table per consumer, named by the Common Name (CN) of its client TLS certificate.",
    "# The budget is for the node's lifetime; spend is recorded in state_dir and never resets.",
    "[consumers.example-consumer]",
    "epsilon = 1.0                   # total privacy budget",
    "delta = 1e-6                    # total delta; keep it well below 1 / number of records",
    "max_epsilon_per_release = 0.1   # cap on one query, or one whole training job",
    "max_delta_per_release = 1e-7",
    'operations = ["describe", "analyze"]   # add "train" to allow federated training',
    "max_concurrent_requests = 4     # more at once are refused busy (RESOURCE_EXHAUSTED)",
    "# Groups whose DP count is below min_cohort come back suppressed (NaN). Post-processing:",
    "# no extra privacy cost, and no extra formal guarantee either (0: off).",
    "min_cohort = 0",
    "# For training:",
    '# allowed_models = ["logistic", "mlp"]   # built in: logistic, mlp, wide-mlp',
    "# noise_multiplier_floor = 1.0",
    "# max_rounds = 100",
    "# max_model_parameters = 150000000   # raise it for wide-mlp or large architectures",
    "",
    "# Your own architectures, importable here (consumers' allowed_models may list them):",
    "# [architectures]",
    '# tabular-net = "models/tabular_net.py:build"   # build(spec, input_dim) -> nn.Module',
]

_TLS_LINES = [
    "",
    "# Mutual TLS: required to serve anything but loopback; consumers are identified by",
    "# their client certificate.",
    "# [tls]",
    '# ca = "pki/ca.pem"                # signs the consumers\' client certificates',
    '# cert = "pki/node.pem"',
    '# key = "pki/node.key"             # keep it private (mode 600)',
    '# revocation = "pki/revoked.txt"   # optional',
]
