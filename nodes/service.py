"""The gRPC servicer: a thin shell that runs DESIGN.md's pipeline for each request.

identify caller -> authorize -> read -> validate (plan) -> charge (durable) -> compute ->
respond. The request is read only once its caller is admitted (``nodes._unary``). Each step
is a plain function on plain values; only this module knows status codes.
``Train`` is the same pipeline over a bidirectional stream (steps in ``nodes.rounds``).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import NoReturn, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

import federation
from federation import receipts, wire
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.architectures import EXTENDED_REGISTRY
from federation.errors import (
    FederationError,
    InvalidRequestError,
    NodeBusyError,
    NodeUnavailableError,
    refusal_metadata,
    status_for,
)
from federation.models import ModelBuilder
from federation.privacy import RandomSource
from federation.releases import NodeDescription, Release
from federation.schema import refuse_changed_schema
from nodes import rounds
from nodes._unary import CallEndedError, CapturedHandlers, read_single
from nodes.analytics import DatasetEngine, Plan, plan_query
from nodes.cohort import suppress_small_cohorts
from nodes.config import NodeConfig
from nodes.guard import Admission, Guard
from nodes.ledger import Ledger
from nodes.noise import KEY_BYTES, CryptoRandom
from nodes.training import TrainingEngine

__all__ = ["NodeService", "RngFactory", "add_node_service"]

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")
RngFactory = Callable[[], RandomSource]


def system_rng() -> RandomSource:
    """A fresh AES-128-CTR generator keyed from the OS CSPRNG for each release."""
    return CryptoRandom(secrets.token_bytes(KEY_BYTES))


def system_noise_key() -> bytes:
    """A fresh AES-128 key for one training round's gradient noise, from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


