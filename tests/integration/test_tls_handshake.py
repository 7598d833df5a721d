"""Mutual TLS over real gRPC on 127.0.0.1: who gets through the handshake, and as whom."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from federation import pki

NODE = "node-eu"
CONSUMER = "acme-ai"
TIMEOUT_S = 5.0
METHOD = "/test.Echo/Who"


@dataclass(frozen=True, slots=True)
class Pki:
    ca_dir: Path
    node: pki.Identity
    consumer: pki.Identity
    expired_consumer: pki.Identity
    foreign_consumer: pki.Identity  # issued by another CA


def _identity(ca_dir: Path, name: str) -> pki.Identity:
    return pki.Identity.load(
        ca=ca_dir / "ca.pem", cert=ca_dir / f"{name}.pem", key=ca_dir / f"{name}.key"
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca_dir = tmp_path_factory.mktemp("ca")
    pki.init_ca(ca_dir)
    pki.issue(ca_dir, name=NODE, role="node")
    pki.issue(ca_dir, name=CONSUMER, role="consumer")
    pki.issue(
        ca_dir,
        name="expired",
        role="consumer",
        not_before=datetime.now(UTC) - timedelta(days=30),
        validity_days=1,
    )
    other_dir = tmp_path_factory.mktemp("other-ca")
    pki.init_ca(other_dir, name="other-ca")
    pki.issue(other_dir, name=CONSUMER, role="consumer")
    return Pki(
        ca_dir=ca_dir,
        node=_identity(ca_dir, NODE),
        consumer=_identity(ca_dir, CONSUMER),
        expired_consumer=_identity(ca_dir, "expired"),
        foreign_consumer=_identity(other_dir, CONSUMER),
    )


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    del request
    name = pki.peer_common_name(context)
    cert = pki.peer_certificate(context)
    if name is None or cert is None or pki.common_name(cert) != name:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no verified client certificate")
    return name.encode()


@contextmanager
def _serve(identity: pki.Identity) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        _who, request_deserializer=bytes, response_serializer=bytes
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Who": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(identity))
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


@pytest.fixture
def node_port(certs: Pki) -> Iterator[int]:
    with _serve(certs.node) as port:
        yield port


def _call(channel: grpc.Channel) -> bytes:
    who = channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
    response: bytes = who(b"", timeout=TIMEOUT_S)
    return response


def _call_secure(
    port: int, credentials: grpc.ChannelCredentials, *, expected_node: str = NODE
) -> bytes:
    options = [("grpc.ssl_target_name_override", expected_node)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        return _call(channel)


def _assert_handshake_fails(call: Callable[[], bytes]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_consumer_certificate_identifies_caller(certs: Pki, node_port: int) -> None:
    credentials = pki.channel_credentials(certs.consumer)
    assert _call_secure(node_port, credentials) == CONSUMER.encode()


def test_client_without_certificate_fails_handshake(certs: Pki, node_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.consumer.ca_pem)
    _assert_handshake_fails(lambda: _call_secure(node_port, credentials))


def test_client_trusting_another_ca_fails_handshake(certs: Pki, node_port: int) -> None:
    credentials = pki.channel_credentials(certs.foreign_consumer)
    _assert_handshake_fails(lambda: _call_secure(node_port, credentials))


def test_client_certificate_from_another_ca_fails_handshake(certs: Pki, node_port: int) -> None:
    # Trusts the right CA, but presents a certificate the node's CA never signed.
    foreign = pki.Identity(
        ca_pem=certs.consumer.ca_pem,
        cert_pem=certs.foreign_consumer.cert_pem,
        key_pem=certs.foreign_consumer.key_pem,
    )
    _assert_handshake_fails(lambda: _call_secure(node_port, pki.channel_credentials(foreign)))


def test_expired_client_certificate_fails_handshake(certs: Pki, node_port: int) -> None:
    credentials = pki.channel_credentials(certs.expired_consumer)
    _assert_handshake_fails(lambda: _call_secure(node_port, credentials))


def test_wrong_expected_node_name_fails_handshake(certs: Pki, node_port: int) -> None:
    credentials = pki.channel_credentials(certs.consumer)
    _assert_handshake_fails(
        lambda: _call_secure(node_port, credentials, expected_node="not-the-node")
    )


def test_plaintext_client_fails(node_port: int) -> None:
    def call() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{node_port}") as channel:
            return _call(channel)

    _assert_handshake_fails(call)


def test_consumer_certificate_cannot_serve_as_node(certs: Pki) -> None:
    # A consumer certificate lacks the serverAuth usage, even under the expected node name.
    with _serve(certs.consumer) as port:
        credentials = pki.channel_credentials(certs.consumer)
        _assert_handshake_fails(lambda: _call_secure(port, credentials, expected_node=CONSUMER))
