"""The standard gRPC health service, admitted before it reads a request like every other call.

``grpc_health``'s servicer keeps the statuses; this module serves its methods as client
streams (``nodes._unary``) behind :meth:`nodes.guard.Guard.admit_health`: any valid,
non-revoked certificate of the federation may ask (no policy entry needed), at most
:data:`~nodes.limits.HEALTH_MAX_CONCURRENT` calls at once per certificate and
:func:`~nodes.limits.health_total_limit` at once on the node, each for at most
``min(HEALTH_CALL_S, max_request_s)`` (10 s by default) and with ``max_request_read_s`` to
deliver its request. ``Check`` answers at once. A ``Watch`` stream therefore ends
(``CANCELLED``) after those 10 s, status change or not: clients watch again, as gRPC's
health clients do whenever a stream ends, or poll with ``Check``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from federation.errors import FederationError, refusal_metadata, status_for
from nodes._unary import CallEndedError, CapturedHandlers, read_single
from nodes.guard import Guard

__all__ = ["add_health_service"]

log = logging.getLogger(__name__)


def add_health_service(
    servicer: health.HealthServicer, server: grpc.Server, *, guard: Guard
) -> None:
    """Register ``servicer``'s methods on ``server``, each admitted before it reads.

    The generated registration is captured, so every method the installed ``grpc_health``
    defines is served this way (``Check`` and ``List`` as client streams, ``Watch`` as a
    bidirectional stream), with its generated (de)serializers.
    """
    captured = CapturedHandlers()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, captured)
    admitted = _AdmittedHealth(guard)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method, handler in captured.handlers.items():
        parse = handler.request_deserializer
        if handler.unary_unary is not None and parse is not None:
            handlers[method] = grpc.stream_unary_rpc_method_handler(
                admitted.unary(method, handler.unary_unary, parse),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None and parse is not None:
            handlers[method] = grpc.stream_stream_rpc_method_handler(
                admitted.stream(method, handler.unary_stream, parse),
                response_serializer=handler.response_serializer,
            )
        else:
            raise RuntimeError(f"health method {method!r} has no unary request to admit")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers),)
    )
    # grpc-stubs predates registered methods (grpcio >= 1.62), which skip generic lookup.
    server.add_registered_method_handlers(health.SERVICE_NAME, handlers)  # type: ignore[attr-defined]


_UnaryBehavior = Callable[[Any, grpc.ServicerContext], Any]
_StreamBehavior = Callable[[Any, grpc.ServicerContext], Iterator[Any]]


class _AdmittedHealth:
    """Wrap health methods: admit the caller, read its one request, then delegate."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def unary(
        self, method: str, behavior: _UnaryBehavior, parse: Callable[[bytes], Any]
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Any]:
        """Serve a unary health method (``Check``) as a client stream."""

        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            try:
                with self._admitted(method, requests, parse, context) as request:
                    return behavior(request, context)
            except FederationError as err:
                _refuse(method, err, context)
            except (grpc.RpcError, CallEndedError):
                _ended(method, context)

        return handle

    def stream(
        self, method: str, behavior: _StreamBehavior, parse: Callable[[bytes], Any]
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[Any]]:
        """Serve a server-streaming health method (``Watch``) as a bidirectional stream."""

        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                with self._admitted(method, requests, parse, context) as request:
                    # Called without a response callback, grpc_health's Watch returns a
                    # blocking iterator, which ends when the call does (deadline included).
                    yield from behavior(request, context)
            except FederationError as err:
                _refuse(method, err, context)
            except (grpc.RpcError, CallEndedError):
                _ended(method, context)

        return handle

    @contextmanager
    def _admitted(
        self,
        method: str,
        requests: Iterator[bytes],
        parse: Callable[[bytes], Any],
        context: grpc.ServicerContext,
    ) -> Iterator[Any]:
        with self.guard.admit_health(context) as admission:
            with self.guard.read_deadline(context, "health", admission.caller) as read:
                request = read_single(
                    requests,
                    parse,
                    method=f"{health.SERVICE_NAME}/{method}",
                    call_ended=lambda: (
                        read.expired or admission.deadline.expired or not context.is_active()
                    ),
                )
            if read.fired:  # arrived as the read deadline cancelled the call
                raise CallEndedError(method)
            yield request


def _refuse(method: str, err: FederationError, context: grpc.ServicerContext) -> NoReturn:
    code = status_for(err)
    log.warning("refused health %s: %s (%s)", method, err, code.name)
    context.set_trailing_metadata(refusal_metadata(err))
    context.abort(code, str(err))


def _ended(method: str, context: grpc.ServicerContext) -> NoReturn:
    log.info("health %s ended before its request arrived (cancelled or timed out)", method)
    context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request arrived")
