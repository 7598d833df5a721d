"""One node, seen from the coordinator: a gRPC channel and typed calls.

Errors come back as the exception classes of ``federation.errors`` (a notebook user catches
``BudgetExhaustedError``, not ``grpc.RpcError``). With an ``Identity`` the channel is mutual
TLS and the node's certificate must be valid for the node's *name* (not just its address).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import grpc

from federation import pki, wire
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.errors import error_from_status
from federation.releases import NodeDescription, Release

__all__ = ["CONSUMER_HEADER", "NodeClient"]

CONSUMER_HEADER = "x-federation-consumer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class NodeClient:
    """Typed client of one node's ``federation.v1.Node`` service."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        identity: pki.Identity | None = None,
        consumer: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """Open a channel to ``address``.

        Args:
            name: the node's name; with TLS its certificate must carry it.
            address: ``host:port``.
            identity: the consumer's TLS identity; None for a plaintext (loopback) node.
            consumer: the consumer name sent in a header to a plaintext node.
            timeout_s: deadline of each call.
        """
        self.name = name
        self.address = address
        self.timeout_s = timeout_s
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if identity is not None:
            options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.secure_channel(
                address, pki.channel_credentials(identity), options=options
            )
            self._metadata: tuple[tuple[str, str], ...] = ()
        else:
            self._channel = grpc.insecure_channel(address, options=options)
            self._metadata = ((CONSUMER_HEADER, consumer),) if consumer else ()
        self._stub = pb_grpc.NodeStub(self._channel)  # type: ignore[no-untyped-call]

    def describe(self) -> NodeDescription:
        """Ask for the node's public metadata and this consumer's budget."""
        response = self._call(self._stub.Describe, pb.DescribeRequest())
        return wire.description_from_proto(response)

    def analyze(self, request: wire.AnalyzeRequest) -> Release:
        """Ask for one DP release."""
        response = self._call(self._stub.Analyze, wire.analyze_request_to_proto(request))
        return wire.release_from_proto(response)

    def _call(self, method: Callable[..., Resp], request: Req) -> Resp:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            call = cast(grpc.Call, err)
            raise error_from_status(call.code(), call.details() or "", node=self.name) from None

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __repr__(self) -> str:
        """Show name and address."""
        return f"NodeClient({self.name!r}, {self.address!r})"
