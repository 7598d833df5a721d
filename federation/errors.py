"""The exception tree that node and coordinator share, and its gRPC status mapping.

::

    FederationError
    ├── ConfigError                          bad config; raised at startup, never mid-request
    ├── InvalidRequestError (also ValueError) → INVALID_ARGUMENT
    ├── UnauthenticatedError                 → UNAUTHENTICATED
    ├── PolicyError                          → PERMISSION_DENIED
    ├── BudgetExhaustedError                 → RESOURCE_EXHAUSTED, marked budget (with ε left)
    ├── NodeBusyError                        → RESOURCE_EXHAUSTED, marked busy (see below)
    ├── SchemaMismatchError                  → FAILED_PRECONDITION
    ├── NodeUnavailableError                 ← UNAVAILABLE, DEADLINE_EXCEEDED
    └── NodeInternalError                    ← INTERNAL, UNKNOWN and anything unmapped

A node aborts with ``status_for(err)``; the client turns the status back into the same
class with ``error_from_status``, so a notebook user catches ``BudgetExhaustedError``,
never ``grpc.RpcError``.

Two refusals share ``RESOURCE_EXHAUSTED``, as gRPC's status guide has it ("some resource has
been exhausted, perhaps a per-user quota"): a privacy budget that is spent (final, until the
operator grants more) and a node at its concurrency limit (retry in a moment). gRPC itself
also answers ``RESOURCE_EXHAUSTED`` for a message over a size limit. A node therefore marks
its own refusals with the trailing metadata ``federation-refusal: budget`` or ``busy``
(``refusal_metadata``); a client passes that value to ``error_from_status``, and an unmarked
``RESOURCE_EXHAUSTED`` becomes an ``InvalidRequestError`` that says it was no budget.
"""

from __future__ import annotations

import math

import grpc

__all__ = [
    "REFUSAL_KEY",
    "BudgetExhaustedError",
    "ConfigError",
    "FederationError",
    "InvalidRequestError",
    "NodeBusyError",
    "NodeInternalError",
    "NodeUnavailableError",
    "PolicyError",
    "SchemaMismatchError",
    "UnauthenticatedError",
    "error_from_status",
    "refusal_metadata",
    "status_for",
]

REFUSAL_KEY = "federation-refusal"
"""Trailing-metadata key that says which refusal a ``RESOURCE_EXHAUSTED`` is."""
BUSY = "busy"
BUDGET = "budget"


class FederationError(Exception):
    """Base class of every error Federation raises on purpose."""


class ConfigError(FederationError):
    """A node or coordinator configuration is invalid (raised at startup)."""


class InvalidRequestError(FederationError, ValueError):
    """A request is malformed or names something that does not exist."""


class UnauthenticatedError(FederationError):
    """The caller could not be identified."""


class PolicyError(FederationError):
    """The node's policy does not allow this caller to do this."""


class BudgetExhaustedError(FederationError):
    """The release would exceed the caller's privacy budget or a per-release cap."""

    def __init__(self, message: str, *, remaining_epsilon: float | None = None) -> None:
        super().__init__(message)
        self.remaining_epsilon = remaining_epsilon


class NodeBusyError(FederationError):
    """The node already runs as many requests as its operator allows (for this caller, or
    for all callers together). Nothing was read or charged: retry in a moment."""


class SchemaMismatchError(FederationError):
    """Nodes disagree on a dataset's schema, so their releases cannot be combined."""


class NodeUnavailableError(FederationError):
    """A node could not be reached or did not answer in time."""


class NodeInternalError(FederationError):
    """A node failed while handling a request (its log has the details)."""


_TABLE: tuple[tuple[type[FederationError], grpc.StatusCode], ...] = (
    (BudgetExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NodeBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PolicyError, grpc.StatusCode.PERMISSION_DENIED),
    (SchemaMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (NodeUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NodeInternalError, grpc.StatusCode.INTERNAL),
)

_REMAINING_TAG = "remaining_epsilon="


def status_for(err: FederationError) -> grpc.StatusCode:
    """Return the gRPC status code a node answers with for ``err``."""
    for cls, code in _TABLE:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def refusal_metadata(err: FederationError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a node sends with ``err``'s status (see the module docstring)."""
    if isinstance(err, NodeBusyError):
        return ((REFUSAL_KEY, BUSY),)
    if isinstance(err, BudgetExhaustedError):
        return ((REFUSAL_KEY, BUDGET),)
    return ()


def error_from_status(
    code: grpc.StatusCode, details: str, *, node: str, refusal: str = ""
) -> FederationError:
    """Turn a gRPC status from ``node`` back into the exception class it stands for.

    ``refusal`` is the call's ``federation-refusal`` trailing metadata, if any.
    """
    message = f"node {node!r}: {details}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NodeUnavailableError(f"node {node!r} is unavailable ({code.name}): {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if refusal == BUSY:
            return NodeBusyError(message)
        if refusal == BUDGET:
            return BudgetExhaustedError(message, remaining_epsilon=_parse_remaining(details))
        return InvalidRequestError(
            f"{message} (RESOURCE_EXHAUSTED from gRPC itself, not a privacy budget: most "
            "likely a message over a size limit. A request over the node's "
            "max_message_bytes was refused unread and charged nothing; a reply over this "
            "client's receive limit may have been charged at the node: its ledger and "
            "Describe's budget say)"
        )
    for cls, mapped in _TABLE:
        if mapped is code:
            return cls(message)
    return NodeInternalError(f"{message} ({code.name})")


def _parse_remaining(details: str) -> float | None:
    """Read the ``remaining_epsilon=...`` tag a node puts in budget messages."""
    start = details.find(_REMAINING_TAG)
    if start < 0:
        return None
    tokens = details[start + len(_REMAINING_TAG) :].split()
    if not tokens:
        return None
    try:
        value = float(tokens[0].rstrip(".,;)"))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
