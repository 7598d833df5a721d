"""The gRPC servicer: a thin shell that runs DESIGN.md's pipeline for each request.

identify caller -> authorize -> validate (plan) -> charge (durable) -> compute -> respond.
Each step is a plain function on plain values; only this module knows status codes.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc
import numpy as np

import federation
from federation import wire
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.errors import FederationError, InvalidRequestError, status_for
from federation.releases import NodeDescription, Receipt, Release
from nodes.analytics import DatasetEngine, Plan, plan_query
from nodes.config import NodeConfig
from nodes.guard import Guard
from nodes.ledger import Ledger

__all__ = ["NodeService", "RngFactory"]

log = logging.getLogger(__name__)

T = TypeVar("T")
RngFactory = Callable[[], np.random.Generator]


def system_rng() -> np.random.Generator:
    """A fresh generator seeded from the OS CSPRNG for each release."""
    return np.random.default_rng(secrets.randbits(128))


class NodeService(pb_grpc.NodeServicer):
    """Serves Describe and Analyze for one node."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        engines: dict[str, DatasetEngine],
        ledger: Ledger,
        guard: Guard,
        rng: RngFactory = system_rng,
    ) -> None:
        """Wire the pipeline's parts together."""
        self.config = config
        self.engines = engines
        self.ledger = ledger
        self.guard = guard
        self.rng = rng

    # ---------------------------------------------------------------- handlers

    def Describe(  # noqa: N802 - gRPC method names
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        """Return public metadata and the caller's budget."""
        return self._run(context, "describe", lambda: self._describe(context))

    def Analyze(  # noqa: N802 - gRPC method names
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> pb.AnalyzeResponse:
        """Validate, charge, compute and release one DP statistic."""
        return self._run(context, "analyze", lambda: self._analyze(request, context))

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
        )
        return wire.description_to_proto(description)

    def _analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
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
        plan = plan_query(analyze, schema=engine.table.schema, policy=policy)
        record = self.ledger.charge(
            plan.charge, policy=policy, operation="analyze", details=_details(plan)
        )
        groups = engine.execute(plan, rng=self.rng())
        release = Release(
            groups=groups,
            bin_labels=plan.bin_labels,
            bin_edges=plan.bin_edges,
            cost_epsilon=plan.charge.epsilon,
            cost_delta=plan.charge.delta,
            budget=record.budget,
            receipt=Receipt(
                id=record.id,
                node_name=self.config.name,
                consumer=consumer,
                issued_at=record.created_at,
            ),
        )
        return wire.release_to_proto(release)

    def _run(self, context: grpc.ServicerContext, operation: str, step: Callable[[], T]) -> T:
        """Run one request; map errors to status codes (the only catch-all in the node)."""
        try:
            return step()
        except FederationError as err:
            code = status_for(err)
            log.warning("refused %s: %s (%s)", operation, err, code.name)
            context.abort(code, str(err))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (incident %s)", operation, incident)
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error on node {self.config.name!r}; the operator's log has "
                f"incident {incident}",
            )
        raise AssertionError("unreachable: context.abort raises")


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