class NodeService(pb_grpc.NodeServicer):
    """Serves Describe, Analyze and Train for one node."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        engines: dict[str, DatasetEngine],
        ledger: Ledger,
        guard: Guard,
        rng: RngFactory = system_rng,
        noise_keys: Callable[[], bytes] = system_noise_key,
        trainers: Mapping[str, TrainingEngine] | None = None,
        registry: Mapping[str, ModelBuilder] = EXTENDED_REGISTRY,
        max_concurrent_trainings: int = 1,
    ) -> None:
        """Wire the pipeline's parts together.

        ``rng`` makes each request's generator (sampling, integer noise) and ``noise_keys``
        each training round's gradient-noise key; tests inject seeded ones to reproduce.

        ``trainers`` (dataset -> DP-SGD engine) serve ``Train``; ``registry`` lists the
        architectures the node builds (a consumer's policy still has to allow each);
        ``max_concurrent_trainings`` bounds the models held in memory at once.
        """
        self.config = config
        self.engines = engines
        self.ledger = ledger
        self.guard = guard
        self.rng = rng
        self.noise_keys = noise_keys
        self.trainers = dict(trainers or {})
        self.registry = registry
        self._max_trainings = max_concurrent_trainings
        self._spare = rounds.SpareBuffers()
        self._train_slots = threading.BoundedSemaphore(max_concurrent_trainings)

    def close(self) -> None:
        """Release what the service keeps between requests (the spare round buffers)."""
        self._spare.close()

    # ---------------------------------------------------------------- handlers

    def Describe(  # noqa: N802 - gRPC method names
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        """Return public metadata and the caller's budget.

        Served as a client stream of one raw message (see ``add_node_service``), so the
        caller is admitted before its request is read.
        """
        return self._run(
            context,
            "describe",
            lambda request, admission: self._describe(context),
            requests=requests,
            parse=pb.DescribeRequest.FromString,
        )

    def Analyze(  # noqa: N802 - gRPC method names
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.AnalyzeResponse:
        """Validate, charge, compute and release one DP statistic.

        Served as a client stream of one raw message (see ``add_node_service``), so the
        caller is admitted before its request is read.
        """
        return self._run(
            context,
            "analyze",
            lambda request, admission: self._analyze(request, context, admission),
            requests=requests,
            parse=pb.AnalyzeRequest.FromString,
        )

    def Train(  # noqa: N802 - gRPC method names
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Validate, charge and run one DP-SGD round; stream the DP update back.

        Served on raw bytes (see ``add_node_service``): ``federation.wire`` parses and
        writes the stream's messages, so chunks skip protobuf's copies.
        """
        return self._run_stream(
            context, "train", lambda admission: self._train(request_iterator, context, admission)
        )

    # ---------------------------------------------------------------- pipeline

    def _describe(self, context: grpc.ServicerContext) -> pb.DescribeResponse:
        consumer = self.guard.identify(context)
        policy = self.guard.authorize(consumer, "describe")
        description = NodeDescription(
            node_name=self.config.name,
            jurisdiction=self.config.jurisdiction,
            software_version=federation.__version__,
            datasets=tuple(d.schema for d in self.config.datasets),
            consumer=consumer,
            budget=self.ledger.status(policy),
            allowed_operations=tuple(sorted(policy.operations)),
            receipt_key_pem=self.ledger.audit.signer.verification_pem,
            receipt_key_id=self.ledger.audit.signer.key_id,
        )
        return wire.description_to_proto(description)

    def _analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext, admission: Admission
    ) -> pb.AnalyzeResponse:
        consumer = self.guard.identify(context)
        policy = self.guard.authorize(consumer, "analyze")
        analyze = wire.analyze_request_from_proto(request)
        engine = self.engines.get(analyze.query.dataset)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise InvalidRequestError(
                f"node {self.config.name!r} has no dataset {analyze.query.dataset!r}; "
                f"it has: {known}"
            )
        refuse_changed_schema(engine.table.schema, analyze.schema_sha256, node=self.config.name)
        plan = plan_query(analyze, schema=engine.table.schema, policy=policy)
        record = self.ledger.charge(
            plan.charge,
            policy=policy,
            operation="analyze",
            details=_details(plan),
            abandoned=lambda: admission.deadline.expired or not context.is_active(),
        )
        groups = suppress_small_cohorts(
            engine.execute(plan, rng=self.rng()),
            query=analyze.query,
            min_cohort=policy.min_cohort,
        )
        payload = receipts.analyze_payload(
            groups, bin_labels=plan.bin_labels, bin_edges=plan.bin_edges
        )
        # Audit, then send: if the release entry cannot be written, nothing is released.
        receipt = self.ledger.record_release(
            record, payload_sha256=receipts.payload_sha256(payload)
        )
        release = Release(
            groups=groups,
            bin_labels=plan.bin_labels,
            bin_edges=plan.bin_edges,
            cost_epsilon=plan.charge.epsilon,
            cost_delta=plan.charge.delta,
            budget=record.budget,
            receipt=receipt,
        )
        return wire.release_to_proto(release)

    def _train(
        self, frames: Iterator[bytes], context: grpc.ServicerContext, admission: Admission
    ) -> Iterator[bytes]:
        consumer, policy = admission.consumer, admission.policy
        # The opening message (config and layout) is small: it must arrive within the read
        # limit, like a unary request; the weights that follow stream under max_request_s.
        with self.guard.read_deadline(context, "train", consumer) as read:
            first = next(frames, None)
        if read.fired:
            log.warning("train ended before its opening message arrived (read deadline)")
            return
        opening = wire.parse_train_request(first) if first is not None else None
        if not isinstance(opening, tuple):
            raise InvalidRequestError("a Train stream must start with a TrainConfig message")
        config, headers = opening
        trainer = self.trainers.get(config.spec.dataset)
        if trainer is None:
            known = ", ".join(sorted(self.trainers)) or "none"
            raise InvalidRequestError(
                f"node {self.config.name!r} trains on no dataset {config.spec.dataset!r}; "
                f"it trains on: {known}"
            )
        refuse_changed_schema(trainer.table.schema, config.schema_sha256, node=self.config.name)
        plan = rounds.plan_round(
            config, schema=trainer.table.schema, policy=policy, registry=self.registry
        )
        rounds.check_layout(plan, headers)  # before a byte of weights is read
        rounds.check_job(plan, self.ledger.job_record(policy.name, plan.job_id), policy)
        rounds.check_affordable(plan, spend=self.ledger.spend(policy.name), policy=policy)
        slot = self._wait_for_training_slot(context, admission)
        if slot is None:
            # Cancelled, or past a deadline, while it waited: nobody is left to answer, and
            # the slot goes to whoever is still waiting.
            log.warning(
                "train job %s round %d for %r ended while waiting for the training slot; "
                "nothing was charged",
                plan.job_id,
                plan.round,
                consumer,
            )
            return
        if not slot:
            raise NodeBusyError(
                f"node {self.config.name!r} is busy training (limit "
                f"{self._max_trainings} at once); nothing was charged: retry"
            )
        try:
            # The last round's buffers, if the layout matches: taken, so a round that fails
            # from here on never gives them (or its own) back half-written.
            into = self._spare.take(headers)
            log.info(
                "train job %s round %d for %r: training slot taken, receiving %d bytes into %s",
                plan.job_id,
                plan.round,
                consumer,
                sum(h.total_bytes for h in headers),
                "new buffers" if into is None else "the last round's buffers",
            )
            started = time.monotonic()
            weights = self._receive_weights(
                frames, headers, into, context=context, consumer=consumer
            )
            received = time.monotonic()
            if admission.deadline.expired or not context.is_active():
                # Cut off as the last chunk arrived: nobody would receive the update, so
                # nothing is charged for it (a caller still listening hears UNAVAILABLE).
                raise NodeUnavailableError(
                    f"train job {plan.job_id} round {plan.round}: the call ended or ran past "
                    "its deadline while the weights arrived; nothing was charged"
                )
            # An architecture that cannot train, or computes another function than the
            # coordinator's build of it: refused, uncharged.
            trainer.preflight(plan, weights, probe_logits=config.probe_logits)
            record = self.ledger.charge(
                plan.charge,
                policy=policy,
                operation="train",
                details=rounds.round_details(plan),
                abandoned=lambda: admission.deadline.expired or not context.is_active(),
                # Again under the write lock: a second stream of the same job that passed
                # the first check while this one's weights arrived must not get through.
                recheck=lambda: rounds.check_job(
                    plan, self.ledger.job_record(policy.name, plan.job_id), policy
                ),
            )
            # The received buffers are ours: train in them, release them (no model copy).
            update = trainer.train(
                plan, weights, rng=self.rng(), noise_key=self.noise_keys(), in_place=True
            )
            del weights
            trained = time.monotonic()
            result = rounds.round_result(
                plan,
                update,
                record,
                node_name=self.config.name,
                tensor_digest=config.tensor_digest,
                job_epsilon=self.ledger.job_spend(policy.name, plan.job_id).epsilon_at(plan.delta),
            )
            payload = rounds.round_payload(plan, result, update)
            # Audit, then send: if the release entry cannot be written, nothing is released.
            receipt = self.ledger.record_release(
                record, payload_sha256=receipts.payload_sha256(payload)
            )
            yield from wire.train_response_frames(
                dataclasses.replace(result, receipt=receipt), update.weights
            )
            # Every frame has been handed to gRPC (copied): the next round may reuse them.
            self._spare.give(update.weights)
            log.info(
                "train job %s round %d for %r: received %.2fs, trained %.2fs, released %.2fs",
                plan.job_id,
                plan.round,
                consumer,
                received - started,
                trained - received,
                time.monotonic() - trained,
            )
        finally:
            self._train_slots.release()

    def _receive_weights(
        self,
        frames: Iterator[bytes],
        headers: tuple[wire.TensorHeader, ...],
        into: dict[str, npt.NDArray[np.float32]] | None,
        *,
        context: grpc.ServicerContext,
        consumer: str,
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Read the global weights (into ``into``, if given); refuse NaN/Inf as chunks arrive.

        Each message must arrive within the read limit (``max_request_read_s``): the call
        holds a training slot every consumer shares, and a caller that withheld its weights
        held it for all of ``max_request_s`` (found by review). Then the caller must end
        its stream: anything after the declared weights is refused, not ignored.

        Raises:
            InvalidRequestError: a malformed or short stream, or one that goes on.
            NodeUnavailableError: a message did not arrive within the read limit (the
                call is cancelled; nothing is charged).
        """
        assembler = wire.TensorAssembler(headers, require_finite=True, into=into)
        while not assembler.is_complete:
            frame = self._next_frame(frames, context, consumer)
            if frame is None:
                break  # finish() names the short tensor
            chunk = wire.parse_train_request(frame)
            if not isinstance(chunk, wire.ChunkView):
                raise InvalidRequestError(
                    "after its TrainConfig, a Train stream carries only tensor chunks"
                )
            assembler.add(chunk)
        weights = assembler.finish()
        if self._next_frame(frames, context, consumer) is not None:
            raise InvalidRequestError(
                "a Train stream ends after its declared weights; this one went on (an extra "
                "chunk, tensor or message); nothing was charged"
            )
        return weights

    def _next_frame(
        self, frames: Iterator[bytes], context: grpc.ServicerContext, consumer: str
    ) -> bytes | None:
        """The stream's next message (None at its end), within the read limit."""
        with self.guard.read_deadline(context, "train", consumer) as read:
            frame = next(frames, None)
        if read.fired:
            raise NodeUnavailableError(
                f"train: no message within {self.config.max_request_read_s:g}s while the "
                "weights arrived; the call was cancelled and nothing was charged"
            )
        return frame

    def _wait_for_training_slot(
        self, context: grpc.ServicerContext, admission: Admission
    ) -> bool | None:
        """Take a training slot: True, or False after :func:`_slot_wait_s` (busy).

        None, without the slot, if the call ends (cancelled, or past its deadline or the
        node's) while it waits: a caller that gave up neither keeps a worker thread for the
        rest of the wait nor takes the slot ahead of one still waiting.
        """
        if self._train_slots.acquire(blocking=False):
            return True
        log.info("a train call is waiting for the training slot (limit %d)", self._max_trainings)
        until = time.monotonic() + _slot_wait_s(context, admission)
        while True:
            left = until - time.monotonic()
            if self._train_slots.acquire(timeout=max(0.0, min(left, _SLOT_POLL_S))):
                return True
            if admission.deadline.expired or not context.is_active():
                return None
            if left <= _SLOT_POLL_S:
                return False

    def _run_stream(
        self,
        context: grpc.ServicerContext,
        operation: str,
        step: Callable[[Admission], Iterator[T]],
    ) -> Iterator[T]:
        """Run one streaming request; map errors to status codes like ``_run``."""
        try:
            # The admission's deadline (max_request_s) also cuts off a caller that stalls
            # mid-stream, whatever deadline it chose itself.
            with self.guard.admit(context, operation) as admission:
                yield from step(admission)
        except FederationError as err:
            self._refuse(context, operation, err)
        except grpc.RpcError:
            # Reading the request stream failed: the caller cancelled or its deadline (or
            # our idle cutoff) passed. There is nobody left to answer.
            log.warning("%s stream cancelled by the caller or timed out", operation)
        except Exception:
            self._fail(context, operation)

    def _run(
        self,
        context: grpc.ServicerContext,
        operation: str,
        step: Callable[[M, Admission], T],
        *,
        requests: Iterator[bytes],
        parse: Callable[[bytes], M],
    ) -> T:
        """Admit, read and run one unary request; map errors to status codes.

        The only catch-all in the node.
        """
        try:
            # Admission first (identity, policy, concurrency slot, deadline), then the read:
            # a caller that withholds its request holds one of its own slots until the read
            # deadline, and a request refused here has touched nothing.
            with self.guard.admit(context, operation) as admission:
                request = self._read(context, operation, admission, requests, parse)
                if request is not None:
                    return step(request, admission)
        except FederationError as err:
            self._refuse(context, operation, err)
        except Exception:
            self._fail(context, operation)
        # The request never fully arrived: the caller went away, or a deadline cut it off.
        # Nothing was read, so nothing was charged; there is nobody left to answer. (Outside
        # the try: abort raises, and the catch-all must not take that for an internal error.)
        log.warning("%s ended before its request arrived (cancelled or timed out)", operation)
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request arrived")

    def _read(
        self,
        context: grpc.ServicerContext,
        operation: str,
        admission: Admission,
        requests: Iterator[bytes],
        parse: Callable[[bytes], M],
    ) -> M | None:
        """Read an admitted call's request within the read deadline; None if the call ended.

        Raises:
            InvalidRequestError: as :func:`~nodes._unary.read_single`.
        """
        with self.guard.read_deadline(context, operation, admission.consumer) as read:
            try:
                request = read_single(
                    requests,
                    parse,
                    method=operation.capitalize(),
                    call_ended=lambda: (
                        read.expired or admission.deadline.expired or not context.is_active()
                    ),
                )
            except (grpc.RpcError, CallEndedError):
                return None
        # Arrived just as the read deadline cancelled the call: nobody is left to answer.
        return None if read.fired else request

    def _refuse(
        self, context: grpc.ServicerContext, operation: str, err: FederationError
    ) -> NoReturn:
        """Log and audit a refusal, and end the call with its status code."""
        code = status_for(err)
        # Shortened: a reason can repeat a caller's strings (a 10 kB dataset name); in
        # full it flooded the log, and over 16 KiB gRPC itself turned the status into
        # RESOURCE_EXHAUSTED "metadata size exceeds hard limit" (found by review).
        message = _shortened(str(err))
        log.warning("refused %s: %s (%s)", operation, message, code.name)
        self._audit_refusal(context, operation, code, err)
        context.set_trailing_metadata(refusal_metadata(err))
        context.abort(code, message)

    def _fail(self, context: grpc.ServicerContext, operation: str) -> NoReturn:
        """Log the current exception under an incident id; end the call with INTERNAL."""
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (incident %s)", operation, incident)
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error on node {self.config.name!r}; the operator's log has "
            f"incident {incident}",
        )

    def _audit_refusal(
        self,
        context: grpc.ServicerContext,
        operation: str,
        code: grpc.StatusCode,
        err: FederationError,
    ) -> None:
        """Record a refusal in the audit chain (no cost); a failure to record is only logged."""
        if isinstance(err.__cause__, sqlite3.OperationalError):
            # The ledger itself was locked past its wait: recording would wait as long
            # again before the caller hears "busy". The operator's log keeps it.
            return
        try:
            consumer = self.guard.identify(context)
        except FederationError:
            consumer = ""  # unauthenticated: nobody to name
        try:
            self.ledger.record_refusal(
                consumer=consumer, operation=operation, code=code.name, reason=str(err)
            )
        except (sqlite3.Error, OSError):
            # The request is refused either way; the operator's log keeps the refusal.
            log.exception("could not record the refusal of %s in the audit chain", operation)


