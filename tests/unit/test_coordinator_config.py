"""The coordinator's ``federation.toml``: what it accepts, what it refuses, what it sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import ConfigError, parse_coordinator_config
from federation.coordinator import Coordinator

NODES = [{"name": "hong-kong", "address": "127.0.0.1:5001"}]


def _parse(coordinator: dict[str, object]) -> object:
    data = {"coordinator": coordinator, "nodes": NODES}
    return parse_coordinator_config(data, base_dir=Path("."))


def test_the_receive_window_defaults_to_16_mib_and_reaches_every_client() -> None:
    config = parse_coordinator_config({"nodes": NODES}, base_dir=Path("."))
    assert config.receive_window_mib == 16
    wider = parse_coordinator_config(
        {"coordinator": {"receive_window_mib": 64}, "nodes": NODES}, base_dir=Path(".")
    )
    with Coordinator.from_coordinator_config(wider) as fed:
        assert fed.clients["hong-kong"].receive_window_bytes == 64 * 1024 * 1024
    narrowest = parse_coordinator_config(
        {"coordinator": {"receive_window_mib": 4}, "nodes": NODES}, base_dir=Path(".")
    )
    with Coordinator.from_coordinator_config(narrowest) as fed:
        assert fed.clients["hong-kong"].receive_window_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize("window", [0, 3, 2048, 16.5, True, "16"])
def test_a_receive_window_out_of_range_is_a_config_error_naming_the_key(window: object) -> None:
    with pytest.raises(ConfigError, match="coordinator.receive_window_mib: must be a whole"):
        _parse({"receive_window_mib": window})


@pytest.mark.parametrize(
    "address", ["127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:70000", ":5001", "127.0.0.1:²", "dns:"]
)
def test_a_node_address_without_a_usable_port_is_a_config_error(address: str) -> None:
    data = {"nodes": [{"name": "hong-kong", "address": address}]}
    with pytest.raises(ConfigError, match=r"nodes\[0\].address: expected 'host:port'"):
        parse_coordinator_config(data, base_dir=Path("."))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:5001",
        "[::1]:5001",
        "node.hk.example:443",
        "dns:///node.hk.example",
        "unix:/run/hk.sock",
        "unix-abstract:hk",
    ],
)
def test_node_addresses_in_the_usual_forms_are_accepted(address: str) -> None:
    data = {"nodes": [{"name": "hong-kong", "address": address}]}
    config = parse_coordinator_config(data, base_dir=Path("."))
    assert config.nodes[0].address == address


def test_a_coordinator_with_a_certificate_that_may_serve_tls_is_stopped_at_start(
    tmp_path: Path,
) -> None:
    # Every node would refuse it as a consumer's (PERMISSION_DENIED): say so up front.
    from federation import pki

    pki.init_ca(tmp_path, name="test-ca")
    paths = {}
    for role, name in (("node", "hong-kong"), ("consumer", "acme-ai")):
        cert, key = pki.issue(tmp_path, name=name, role=role, out_dir=tmp_path)
        paths[role] = {"ca": str(tmp_path / "ca.pem"), "cert": str(cert), "key": str(key)}
    as_node = parse_coordinator_config({"tls": paths["node"], "nodes": NODES}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"may serve TLS .* --role consumer"):
        Coordinator.from_coordinator_config(as_node)
    as_consumer = parse_coordinator_config(
        {"tls": paths["consumer"], "nodes": NODES}, base_dir=tmp_path
    )
    with Coordinator.from_coordinator_config(as_consumer) as fed:
        assert list(fed.clients) == ["hong-kong"]


def test_from_addresses_refuses_a_certificate_that_may_serve_tls(tmp_path: Path) -> None:
    from federation import pki

    pki.init_ca(tmp_path, name="test-ca")
    cert, key = pki.issue(tmp_path, name="hong-kong", role="node", out_dir=tmp_path)
    identity = pki.Identity.load(ca=tmp_path / "ca.pem", cert=cert, key=key)
    with pytest.raises(ConfigError, match="may serve TLS"):
        Coordinator.from_addresses({"hong-kong": "127.0.0.1:5001"}, identity=identity)
