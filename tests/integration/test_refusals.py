"""Unhappy paths over real gRPC: right status code, a message a person can act on, nothing
charged, and the node stays up."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from federation import (
    BudgetExhaustedError,
    Count,
    InvalidRequestError,
    Mean,
    NodeUnavailableError,
    PolicyError,
    Sum,
    parse_filter,
    pki,
)
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.coordinator import Coordinator
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.local import LocalFederation
from federation.schema import Column, ColumnType, DatasetSchema


def raw_stub(local: LocalFederation, node: str) -> tuple[grpc.Channel, pb_grpc.NodeStub]:
    """A plain generated stub with the federation's consumer identity."""
    assert local.identity is not None
    channel = grpc.secure_channel(
        local.processes[node].address,
        pki.channel_credentials(local.identity),
        options=[("grpc.ssl_target_name_override", node)],
    )
    return channel, pb_grpc.NodeStub(channel)


def releases(fed: Coordinator) -> dict[str, int]:
    return {name: d.budget.releases for name, d in fed.describe().items()}


def count_request(**overrides: object) -> pb.AnalyzeRequest:
    fields: dict[str, object] = {
        "query": pb.Query(kind=pb.QUERY_KIND_COUNT, dataset="credit"),
        "epsilon": 0.5,
        "mechanism": pb.MECHANISM_LAPLACE,
    }
    fields.update(overrides)
    return pb.AnalyzeRequest(**fields)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Mean("credit", "salary"), "has no column 'salary'"),
        (Sum("credit", "housing"), "needs an int or float column"),
        (Count("credit", group_by="income"), "group by a category or bool column"),
        (Count("credit", where=parse_filter("housing == 'castle'")), "not in the public domain"),
        (Count("credit", where=parse_filter("age == 'old'")), "compare with a number"),
        (Count("loans"), "has no dataset 'loans'"),
    ],
)
def test_bad_query_is_invalid_argument_and_charges_nothing(
    fed: Coordinator, query: object, message: str
) -> None:
    before = releases(fed)
    with pytest.raises(InvalidRequestError, match=message):
        fed.analyze(query, epsilon=0.5)  # type: ignore[arg-type]
    assert releases(fed) == before


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon_is_invalid_argument(local_fed: LocalFederation, epsilon: float) -> None:
    channel, stub = raw_stub(local_fed, "hong-kong")
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Analyze(count_request(epsilon=epsilon), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "epsilon must be a finite number > 0" in info.value.details()


def test_a_refusal_repeating_a_huge_name_is_shortened_and_keeps_its_code(
    local_fed: LocalFederation,
) -> None:
    # Found by review: the reason repeated a 20 kB dataset name in full: the node's log
    # took every byte, and past 16 KiB gRPC turned INVALID_ARGUMENT into RESOURCE_EXHAUSTED.
    name = "x" * 20_000
    channel, stub = raw_stub(local_fed, "hong-kong")
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Analyze(count_request(query=pb.Query(kind=pb.QUERY_KIND_COUNT, dataset=name)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details()
        assert "has no dataset" in details
        assert "characters in all" in details
        assert len(details) < 2100
    assert "x" * 2000 not in local_fed.processes["hong-kong"].log_path.read_text()


@pytest.mark.parametrize(
    ("request_msg", "message"),
    [
        (pb.AnalyzeRequest(epsilon=0.5), "no query"),
        (count_request(query=pb.Query(dataset="credit")), "query kind"),
        (count_request(mechanism=7), "mechanism"),
        (count_request(delta=0.1), "only used by the gaussian mechanism"),
        (count_request(mechanism=pb.MECHANISM_GAUSSIAN, delta=0.0), "needs 0 < delta < 1"),
        # Used to spin a worker thread forever (and hold the consumer's request slot).
        (count_request(mechanism=pb.MECHANISM_GAUSSIAN, delta=1e-310), "too small to calibrate"),
        (count_request(epsilon=1e-310, mechanism=pb.MECHANISM_GAUSSIAN, delta=1e-7), "too small"),
        (
            count_request(
                query=pb.Query(kind=pb.QUERY_KIND_COUNT, dataset="credit", where=pb.Filter())
            ),
            "empty node",
        ),
        (
            count_request(
                query=pb.Query(
                    kind=pb.QUERY_KIND_COUNT,
                    dataset="credit",
                    where=pb.Filter(
                        comparison=pb.Comparison(
                            column="age",
                            op=pb.OPERATOR_IN,
                            values=[pb.Value(number=float(i)) for i in range(5000)],
                        )
                    ),
                )
            ),
            "at most 1024",
        ),
        (
            count_request(
                query=pb.Query(
                    kind=pb.QUERY_KIND_SUM,
                    dataset="credit",
                    column="income",
                    has_bounds=True,
                    lower=5.0,
                    upper=1.0,
                )
            ),
            "must be below upper",
        ),
    ],
)
def test_malformed_request_is_invalid_argument(
    local_fed: LocalFederation, fed: Coordinator, request_msg: pb.AnalyzeRequest, message: str
) -> None:
    before = releases(fed)
    channel, stub = raw_stub(local_fed, "hong-kong")
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.Analyze(request_msg, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert releases(fed) == before


def test_a_call_that_ends_while_the_ledger_is_busy_is_not_charged(
    local_fed: LocalFederation, fed: Coordinator
) -> None:
    # Another process (a second node process on the same ledger, an operator's tool)
    # holds the ledger's write lock past the caller's deadline: when the lock frees, the
    # caller is gone, and nothing may be charged for a release nobody receives.
    before = releases(fed)
    other = sqlite3.connect(local_fed.state_dir("hong-kong") / "ledger.sqlite", timeout=30)
    other.isolation_level = None
    other.execute("BEGIN IMMEDIATE")
    try:
        channel, stub = raw_stub(local_fed, "hong-kong")
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.Analyze(count_request(), timeout=1.0)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)  # the node is still waiting for the lock, past the deadline
    finally:
        other.execute("COMMIT")
        other.close()
    # The node gets the lock within ~0.1 s of the commit (sqlite's busy wait), sees the
    # call has ended and charges nothing; before the fix it charged here.
    for _ in range(20):
        time.sleep(0.1)
        assert releases(fed) == before


def test_message_over_the_transport_cap_is_cut_off_and_node_stays_up(
    local_fed: LocalFederation, fed: Coordinator
) -> None:
    huge = pb.Query(kind=pb.QUERY_KIND_COUNT, dataset="x" * (5 * 1024 * 1024))
    channel, stub = raw_stub(local_fed, "hong-kong")
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.Analyze(count_request(query=huge), timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fed.describe()["hong-kong"].node_name == "hong-kong"


def test_epsilon_over_the_per_release_cap_is_resource_exhausted(fed: Coordinator) -> None:
    before = releases(fed)
    with pytest.raises(BudgetExhaustedError, match="per-release cap of 5"):
        fed.analyze(Count("credit"), epsilon=6.0)
    assert releases(fed) == before


def test_unknown_consumer_is_permission_denied(local_fed: LocalFederation) -> None:
    pki_dir = local_fed.workdir / "pki"
    cert, key = pki.issue(pki_dir, name="stranger", role="consumer")
    identity = pki.Identity.load(ca=pki_dir / "ca.pem", cert=cert, key=key)
    addresses = {n: p.address for n, p in local_fed.processes.items()}
    with (
        Coordinator.from_addresses(addresses, identity=identity) as stranger,
        pytest.raises(PolicyError, match="'stranger' is not in node"),
    ):
        stranger.describe()


def test_client_without_certificate_fails_the_handshake(local_fed: LocalFederation) -> None:
    assert local_fed.identity is not None
    creds = grpc.ssl_channel_credentials(root_certificates=local_fed.identity.ca_pem)
    channel = grpc.secure_channel(
        local_fed.processes["shenzhen"].address,
        creds,
        options=[("grpc.ssl_target_name_override", "shenzhen")],
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.NodeStub(channel).Describe(pb.DescribeRequest(), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- budget and restarts


@pytest.fixture
def small_budget(tmp_path: Path) -> Iterator[LocalFederation]:
    frames = {
        name: synthetic_credit(jurisdiction=name, rows=2000, seed=i)
        for i, name in enumerate(("hong-kong", "shenzhen"))
    }
    local = LocalFederation.from_arrays(
        frames,
        schema=CREDIT_SCHEMA,
        epsilon=1.0,
        max_epsilon_per_release=1.0,
        workdir=tmp_path / "fed",
    )
    local.start()
    yield local
    local.stop()


def test_budget_refuses_and_charges_nothing_then_survives_restart(
    small_budget: LocalFederation,
) -> None:
    fed = small_budget.coordinator
    assert fed is not None
    fed.analyze(Count("credit"), epsilon=0.6)
    with pytest.raises(BudgetExhaustedError, match="remaining_epsilon=0.4") as info:
        fed.analyze(Count("credit"), epsilon=0.6)
    assert info.value.remaining_epsilon == pytest.approx(0.4)
    status = fed.budgets()["hong-kong"]
    assert status.releases == 1
    assert status.spent_epsilon == pytest.approx(0.6)

    small_budget.restart("hong-kong")
    fed = small_budget.coordinator
    assert fed is not None
    after = fed.budgets()["hong-kong"]
    assert after.releases == 1
    assert after.spent_epsilon == pytest.approx(0.6)
    with pytest.raises(BudgetExhaustedError):
        fed.analyze(Count("credit"), epsilon=0.5)
    fed.analyze(Count("credit"), epsilon=0.4)  # exactly the remainder is allowed
    assert fed.budgets()["hong-kong"].remaining_epsilon == pytest.approx(0.0, abs=1e-9)


def test_a_node_out_of_budget_counts_against_min_nodes_and_the_paid_answers_stand(
    small_budget: LocalFederation,
) -> None:
    fed = small_budget.coordinator
    assert fed is not None
    channel, stub = raw_stub(small_budget, "hong-kong")
    with channel:
        stub.Analyze(count_request(epsilon=0.8), timeout=10)  # hong-kong: 0.2 left
    # All nodes required: hong-kong refuses, and the error names what shenzhen was charged.
    with pytest.raises(BudgetExhaustedError) as info:
        fed.analyze(Count("credit"), epsilon=0.5)
    assert "remaining_epsilon=0.2" in str(info.value)
    assert "already charged for this query" in str(info.value)
    assert "shenzhen (epsilon 0.5, receipt " in str(info.value)
    assert info.value.remaining_epsilon == pytest.approx(0.2)
    # min_nodes=1: shenzhen's paid answer is the result; hong-kong is listed as missing.
    result = fed.analyze(Count("credit"), epsilon=0.4, min_nodes=1)
    assert result.missing == ("hong-kong",)
    assert [n.node for n in result.nodes] == ["shenzhen"]
    assert fed.budgets()["shenzhen"].spent_epsilon == pytest.approx(0.9)
    # Over a node's per-release cap (from its Describe): nobody is asked, nobody pays.
    before = fed.budgets()
    with pytest.raises(BudgetExhaustedError, match="so it was not asked"):
        fed.analyze(Count("credit"), epsilon=1.5, min_nodes=1)
    assert fed.budgets() == before
    # So is a delta over the per-release delta cap, which Describe states too.
    budget = fed.describe()["hong-kong"].budget
    assert budget.max_delta_per_release == pytest.approx(budget.delta / 10)  # the default
    with pytest.raises(PolicyError, match=r"delta 1e-06 exceeds .* cap of 1e-07 .*not asked"):
        fed.analyze(Count("credit"), epsilon=0.1, delta=1e-6, mechanism="gaussian", min_nodes=1)
    assert fed.budgets() == before


def test_unreachable_node_is_named_or_skipped_with_min_nodes(
    small_budget: LocalFederation,
) -> None:
    fed = small_budget.coordinator
    assert fed is not None
    fed.describe()
    small_budget.processes["shenzhen"].kill()
    with pytest.raises(NodeUnavailableError, match="shenzhen"):
        fed.analyze(Count("credit"), epsilon=0.1)
    result = fed.analyze(Count("credit"), epsilon=0.1, min_nodes=1)
    assert result.missing == ("shenzhen",)
    assert [n.node for n in result.nodes] == ["hong-kong"]


# ---------------------------------------------------------------- missing bounds (plaintext)


def test_column_without_public_bounds_needs_request_bounds(tmp_path: Path) -> None:
    schema = DatasetSchema(
        name="survey",
        columns=(
            Column("spend", ColumnType.FLOAT),
            Column("region", ColumnType.CATEGORY, domain=("north", "south")),
        ),
    )
    rng = np.random.default_rng(0)
    data = {
        "lab": {
            "spend": rng.uniform(0, 100, 500),
            "region": rng.choice(np.array(["north", "south"]), 500),
        }
    }
    with LocalFederation.from_arrays(data, schema=schema, tls=False, workdir=tmp_path) as fed:
        with pytest.raises(InvalidRequestError, match="has no public bounds"):
            fed.analyze(Mean("survey", "spend"), epsilon=1.0)
        assert fed.budgets()["lab"].releases == 0
        result = fed.analyze(Mean("survey", "spend", bounds=(0.0, 100.0)), epsilon=1.0)
        assert 40 < result.value < 60
