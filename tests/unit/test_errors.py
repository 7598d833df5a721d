"""Tests of federation.errors: the exception <-> gRPC status table, both directions."""

from __future__ import annotations

import grpc
import pytest

from federation import errors
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
    NodeBusyError,
    NodeInternalError,
    NodeUnavailableError,
    PolicyError,
    SchemaMismatchError,
    UnauthenticatedError,
    error_from_status,
    status_for,
)

NODE = "hong-kong"

# Every error a node may answer with, and the status that carries it.
WIRE_ERRORS: dict[type[FederationError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PolicyError: grpc.StatusCode.PERMISSION_DENIED,
    BudgetExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NodeBusyError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SchemaMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    NodeUnavailableError: grpc.StatusCode.UNAVAILABLE,
    NodeInternalError: grpc.StatusCode.INTERNAL,
}
# Raised at startup only, never in answer to a request: a node that meets one mid-request
# has a bug, which it reports as INTERNAL.
LOCAL_ERRORS: dict[type[FederationError], grpc.StatusCode] = {
    FederationError: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.INTERNAL,
}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_every_error_class_has_a_decided_status() -> None:
    public = {getattr(errors, name) for name in errors.__all__}
    classes = {c for c in public if isinstance(c, type)}
    assert classes == set(WIRE_ERRORS) | set(LOCAL_ERRORS)
    # Subclasses defined elsewhere (e.g. a config field error) inherit their parent's status.
    own = {c for c in _all_subclasses(FederationError) if c.__module__ == errors.__name__}
    assert own | {FederationError} == set(WIRE_ERRORS) | set(LOCAL_ERRORS)


@pytest.mark.parametrize(("cls", "code"), list(WIRE_ERRORS.items()), ids=lambda v: str(v))
def test_error_maps_to_its_status_and_back_to_its_class(
    cls: type[FederationError], code: grpc.StatusCode
) -> None:
    err = cls("boom")
    assert status_for(err) is code
    trailer = dict(errors.refusal_metadata(err))
    back = error_from_status(code, "boom", node=NODE, refusal=trailer.get(errors.REFUSAL_KEY, ""))
    assert type(back) is cls
    assert NODE in str(back)
    assert "boom" in str(back)


@pytest.mark.parametrize(("cls", "code"), list(LOCAL_ERRORS.items()), ids=lambda v: str(v))
def test_startup_errors_answer_internal(cls: type[FederationError], code: grpc.StatusCode) -> None:
    assert status_for(cls("bad config")) is code
    assert type(error_from_status(code, "bad config", node=NODE)) is NodeInternalError


def test_invalid_request_is_also_a_value_error() -> None:
    err = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad bins", node=NODE)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED], ids=str
)
def test_unreachable_or_slow_node_is_unavailable(code: grpc.StatusCode) -> None:
    err = error_from_status(code, "connection refused", node=NODE)
    assert type(err) is NodeUnavailableError
    assert NODE in str(err)
    assert code.name in str(err)
    assert "connection refused" in str(err)


@pytest.mark.parametrize(
    ("details", "remaining"),
    [
        ("consumer 'acme' cannot afford epsilon 0.5; remaining_epsilon=0.25", 0.25),
        ("remaining_epsilon=0.25 left of 1.0", 0.25),
        ("over budget (remaining_epsilon=0.25).", 0.25),
        ("remaining_epsilon=0", 0.0),
        ("remaining_epsilon=1.5e-07", 1.5e-07),
        ("epsilon 2.5 exceeds this node's per-release cap of 1.0", None),
        ("remaining_epsilon=lots", None),
    ],
)
def test_budget_exhausted_carries_the_remaining_epsilon(
    details: str, remaining: float | None
) -> None:
    err = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, details, node=NODE, refusal="budget"
    )
    assert type(err) is BudgetExhaustedError
    assert err.remaining_epsilon == remaining
    assert NODE in str(err)


@pytest.mark.parametrize("details", ["out of budget; remaining_epsilon=", "remaining_epsilon= "])
def test_budget_exhausted_with_an_empty_tag_still_converts(details: str) -> None:
    err = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, details, node=NODE, refusal="budget"
    )
    assert type(err) is BudgetExhaustedError
    assert err.remaining_epsilon is None


def test_budget_exhausted_error_keeps_the_number_it_was_given() -> None:
    assert BudgetExhaustedError("x", remaining_epsilon=0.5).remaining_epsilon == 0.5
    assert BudgetExhaustedError("x").remaining_epsilon is None


_UNMAPPED = sorted(
    set(grpc.StatusCode) - set(WIRE_ERRORS.values()) - {grpc.StatusCode.DEADLINE_EXCEEDED},
    key=lambda c: c.name,
)


@pytest.mark.parametrize("code", _UNMAPPED, ids=lambda c: c.name)
def test_unknown_status_is_a_node_internal_error_naming_node_and_code(
    code: grpc.StatusCode,
) -> None:
    err = error_from_status(code, "something odd", node=NODE)
    assert type(err) is NodeInternalError
    assert NODE in str(err)
    assert code.name in str(err)
    assert "something odd" in str(err)


def test_a_node_marks_which_refusal_a_resource_exhausted_is() -> None:
    # Budget and concurrency refusals share RESOURCE_EXHAUSTED with gRPC's own size limits;
    # the trailer decides, so a client retries a busy node, never a spent budget, and does
    # not mistake an oversized message for a spent budget.
    assert errors.refusal_metadata(NodeBusyError("x")) == ((errors.REFUSAL_KEY, "busy"),)
    assert errors.refusal_metadata(BudgetExhaustedError("x")) == ((errors.REFUSAL_KEY, "budget"),)
    for cls in set(WIRE_ERRORS) - {NodeBusyError, BudgetExhaustedError}:
        assert errors.refusal_metadata(cls("x")) == ()
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    spent = error_from_status(exhausted, "remaining_epsilon=0.5", node=NODE, refusal="budget")
    assert type(spent) is BudgetExhaustedError
    assert spent.remaining_epsilon == 0.5
    too_big = "Received message larger than max (9000000 vs. 8388608)"
    for refusal in ("", "other"):
        unmarked = error_from_status(exhausted, too_big, node=NODE, refusal=refusal)
        assert type(unmarked) is InvalidRequestError
        assert "not a privacy budget" in str(unmarked)
        assert too_big in str(unmarked)
    # The trailer only qualifies RESOURCE_EXHAUSTED.
    assert type(error_from_status(grpc.StatusCode.INTERNAL, "x", node=NODE, refusal="busy")) is (
        NodeInternalError
    )