_STATUS_CHARS = 2000  # the longest refusal message sent or logged


def _shortened(message: str) -> str:
    """``message`` cut to about ``_STATUS_CHARS`` characters, keeping its start and end (a
    budget refusal ends with its ``remaining_epsilon=`` tag)."""
    if len(message) <= _STATUS_CHARS:
        return message
    return f"{message[:1400]} … [{len(message)} characters in all] … {message[-400:]}"


_SLOT_POLL_S = 0.1  # how often a Train call waiting for a slot checks that its caller is there
_BUSY_ANSWER_S = 1.0  # time left for a busy refusal to reach the caller before its deadline


def _slot_wait_s(context: grpc.ServicerContext, admission: Admission) -> float:
    """How long a Train call waits for a training slot.

    At most a minute, and at most half the time left before the caller's deadline and the
    node's own (``max_request_s``): a round that gets the slot late still has the other half
    to receive, train and send, rather than being charged and then cut off. It also ends
    ``_BUSY_ANSWER_S`` before those deadlines, so the caller hears "busy", not
    DEADLINE_EXCEEDED or CANCELLED.
    """
    caller = context.time_remaining()
    left = (
        admission.deadline.remaining_s
        if caller is None
        else min(caller, admission.deadline.remaining_s)
    )
    return max(0.0, min(left - _BUSY_ANSWER_S, left / 2, 60.0))


