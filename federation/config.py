"""The coordinator's config (``federation.toml``): which nodes to use, and as whom.

::

    [coordinator]
    timeout_s = 30            # deadline of each call to a node
    receive_window_mib = 16   # how far a node's update may stream ahead of what we have
                              # read (4-2047; default 16; see NodeClient)
    consumer = "acme-ai"      # only for plaintext (loopback) nodes; TLS uses the certificate

    [tls]                     # mutual TLS (production)
    ca = "pki/ca.pem"
    cert = "pki/acme-ai.pem"
    key = "pki/acme-ai.key"

    [[nodes]]
    name = "hong-kong"        # the node's certificate must carry this name
    address = "127.0.0.1:50051"
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from federation.errors import ConfigError

# How far (MiB) each node's update stream may run ahead of what the coordinator has read;
# the default of NodeClient's ``receive_window_bytes``. gRPC's adaptive window (None) is
# for the Python API only.
RECEIVE_WINDOW_MIB = 16
MIN_RECEIVE_WINDOW_MIB = 4  # two 2 MiB chunks: under one message, every chunk would wait
MAX_RECEIVE_WINDOW_MIB = 2047  # HTTP/2's largest window is 2**31 - 1 bytes


def whole_number_in(value: object, low: int, high: int) -> TypeGuard[int]:
    """Whether ``value`` is an int (a bool is not) from ``low`` to ``high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


__all__ = ["CoordinatorConfig", "NodeAddress", "TlsFiles", "load_coordinator_config"]


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node the coordinator may use."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The consumer's certificate, key and the federation CA."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """A parsed ``federation.toml``."""

    nodes: tuple[NodeAddress, ...]
    timeout_s: float = 30.0
    consumer: str | None = None
    tls: TlsFiles | None = None
    receive_window_mib: int = RECEIVE_WINDOW_MIB  # see NodeClient's receive_window_bytes


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Read and check a coordinator config.

    Raises:
        ConfigError: missing file, TOML syntax error, or a bad key (the message names it).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such coordinator config") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (a TOML file is): {err.reason}") from err
    except OSError as err:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path.name}: not valid TOML: {err}") from err
    return parse_coordinator_config(data, base_dir=path.parent, source=path.name)


def parse_coordinator_config(
    data: Mapping[str, object], *, base_dir: Path, source: str = "federation.toml"
) -> CoordinatorConfig:
    """Check a coordinator config already parsed from TOML."""
    _known(data, {"coordinator", "tls", "nodes"}, "", source)
    section = _table(data.get("coordinator", {}), "coordinator", source)
    _known(section, {"timeout_s", "consumer", "receive_window_mib"}, "coordinator", source)
    window = section.get("receive_window_mib", RECEIVE_WINDOW_MIB)
    if not whole_number_in(window, MIN_RECEIVE_WINDOW_MIB, MAX_RECEIVE_WINDOW_MIB):
        raise ConfigError(
            f"{source}: coordinator.receive_window_mib: must be a whole number of MiB from "
            f"{MIN_RECEIVE_WINDOW_MIB} to {MAX_RECEIVE_WINDOW_MIB}; got {window!r}"
        )
    timeout = section.get("timeout_s", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"{source}: coordinator.timeout_s: must be a number; got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"{source}: coordinator.timeout_s: must be > 0; got {timeout!r}")
    consumer = section.get("consumer")
    if consumer is not None and not isinstance(consumer, str):
        raise ConfigError(f"{source}: coordinator.consumer: must be a string")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError(f"{source}: nodes: list at least one [[nodes]] entry")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        entry = _table(raw, f"nodes[{i}]", source)
        _known(entry, {"name", "address"}, f"nodes[{i}]", source)
        name, address = entry.get("name"), entry.get("address")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: nodes[{i}].name: required string")
        if not isinstance(address, str) or not _is_target(address):
            raise ConfigError(
                f"{source}: nodes[{i}].address: expected 'host:port' (port 1-65535); "
                f"got {address!r}"
            )
        nodes.append(NodeAddress(name=name, address=address))
    if len({n.name for n in nodes}) != len(nodes):
        raise ConfigError(f"{source}: nodes: a node name appears twice")
    tls = None
    if "tls" in data:
        t = _table(data["tls"], "tls", source)
        _known(t, {"ca", "cert", "key"}, "tls", source)
        paths = {}
        for key in ("ca", "cert", "key"):
            value = t.get(key)
            if not isinstance(value, str):
                raise ConfigError(f"{source}: tls.{key}: required path")
            paths[key] = (base_dir / value).resolve()
        tls = TlsFiles(ca=paths["ca"], cert=paths["cert"], key=paths["key"])
    return CoordinatorConfig(
        nodes=tuple(nodes),
        timeout_s=float(timeout),
        consumer=consumer,
        tls=tls,
        receive_window_mib=window,
    )


def _table(value: object, where: str, source: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where}: expected a table")
    return value


def _known(table: Mapping[str, object], keys: set[str], where: str, source: str) -> None:
    for key in table:
        if key not in keys:
            place = f" in {where}" if where else ""
            raise ConfigError(
                f"{source}: unknown key {key!r}{place}; known keys: {', '.join(sorted(keys))}"
            )


# gRPC target schemes that name their own address form (and default port).
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _is_target(address: str) -> bool:
    """``host:port`` with a port in 1-65535 (IPv6 as ``[::1]:port``), or a target with a
    gRPC scheme (``dns:///host``, ``unix:/path``, ...), which gRPC checks itself."""
    if address.startswith(_SCHEMES):
        return address.partition(":")[2] != ""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
