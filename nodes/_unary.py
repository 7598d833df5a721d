"""Unary gRPC methods served as client streams, so a caller is admitted before it is read.

gRPC Python's sync server reads a unary call's request message on a worker thread before
any handler code runs. A caller that opens calls and withholds (or trickles) the request
would hold worker threads without taking a concurrency slot or starting a deadline, and
enough such calls starve every other consumer. A client-streaming handler, by contrast, runs
as soon as the call's headers arrive, and the wire format of a unary call and of a
client-streaming call that sends one message is the same (headers, one length-prefixed
message, half-close). So a node registers its unary methods as client streams: the handler
admits the caller first (``nodes.guard``: identity, concurrency slot, ``max_request_s``
deadline) and only then reads the one message with :func:`read_single`, under the guard's
read deadline (``max_request_read_s``). A caller that withholds its request now holds one
of its own slots until that deadline cancels the call.
Clients and the ``.proto`` files do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from federation.errors import InvalidRequestError

__all__ = ["CallEndedError", "CapturedHandlers", "read_single"]

M = TypeVar("M")


class CallEndedError(Exception):
    """The call ended (client gone, or cut off at its deadline) before its request arrived.

    Internal to the node, deliberately outside ``federation.errors``: it is never sent to
    a caller (there is nobody left to answer), so it maps to no status code.
    """


class CapturedHandlers:
    """Stands in for a server to capture the generated code's method handlers."""

    def __init__(self) -> None:
        """Start with no handlers."""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignore: the registered handlers carry the same methods."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Keep the handlers."""
        self.handlers = dict(handlers)


def read_single(
    messages: Iterator[bytes],
    parse: Callable[[bytes], M],
    *,
    method: str,
    call_ended: Callable[[], bool],
) -> M:
    """Read and parse the one request message of a unary call served as a client stream.

    Call it only once the caller is admitted: it blocks until the message and the client's
    half-close arrive, or the call is cancelled.

    Args:
        messages: the call's request iterator (raw bytes).
        parse: the generated ``FromString`` of the request message.
        method: the method's name, for error messages.
        call_ended: whether the call has already ended (cancelled by its client or cut off
            at its deadline); tells an empty stream from a closed call.

    Returns:
        The parsed request.

    Raises:
        grpc.RpcError: the call was cancelled while its request was being read.
        CallEndedError: the stream closed without a message because the call ended.
        InvalidRequestError: no message, more than one, or one that does not parse.
    """
    first = next(messages, None)
    if first is None:
        if call_ended():
            raise CallEndedError(method)
        raise InvalidRequestError(
            f"{method} takes exactly one request message; this call sent none"
        )
    if next(messages, None) is not None:
        raise InvalidRequestError(
            f"{method} takes exactly one request message; this call sent more than one"
        )
    try:
        return parse(first)
    except DecodeError as err:
        raise InvalidRequestError(
            f"{method}: the request message ({len(first)} bytes) does not parse: {err}"
        ) from err
