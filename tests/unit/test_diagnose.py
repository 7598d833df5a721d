"""How the coordinator names a failed connection, on the status details gRPC 1.85 gives.

The details strings below were captured from real failed handshakes over loopback; the
integration tests in tests/integration/test_mtls.py exercise the same paths end to end.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from federation import pki
from federation.coordinator import NodeClient
from federation.coordinator import client as client_module
from federation.coordinator._diagnose import error_for_status
from federation.errors import (
    REFUSAL_KEY,
    BudgetExhaustedError,
    InvalidRequestError,
    NodeBusyError,
    NodeInternalError,
    NodeUnavailableError,
    PolicyError,
)

NODE = "shenzhen"
ADDRESS = "127.0.0.1:5001"
PREFIX = "failed to connect to all addresses; last error: "
UNTRUSTED = (
    PREFIX + "UNKNOWN: ipv4:127.0.0.1:5001: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
    "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    "unable to get local issuer certificate: OK"
)
WRONG_NAME = (
    PREFIX + "UNKNOWN: ipv4:127.0.0.1:5001: Custom verification check failed with error: "
    "UNAUTHENTICATED: Hostname Verification Check failed."
)
CLOSED = PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:5001: Socket closed"
REFUSED = PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:5001: Connection refused"


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.Identity]:
    ca_dir = tmp_path_factory.mktemp("ca")
    ca = pki.init_ca(ca_dir)
    past = datetime.now(UTC) - timedelta(days=30)
    out: dict[str, pki.Identity] = {}
    for name, start in (("acme-ai", None), ("expired", past)):
        cert, key = pki.issue(ca_dir, name=name, role="consumer", not_before=start, validity_days=1)
        out[name] = pki.Identity.load(ca=ca, cert=cert, key=key)
    return out


def _explain(details: str, identity: pki.Identity | None) -> str:
    err = error_for_status(
        grpc.StatusCode.UNAVAILABLE, details, node=NODE, address=ADDRESS, identity=identity
    )
    assert type(err) is NodeUnavailableError
    assert details in str(err)  # gRPC's own words are kept for the record
    return str(err)


def test_untrusted_node_certificate_names_the_ca(identities: dict[str, pki.Identity]) -> None:
    message = _explain(UNTRUSTED, identities["acme-ai"])
    assert message.startswith(f"TLS handshake with node {NODE!r} at {ADDRESS} failed")
    assert "not signed by the CA this coordinator trusts" in message


def test_wrong_node_name_names_the_expected_name(identities: dict[str, pki.Identity]) -> None:
    message = _explain(WRONG_NAME, identities["acme-ai"])
    assert f"not valid for the name {NODE!r}" in message
    assert "address may belong to another node" in message


def test_node_hanging_up_on_a_valid_client_suggests_a_refused_certificate(
    identities: dict[str, pki.Identity],
) -> None:
    message = _explain(CLOSED, identities["acme-ai"])
    assert "TLS handshake" in message
    assert "refuses a client certificate" in message


def test_expired_own_certificate_is_named(identities: dict[str, pki.Identity]) -> None:
    message = _explain(CLOSED, identities["expired"])
    assert "this client's certificate 'expired'" in message
    assert "expired at" in message


def test_plaintext_client_is_told_to_use_tls() -> None:
    message = _explain(CLOSED, None)
    assert "plaintext client" in message
    assert "[tls]" in message


def test_unreachable_node_is_not_called_a_tls_problem(identities: dict[str, pki.Identity]) -> None:
    err = error_for_status(
        grpc.StatusCode.UNAVAILABLE,
        REFUSED,
        node=NODE,
        address=ADDRESS,
        identity=identities["acme-ai"],
    )
    assert type(err) is NodeUnavailableError
    assert "TLS" not in str(err)
    assert REFUSED in str(err)


def test_other_statuses_map_as_before() -> None:
    err = error_for_status(
        grpc.StatusCode.PERMISSION_DENIED, "no", node=NODE, address=ADDRESS, identity=None
    )
    assert type(err) is PolicyError
    cancelled = error_for_status(
        grpc.StatusCode.CANCELLED, "Cancelled", node=NODE, address=ADDRESS, identity=None
    )
    assert type(cancelled) is NodeUnavailableError
    assert "max_request_s" in str(cancelled)
    odd = error_for_status(
        grpc.StatusCode.DATA_LOSS, "odd", node=NODE, address=ADDRESS, identity=None
    )
    assert type(odd) is NodeInternalError


def test_a_busy_trailer_turns_resource_exhausted_into_node_busy() -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    kwargs = {"node": NODE, "address": ADDRESS, "identity": None}
    busy = error_for_status(exhausted, "too many concurrent requests", refusal="busy", **kwargs)
    assert type(busy) is NodeBusyError
    spent = error_for_status(exhausted, "remaining_epsilon=0", refusal="budget", **kwargs)
    assert type(spent) is BudgetExhaustedError


def test_a_client_refuses_a_negative_retry_count() -> None:
    with pytest.raises(InvalidRequestError, match="busy_retries must be >= 0"):
        NodeClient(NODE, ADDRESS, busy_retries=-1)


@pytest.mark.parametrize("window", [0, 2 * 2**20, 2**31, True, 16.0 * 2**20, "16MiB"])
def test_a_client_refuses_a_receive_window_it_cannot_use(window: object) -> None:
    # Under two chunks, a chunk's message (a bit over one chunk) would not fit and every
    # chunk would wait for a window update; past 2**31 - 1, HTTP/2 cannot say it.
    with pytest.raises(InvalidRequestError, match="receive_window_bytes must be None or"):
        NodeClient(NODE, ADDRESS, receive_window_bytes=window)  # type: ignore[arg-type]


def test_a_client_keeps_its_receive_window_or_none_for_grpcs_adaptive_one() -> None:
    fixed = NodeClient(NODE, ADDRESS)
    adaptive = NodeClient(NODE, ADDRESS, receive_window_bytes=None)
    try:
        assert fixed.receive_window_bytes == client_module.RECEIVE_WINDOW_BYTES == 16 * 2**20
        assert adaptive.receive_window_bytes is None
    finally:
        fixed.close()
        adaptive.close()


class _Busy(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A RESOURCE_EXHAUSTED status marked busy, as a node's concurrency limit answers."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "too many concurrent requests for consumer 'acme-ai'"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REFUSAL_KEY, "busy"),)


class _Clock:
    """The client module's ``time``: sleeping advances it, nothing else does."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_busy_node_is_retried_only_while_enough_of_the_deadline_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Waits 0.2, 0.6, 1.8, 5.4 s (no jitter here); the next, 16.2 s, would leave 30 - 8 -
    # 16.2 = 5.8 s, under a fifth of the 30 s deadline: the client gives up busy instead of
    # starting a try that would likely end DEADLINE_EXCEEDED.
    clock = _Clock()
    monkeypatch.setattr(client_module, "time", clock)
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: (low + high) / 2)
    timeouts: list[float] = []

    def always_busy(request: object, *, timeout: float, metadata: object) -> object:
        timeouts.append(timeout)
        raise _Busy()

    client = NodeClient(NODE, ADDRESS, timeout_s=30.0, busy_retries=10)
    try:
        with pytest.raises(NodeBusyError):
            client._call(always_busy, object())
    finally:
        client.close()
    assert timeouts == pytest.approx([30.0, 29.8, 29.2, 27.4, 22.0])
    assert clock.now == pytest.approx(108.0)
