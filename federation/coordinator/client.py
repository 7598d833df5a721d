"""One node, seen from the coordinator: a gRPC channel and typed calls.

Errors come back as the exception classes of ``federation.errors`` (a notebook user catches
``BudgetExhaustedError``, not ``grpc.RpcError``). With an ``Identity`` the channel is mutual
TLS and the node's certificate must be valid for the node's *name* (not just its address).

A ``NodeBusyError`` on Describe or Analyze is retried (``busy_retries`` times, waits of about
0.2, 0.6, 1.8 s, while a fifth of the call's ``timeout_s`` is left after the wait): a node
refuses a busy call before it reads or charges anything, so the retry cannot spend twice,
and a query that other nodes have already answered (and been charged for) is not thrown
away over a moment's load.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar, cast

import grpc
import numpy as np
import numpy.typing as npt

from federation import pki, wire
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.config import RECEIVE_WINDOW_MIB, whole_number_in
from federation.coordinator._diagnose import error_for_status
from federation.errors import (
    REFUSAL_KEY,
    FederationError,
    InvalidRequestError,
    NodeBusyError,
    NodeInternalError,
)
from federation.releases import NodeDescription, Release

__all__ = ["CONSUMER_HEADER", "RECEIVE_WINDOW_BYTES", "CallGroup", "ChunkSink", "NodeClient"]

CONSUMER_HEADER = "x-federation-consumer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# How far (bytes) each node's stream may run ahead of what the coordinator has read: a
# fixed HTTP/2 receive window instead of gRPC's adaptive one. The adaptive window grows with
# the measured link (BDP probing) and, when nodes send faster than a busy coordinator reads,
# lets gRPC hold many model-sized chunks that nobody has read yet; see the README's
# "Training benchmarks" for what that did to the coordinator's memory at 8 nodes.
RECEIVE_WINDOW_BYTES = RECEIVE_WINDOW_MIB * 1024 * 1024
_MIN_WINDOW_BYTES = 2 * wire.CHUNK_BYTES  # a chunk's message is a bit over one chunk
_MAX_WINDOW_BYTES = 2**31 - 1  # HTTP/2's largest window
BUSY_RETRIES = 3
BUSY_BACKOFF_S = 0.2  # the first wait before retrying a busy node; each next one is 3x
# A retry is made only with at least this much of the call's time left after the wait
# (max of the two): one started with milliseconds to go would end DEADLINE_EXCEEDED, losing
# the "busy" answer, perhaps after the node had charged for a reply nobody received.
RETRY_MIN_LEFT_S = 0.5
RETRY_MIN_LEFT_FRACTION = 0.2

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

ChunkSink = Callable[[str, int, npt.NDArray[np.float32]], None]
"""Takes one checked chunk of a model update: tensor name, element offset, float32 values."""


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
        busy_retries: int = BUSY_RETRIES,
        receive_window_bytes: int | None = RECEIVE_WINDOW_BYTES,
    ) -> None:
        """Open a channel to ``address``.

        Args:
            name: the node's name; with TLS its certificate must carry it.
            address: ``host:port``.
            identity: the consumer's TLS identity; None for a plaintext (loopback) node.
            consumer: the consumer name sent in a header to a plaintext node.
            timeout_s: deadline of each call, retries included.
            busy_retries: how often Describe and Analyze retry a ``NodeBusyError``
                (0: never; see the module docstring).
            receive_window_bytes: how far the node's update stream may run ahead of what
                this client has read, so about the most of it held here unread. It also
                caps the node's upload at about this much per round trip: the default
                16 MiB allows ~0.9 Gbit/s at 150 ms. Raise it for long, fast links. None:
                gRPC's adaptive window, which grows with the link and has no fixed bound.

        Raises:
            InvalidRequestError: ``busy_retries`` is negative, or ``receive_window_bytes``
                is neither None nor a whole number of bytes from two chunks
                (``2 * wire.CHUNK_BYTES``) to 2**31 - 1.
        """
        if busy_retries < 0:
            raise InvalidRequestError(f"busy_retries must be >= 0; got {busy_retries}")
        if receive_window_bytes is not None and not whole_number_in(
            receive_window_bytes, _MIN_WINDOW_BYTES, _MAX_WINDOW_BYTES
        ):
            raise InvalidRequestError(
                f"receive_window_bytes must be None or {_MIN_WINDOW_BYTES}-{_MAX_WINDOW_BYTES}; "
                f"got {receive_window_bytes!r}"
            )
        self.name = name
        self.address = address
        self._identity = identity
        self.timeout_s = timeout_s
        self.busy_retries = busy_retries
        self.receive_window_bytes = receive_window_bytes
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if receive_window_bytes is not None:
            # Without BDP probing the window stays at lookahead_bytes (a message longer than
            # it still arrives: gRPC widens the window for a message being read).
            options += [
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", receive_window_bytes),
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
        self._train: grpc.StreamStreamMultiCallable[bytes, bytes] = self._channel.stream_stream(
            wire.TRAIN_METHOD, request_serializer=None, response_deserializer=None
        )

    def describe(self) -> NodeDescription:
        """Ask for the node's public metadata and this consumer's budget."""
        response = self._call(self._stub.Describe, pb.DescribeRequest())
        return wire.description_from_proto(response)

    def analyze(self, request: wire.AnalyzeRequest) -> Release:
        """Ask for one DP release."""
        response = self._call(self._stub.Analyze, wire.analyze_request_to_proto(request))
        return wire.release_from_proto(response)

    def train(
        self,
        config: wire.TrainConfig,
        weights: Mapping[str, npt.NDArray[np.float32]],
        *,
        on_result: Callable[[wire.TrainResult], ChunkSink],
        timeout_s: float | None = None,
        chunk_bytes: int = wire.CHUNK_BYTES,
        group: CallGroup | None = None,
    ) -> wire.TrainResult:
        """Run one training round at the node: stream ``weights`` out, the update back.

        The update is never held whole here: once the node's result arrives (after its
        charge is durable), ``on_result(result)`` returns a sink, and each chunk of the
        update goes to it as it arrives, checked (declared layout equal to ``weights``',
        offsets contiguous, values finite). A sink may raise to abandon the round.

        Args:
            config: the round.
            weights: the global weights (float32), streamed in ``chunk_bytes`` chunks.
            on_result: called once with the result; returns the sink for the update.
            timeout_s: deadline of the whole exchange (default: this client's timeout).
            chunk_bytes: payload per chunk sent.
            group: the round's calls; ``group.cancel()`` (from another thread) ends this
                one at once, as a Ctrl-C in the coordinator must.

        Raises:
            BudgetExhaustedError, InvalidRequestError, PolicyError, NodeUnavailableError:
                the node refused or could not be reached in time.
            NodeBusyError: the node was training another round until shortly before
                ``timeout_s``; nothing was charged.
            NodeInternalError: the node failed, or its update stream broke the rules.
        """
        headers = wire.tensor_headers(weights)
        frames = wire.train_request_frames(config, weights, chunk_bytes=chunk_bytes)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # Raw bytes both ways (no protobuf (de)serializer): federation.wire writes and reads
        # the stream's messages itself, so the chunks of a big model skip protobuf's copies.
        responses = self._train(frames, timeout=timeout, metadata=self._metadata)
        if group is not None:
            group.add(responses)
        try:
            return self._read_update(cast(Iterator[bytes], responses), headers, on_result)
        except grpc.RpcError as err:
            call = cast(grpc.Call, err)
            error = self._status_error(call)
            hint = _round_hint(call.code(), call.details() or "", timeout)
            if hint:
                error.args = (f"{error}{hint}",)
            raise error from None
        finally:
            responses.cancel()  # type: ignore[no-untyped-call]  # a no-op once finished
            if group is not None:
                group.discard(responses)

    def _read_update(
        self,
        responses: Iterator[bytes],
        headers: tuple[wire.TensorHeader, ...],
        on_result: Callable[[wire.TrainResult], ChunkSink],
    ) -> wire.TrainResult:
        try:
            first = next(responses, None)
            opening = wire.parse_train_response(first) if first is not None else None
            if not isinstance(opening, tuple):
                raise InvalidRequestError("the stream did not start with a result")
            result, update_headers = opening
            if update_headers != headers:
                raise InvalidRequestError("its layout differs from the global weights sent")
            reader = wire.TensorReader(update_headers, require_finite=True)
            sink = on_result(result)
            for frame in responses:
                chunk = wire.parse_train_response(frame)
                if not isinstance(chunk, wire.ChunkView):
                    raise InvalidRequestError("a second result came after the first")
                sink(*reader.read(chunk))
            reader.finish()
        except InvalidRequestError as err:
            raise NodeInternalError(f"node {self.name!r} sent a malformed update: {err}") from err
        return result

    def _call(self, method: Callable[..., Resp], request: Req) -> Resp:
        deadline = time.monotonic() + self.timeout_s
        min_left = max(RETRY_MIN_LEFT_S, RETRY_MIN_LEFT_FRACTION * self.timeout_s)
        attempt = 0
        while True:
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error = self._status_error(cast(grpc.Call, err))
            wait = BUSY_BACKOFF_S * 3**attempt * random.uniform(0.75, 1.25)  # noqa: S311 - jitter
            if (
                not isinstance(error, NodeBusyError)
                or attempt >= self.busy_retries
                or deadline - (time.monotonic() + wait) < min_left
            ):
                raise error
            attempt += 1
            log.info(
                "node %s is busy; retry %d of %d in %.2fs",
                self.name,
                attempt,
                self.busy_retries,
                wait,
            )
            time.sleep(wait)

    def _status_error(self, call: grpc.Call) -> FederationError:
        """The exception for a failed call; names the problem when a TLS handshake failed."""
        return error_for_status(
            call.code(),
            call.details() or "",
            node=self.name,
            address=self.address,
            identity=self._identity,
            refusal=_refusal(call),
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __repr__(self) -> str:
        """Show name and address."""
        return f"NodeClient({self.name!r}, {self.address!r})"


def _refusal(call: grpc.Call) -> str:
    """The call's ``federation-refusal`` trailing metadata, or "" (see federation.errors)."""
    for key, value in call.trailing_metadata() or ():
        if key == REFUSAL_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class CallGroup:
    """The calls of one training round, so that the coordinator can end them all at once.

    A worker thread blocked reading a node's update wakes with CANCELLED when its call is
    cancelled; without that, an interrupted coordinator would wait for every node's
    round (up to the round's deadline) before it could stop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[_Cancellable] = set()
        self._cancelled = False

    def add(self, call: _Cancellable) -> None:
        """Track ``call``; cancel it at once if the group already was."""
        with self._lock:
            if not self._cancelled:
                self._calls.add(call)
                return
        call.cancel()

    def discard(self, call: _Cancellable) -> None:
        """Stop tracking a finished call."""
        with self._lock:
            self._calls.discard(call)

    def cancel(self) -> None:
        """Cancel every call in flight, and any added later."""
        with self._lock:
            self._cancelled = True
            calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


def _round_hint(code: grpc.StatusCode, details: str, timeout_s: float) -> str:
    """What to change when a training round ran out of time (at either end)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"; the round took longer than its deadline of {timeout_s:g}s: raise "
            "--round-timeout (round_timeout_s)"
        )
    dropped = code == grpc.StatusCode.CANCELLED or (
        code == grpc.StatusCode.UNAVAILABLE and "Stream removed" in details
    )
    if dropped:  # the call was under way, then ended (not a node that was never reached)
        return (
            "; if the node's log says the round was 'still running after ...s "
            "(max_request_s)', the node cancelled it: its operator can raise max_request_s "
            "above the round's time"
        )
    return ""