def _details(plan: Plan) -> dict[str, object]:
    """The public parameters of a request, recorded with its charge."""
    query = plan.request.query
    return {
        "query": type(query).__name__.lower(),
        "dataset": query.dataset,
        "column": getattr(query, "column", None),
        "group_by": query.group_by,
        "has_filter": query.where is not None,
        "bounds": list(plan.bounds) if plan.bounds else None,
        "epsilon": plan.request.epsilon,
        "delta": plan.request.delta,
        "mechanism": plan.request.mechanism.value,
    }


def add_node_service(service: NodeService, server: grpc.Server) -> None:
    """Register ``service`` on ``server``: every method admits its caller before reading.

    ``Describe`` and ``Analyze`` are served as client streams of one raw message (the bytes
    on the wire are the same as a unary call's), so admission runs before the request is
    read (see ``nodes._unary``); ``Train`` is served on raw bytes, which ``federation.wire``
    reads and writes itself so chunks skip protobuf's copies. The generated registration is
    captured rather than copied, so each method keeps its generated response serializer.

    Raises:
        RuntimeError: the proto gained a unary method that is not served as a stream yet.
    """
    captured = CapturedHandlers()
    pb_grpc.add_NodeServicer_to_server(service, captured)  # type: ignore[no-untyped-call]
    handlers = dict(captured.handlers)
    for method, behavior in (("Describe", service.Describe), ("Analyze", service.Analyze)):
        handlers[method] = grpc.stream_unary_rpc_method_handler(
            behavior, response_serializer=handlers[method].response_serializer
        )
    handlers["Train"] = grpc.stream_stream_rpc_method_handler(service.Train)
    unary = sorted(method for method, handler in handlers.items() if not handler.request_streaming)
    if unary:
        # gRPC would read their requests before any admission: a slow-loris opening.
        raise RuntimeError(f"serve {unary} as client streams in add_node_service")
    name = pb.DESCRIPTOR.services_by_name["Node"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    # grpc-stubs predates registered methods (grpcio >= 1.62), which skip generic lookup.
    server.add_registered_method_handlers(name, handlers)  # type: ignore[attr-defined]
