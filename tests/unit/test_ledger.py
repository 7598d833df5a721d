"""Tests of nodes.ledger: durable, atomic check-and-charge of the privacy budget.

Most policies here use delta = 0, where the composed spend is basic composition and no
RDP conversion (which imports Opacus and torch, seconds) is needed; one test covers the
default delta, the production path.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nodes.ledger as ledger_module
from federation.errors import (
    REFUSAL_KEY,
    BudgetExhaustedError,
    InvalidRequestError,
    NodeBusyError,
    NodeUnavailableError,
    error_from_status,
    refusal_metadata,
)
from federation.privacy import Charge, Spend, gaussian_charge, laplace_charge
from nodes.config import ConsumerPolicy
from nodes.ledger import Ledger
from nodes.service import NodeService

# The ledger allows a relative 1e-9 over the budget so that pieces summing to the whole
# budget in floating point are not refused (nodes/ledger.py, _SLACK).
SLACK = 1e-9
WORKERS = 4
ATTEMPTS = 20


def _policy(epsilon: float = 1.0, *, name: str = "acme", delta: float = 0.0) -> ConsumerPolicy:
    return ConsumerPolicy(name=name, epsilon=epsilon, delta=delta)


def _charge(ledger: Ledger, charge: Charge, policy: ConsumerPolicy) -> None:
    ledger.charge(charge, policy=policy, operation="analyze", details={"query": "count"})


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    opened = Ledger(tmp_path / "ledger.sqlite")
    yield opened
    opened.close()


def test_new_ledger_is_empty(ledger: Ledger) -> None:
    policy = _policy()
    status = ledger.status(policy)
    assert (status.spent_epsilon, status.remaining_epsilon, status.releases) == (0.0, 1.0, 0)
    assert ledger.count() == 0
    assert ledger.spend("acme") == Spend()


def test_charge_records_and_composes(ledger: Ledger) -> None:
    policy = _policy(2.0)
    charges = [laplace_charge(epsilon=e, sensitivity=1) for e in (0.25, 0.5, 0.125)]
    for charge in charges:
        record = ledger.charge(charge, policy=policy, operation="analyze", details={"n": 1})
        assert record.consumer == "acme"
        assert record.id
    expected = Spend()
    for charge in charges:
        expected = expected.plus(charge)
    assert ledger.spend("acme") == expected
    status = ledger.status(policy)
    assert status.spent_epsilon == expected.epsilon_at(0.0)
    assert status.spent_epsilon == pytest.approx(0.875)
    assert status.remaining_epsilon == pytest.approx(1.125)
    assert status.releases == 3
    assert record.budget == status
    assert ledger.count() == ledger.count("acme") == 3
    assert ledger.total_charged("acme") == pytest.approx(0.875)


def test_charge_composes_with_rdp_at_the_default_delta(ledger: Ledger) -> None:
    policy = ConsumerPolicy(name="acme", epsilon=10.0)  # delta 1e-6, the default
    charge = gaussian_charge(epsilon=0.5, delta=1e-8, sensitivity=1)
    for _ in range(8):
        _charge(ledger, charge, policy)
    spend = ledger.spend("acme")
    assert spend.releases == 8
    status = ledger.status(policy)
    assert status.spent_epsilon == spend.epsilon_at(policy.delta)
    # Eight Gaussian releases compose better under RDP than the basic sum of 4.0.
    assert 0 < status.spent_epsilon < 8 * 0.5


def test_consumers_have_separate_budgets(ledger: Ledger) -> None:
    acme, other = _policy(name="acme"), _policy(name="other")
    _charge(ledger, laplace_charge(epsilon=1.0, sensitivity=1), acme)
    assert ledger.status(other).spent_epsilon == 0.0
    _charge(ledger, laplace_charge(epsilon=1.0, sensitivity=1), other)
    assert (ledger.count("acme"), ledger.count("other"), ledger.count()) == (1, 1, 2)


def test_over_budget_charge_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    policy = _policy(1.0)
    _charge(ledger, laplace_charge(epsilon=0.75, sensitivity=1), policy)
    before = (ledger.status(policy), ledger.count(), ledger.spend("acme"))
    with pytest.raises(BudgetExhaustedError) as info:
        _charge(ledger, laplace_charge(epsilon=0.5, sensitivity=1), policy)
    assert info.value.remaining_epsilon == pytest.approx(0.25)
    assert "acme" in str(info.value)
    assert (ledger.status(policy), ledger.count(), ledger.spend("acme")) == before


def test_a_call_abandoned_while_waiting_for_the_lock_is_not_charged(ledger: Ledger) -> None:
    policy = _policy(1.0)
    asked: list[bool] = []

    def abandoned() -> bool:
        asked.append(ledger._connect().in_transaction)  # asked with the write lock held
        return True

    charge = laplace_charge(epsilon=0.5, sensitivity=1)
    with pytest.raises(NodeUnavailableError, match="nothing was charged"):
        ledger.charge(charge, policy=policy, operation="analyze", details={}, abandoned=abandoned)
    assert asked == [True]
    assert (ledger.count(), ledger.spend("acme").epsilon_at(0.0)) == (0, 0.0)
    ledger.charge(charge, policy=policy, operation="analyze", details={}, abandoned=lambda: False)
    assert ledger.count() == 1


def test_a_recheck_runs_under_the_write_lock_and_can_refuse_the_charge(ledger: Ledger) -> None:
    # Used to re-check a training job's settings against its first charged round where no
    # second stream of the same job can be charged in between.
    policy = _policy(1.0)
    charge = laplace_charge(epsilon=0.1, sensitivity=1)
    held: list[bool] = []

    def refuse() -> None:
        held.append(ledger._connect().in_transaction)
        raise InvalidRequestError("job settings changed")

    with pytest.raises(InvalidRequestError, match="job settings changed"):
        ledger.charge(charge, policy=policy, operation="train", details={}, recheck=refuse)
    assert held == [True]
    assert ledger.count() == 0
    ledger.charge(charge, policy=policy, operation="train", details={}, recheck=lambda: None)
    assert ledger.count() == 1


def test_job_spend_composes_every_charged_round_of_that_job_only(ledger: Ledger) -> None:
    policy = _policy(100.0, delta=1e-5)
    round_charge = gaussian_charge(epsilon=0.5, delta=1e-7, sensitivity=1)
    for job, rounds in (("job-a", 3), ("job-b", 1)):
        for r in range(rounds):
            details = {"job_id": job, "round": min(r, 1)}  # job-a's round 1 is retried
            ledger.charge(round_charge, policy=policy, operation="train", details=details)
    _charge(ledger, laplace_charge(epsilon=1.0, sensitivity=1), policy)  # not training
    three = Spend().plus(round_charge).plus(round_charge).plus(round_charge)
    assert ledger.job_spend("acme", "job-a") == three
    assert ledger.job_spend("acme", "job-b") == Spend().plus(round_charge)
    assert ledger.job_spend("other", "job-a") == Spend()
    assert ledger.job_spend("acme", "job-c") == Spend()


def test_refusal_message_carries_the_remaining_budget_over_the_wire(ledger: Ledger) -> None:
    policy = _policy(1.0)
    _charge(ledger, laplace_charge(epsilon=0.75, sensitivity=1), policy)
    with pytest.raises(BudgetExhaustedError) as info:
        _charge(ledger, laplace_charge(epsilon=0.5, sensitivity=1), policy)
    ((key, mark),) = refusal_metadata(info.value)  # the trailer the node sends with it
    client_side = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, str(info.value), node="hong-kong", refusal=mark
    )
    assert key == REFUSAL_KEY
    assert isinstance(client_side, BudgetExhaustedError)
    assert client_side.remaining_epsilon == pytest.approx(0.25)


def test_charge_of_exactly_the_remaining_budget_is_accepted(ledger: Ledger) -> None:
    policy = _policy(1.0)
    _charge(ledger, laplace_charge(epsilon=0.375, sensitivity=1), policy)
    _charge(ledger, laplace_charge(epsilon=0.625, sensitivity=1), policy)
    status = ledger.status(policy)
    assert status.remaining_epsilon == 0.0
    assert status.spent_epsilon == pytest.approx(1.0)
    with pytest.raises(BudgetExhaustedError) as info:
        _charge(ledger, laplace_charge(epsilon=1e-6, sensitivity=1), policy)
    assert info.value.remaining_epsilon == 0.0


def test_whole_budget_in_tenths_is_accepted(ledger: Ledger) -> None:
    # 10 x 0.1 sums to 0.9999999999999999 in floating point; the 11th must be refused.
    policy = _policy(1.0)
    for _ in range(10):
        _charge(ledger, laplace_charge(epsilon=0.1, sensitivity=1), policy)
    with pytest.raises(BudgetExhaustedError):
        _charge(ledger, laplace_charge(epsilon=0.1, sensitivity=1), policy)
    assert ledger.count() == 10


def test_spend_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    policy = _policy(1.0)
    first = Ledger(path)
    _charge(first, laplace_charge(epsilon=0.75, sensitivity=1), policy)
    first.close()
    second = Ledger(path)
    try:
        assert second.count("acme") == 1
        assert second.status(policy).spent_epsilon == pytest.approx(0.75)
        with pytest.raises(BudgetExhaustedError):
            _charge(second, laplace_charge(epsilon=0.5, sensitivity=1), policy)
    finally:
        second.close()


@settings(max_examples=25, deadline=None)
@given(
    total=st.floats(min_value=0.1, max_value=3.0),
    epsilons=st.lists(st.floats(min_value=0.01, max_value=1.5), min_size=1, max_size=12),
)
def test_spend_is_monotone_and_never_passes_the_total(total: float, epsilons: list[float]) -> None:
    policy = _policy(total)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.sqlite")
        try:
            spent, count = 0.0, 0
            for epsilon in epsilons:
                refused: BudgetExhaustedError | None = None
                try:
                    _charge(ledger, laplace_charge(epsilon=epsilon, sensitivity=1), policy)
                except BudgetExhaustedError as err:
                    refused = err
                if refused is None:
                    count += 1
                else:  # refused only if it does not fit, and says what is left
                    assert spent + epsilon > total * (1 - SLACK)
                    assert refused.remaining_epsilon == pytest.approx(max(0.0, total - spent))
                status = ledger.status(policy)
                assert status.spent_epsilon >= spent
                assert status.spent_epsilon <= total * (1 + SLACK)
                assert status.remaining_epsilon >= 0.0
                assert status.releases == ledger.count() == count
                spent = status.spent_epsilon
        finally:
            ledger.close()


# ------------------------------------------------------------------ concurrency


def charge_tenths(path: str, start: Any, results: Any) -> None:
    """Worker (module level for 'spawn'): try ATTEMPTS charges of 0.1 against ``path``.

    Puts the number of accepted charges on ``results``, or the error's repr, so that a
    failing worker fails the test at once instead of leaving it waiting.
    """
    try:
        ledger = Ledger(Path(path))
        policy = _policy(1.0)
        charge = laplace_charge(epsilon=0.1, sensitivity=1)
        start.wait(timeout=60)
        accepted = 0
        for _ in range(ATTEMPTS):
            try:
                _charge(ledger, charge, policy)
            except BudgetExhaustedError:
                continue
            accepted += 1
        ledger.close()
    except BaseException as err:  # reported to the parent, which fails the test
        results.put(repr(err))
        raise
    results.put(accepted)


def _check_exactly_ten(path: Path, accepted: list[int]) -> None:
    assert sum(accepted) == 10
    ledger = Ledger(path)
    try:
        policy = _policy(1.0)
        assert ledger.count() == 10
        assert ledger.total_charged("acme") <= 1.0 * (1 + SLACK)
        status = ledger.status(policy)
        assert status.releases == 10
        assert status.spent_epsilon <= 1.0 * (1 + SLACK)
        assert status.remaining_epsilon == 0.0
    finally:
        ledger.close()


def test_concurrent_processes_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()  # the node creates its ledger before serving
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=charge_tenths, args=(str(path), start, results)) for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    try:
        accepted = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=120)
    assert all(isinstance(n, int) for n in accepted), accepted
    assert [worker.exitcode for worker in workers] == [0] * WORKERS
    results.close()
    results.join_thread()
    _check_exactly_ten(path, accepted)


def test_concurrent_threads_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    shared = Ledger(path)
    policy = _policy(1.0)
    charge = laplace_charge(epsilon=0.1, sensitivity=1)
    start = threading.Barrier(WORKERS)
    accepted: list[int] = []
    failures: list[BaseException] = []

    def work() -> None:
        count = 0
        try:
            start.wait(timeout=60)
            for _ in range(ATTEMPTS):
                try:
                    _charge(shared, charge, policy)
                except BudgetExhaustedError:
                    continue
                count += 1
        except BaseException as err:  # surfaced below: a thread's error must fail the test
            failures.append(err)
        finally:
            shared.close()  # this thread's connection
            accepted.append(count)

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    shared.close()
    _check_exactly_ten(path, accepted)


def test_a_ledger_locked_past_its_wait_is_busy_and_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer (a second node process on the same state dir, an operator's sqlite3
    # shell) holds the write lock: the caller hears "busy, retry" (RESOURCE_EXHAUSTED,
    # marked busy), not INTERNAL, and nothing is recorded.
    monkeypatch.setattr(ledger_module, "_LOCK_WAIT_S", 0.2)
    opened = Ledger(tmp_path / "ledger.sqlite")
    other = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(NodeBusyError, match="nothing was charged: retry"):
            _charge(opened, laplace_charge(epsilon=0.1, sensitivity=1), _policy())
        other.execute("ROLLBACK")
        assert opened.spend("acme") == Spend()
        _charge(opened, laplace_charge(epsilon=0.1, sensitivity=1), _policy())  # and then it is
        assert opened.spend("acme").releases == 1
    finally:
        other.close()
        opened.close()


def test_a_busy_ledger_refusal_is_not_audited_through_the_same_lock() -> None:
    # Recording it would wait on the lock that just timed out, delaying "busy" by as long.
    def must_not_record(**kwargs: Any) -> None:
        raise AssertionError("recorded a refusal through the locked ledger")

    service = SimpleNamespace(
        guard=SimpleNamespace(identify=lambda context: "acme"),
        ledger=SimpleNamespace(record_refusal=must_not_record),
    )
    busy = NodeBusyError("the node's budget ledger stayed locked")
    busy.__cause__ = sqlite3.OperationalError("database is locked")
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    NodeService._audit_refusal(service, None, "analyze", code, busy)  # type: ignore[arg-type]
    recorded = []
    service.ledger = SimpleNamespace(record_refusal=lambda **kw: recorded.append(kw))
    NodeService._audit_refusal(service, None, "analyze", code, NodeBusyError("slots"))  # type: ignore[arg-type]
    assert [r["code"] for r in recorded] == ["RESOURCE_EXHAUSTED"]
