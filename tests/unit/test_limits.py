"""Request limits without sockets: per-consumer concurrency, deadlines, transport options,
their config keys, and the guard's admission and fail-closed revocation file."""

from __future__ import annotations

import doctest
import logging
import textwrap
import threading
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from federation import pki
from federation._proto.v1 import node_pb2 as pb
from federation.errors import (
    ConfigError,
    InvalidRequestError,
    NodeBusyError,
    UnauthenticatedError,
)
from nodes import limits
from nodes._unary import CallEndedError, read_single
from nodes.config import ConsumerPolicy, NodeConfig, parse_config
from nodes.guard import ANONYMOUS, CONSUMER_HEADER, Guard
from nodes.limits import (
    HEALTH_CALL_S,
    HEALTH_MAX_CONCURRENT,
    REQUEST_READ_S,
    ConcurrencyLimiter,
    Watchdog,
    health_total_limit,
    server_options,
)
from nodes.server import _warn_if_one_consumer_can_fill_the_pool

WAIT_S = 10.0  # generous bound on waiting for an event; never a timing assertion

NODE_TOML = """\
[node]
name = "hong-kong"
listen = "127.0.0.1:0"
state_dir = "state"
{node_extra}

[[datasets]]
name = "credit"
source = "credit.csv"

  [[datasets.columns]]
  name = "age"
  type = "int"
  lower = 18
  upper = 90

[consumers.acme-ai]
epsilon = 1.0
{consumer_extra}

[consumers.beta-labs]
epsilon = 1.0
{tls}
"""


def node_config(
    tmp_path: Path, *, node_extra: str = "", consumer_extra: str = "", tls: str = ""
) -> NodeConfig:
    (tmp_path / "credit.csv").write_text("age\n30\n")
    text = NODE_TOML.format(node_extra=node_extra, consumer_extra=consumer_extra, tls=tls)
    return parse_config(tomllib.loads(text), base_dir=tmp_path)


# ---------------------------------------------------------------- config keys


def test_limits_have_safe_defaults(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    assert config.max_request_s == 300.0
    assert config.max_request_read_s == REQUEST_READ_S == 10.0
    assert config.consumers["acme-ai"].max_concurrent_requests == 4


def test_limits_are_read_from_the_config(tmp_path: Path) -> None:
    config = node_config(
        tmp_path, node_extra="max_request_s = 2.5", consumer_extra="max_concurrent_requests = 1"
    )
    assert config.max_request_s == 2.5
    assert config.consumers["acme-ai"].max_concurrent_requests == 1
    assert config.consumers["beta-labs"].max_concurrent_requests == 4
    assert config.max_request_read_s == 2.5  # never above max_request_s, left out


def test_read_limit_is_read_from_the_config(tmp_path: Path) -> None:
    config = node_config(tmp_path, node_extra="max_request_s = 3\nmax_request_read_s = 0.5")
    assert (config.max_request_s, config.max_request_read_s) == (3.0, 0.5)


@pytest.mark.parametrize("value", ["0", "-1", "301", "inf"])
def test_read_limit_out_of_range_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"node\.max_request_read_s: must be a number of seconds > 0 and <= max_request_s "
        r"\(300\)",
    ):
        node_config(tmp_path, node_extra=f"max_request_read_s = {value}")


@pytest.mark.parametrize("value", ["0", "-1", "86401", "inf", "nan"])
def test_max_request_s_out_of_range_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"node\.max_request_s: must be a number of seconds"):
        node_config(tmp_path, node_extra=f"max_request_s = {value}")


@pytest.mark.parametrize("value", ["0", "-3", "1025", "2.5", "true"])
def test_max_concurrent_requests_out_of_range_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"consumers\.acme-ai\.max_concurrent_requests"):
        node_config(tmp_path, consumer_extra=f"max_concurrent_requests = {value}")


def test_policy_rejects_a_zero_concurrency_limit() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_requests: must be an integer 1-1024"):
        ConsumerPolicy(name="acme-ai", epsilon=1.0, max_concurrent_requests=0)


# ---------------------------------------------------------------- concurrency


def test_limiter_refuses_beyond_the_limit_and_frees_slots() -> None:
    limiter = ConcurrencyLimiter(node="hong-kong")
    with limiter.slot("acme-ai", limit=2), limiter.slot("acme-ai", limit=2):
        assert limiter.running("acme-ai") == 2
        with (
            pytest.raises(NodeBusyError, match=r"'acme-ai' on node 'hong-kong' \(limit 2\)"),
            limiter.slot("acme-ai", limit=2),
        ):
            pass  # pragma: no cover - never entered
        assert limiter.running("acme-ai") == 2
        with limiter.slot("beta-labs", limit=1):  # another consumer is unaffected
            assert limiter.running("beta-labs") == 1
    assert limiter.running("acme-ai") == 0
    with limiter.slot("acme-ai", limit=1):
        assert limiter.running("acme-ai") == 1


def test_limiter_names_what_it_limits() -> None:
    limiter = ConcurrencyLimiter(node="n", what="health calls")
    with (
        limiter.slot("acme-ai", limit=1),
        pytest.raises(NodeBusyError, match="too many concurrent health calls for consumer"),
        limiter.slot("acme-ai", limit=1),
    ):
        pass  # pragma: no cover - never entered


def test_node_slots_are_shared_by_every_caller_and_counted_apart() -> None:
    limiter = ConcurrencyLimiter(node="hong-kong", what="health calls")
    with limiter.slot("acme-ai", limit=1), limiter.node_slot(limit=2):
        with limiter.slot("beta-labs", limit=1), limiter.node_slot(limit=2):
            assert limiter.running(None) == 2
            assert limiter.running("acme-ai") == limiter.running("beta-labs") == 1
            with (
                pytest.raises(
                    NodeBusyError,
                    match=r"too many concurrent health calls on node 'hong-kong' \(limit 2,",
                ),
                limiter.node_slot(limit=2),
            ):
                pass  # pragma: no cover - never entered
        assert limiter.running(None) == 1
    assert limiter.running(None) == 0


@pytest.mark.parametrize(("max_workers", "total"), [(1, 1), (4, 1), (7, 1), (8, 2), (16, 4)])
def test_health_calls_take_at_most_a_quarter_of_the_workers(max_workers: int, total: int) -> None:
    assert health_total_limit(max_workers) == total


def test_doctests_of_the_limits_module_pass() -> None:
    assert doctest.testmod(limits).failed == 0


def test_limiter_frees_the_slot_when_the_request_fails() -> None:
    limiter = ConcurrencyLimiter(node="n")
    with pytest.raises(RuntimeError), limiter.slot("acme-ai", limit=1):
        raise RuntimeError("handler failed")
    assert limiter.running("acme-ai") == 0


def test_limiter_admits_exactly_the_limit_under_contention() -> None:
    limiter = ConcurrencyLimiter(node="n")
    limit, threads = 3, 24
    barrier = threading.Barrier(threads)
    decided = threading.Semaphore(0)  # one release per thread, once it is in or refused
    release = threading.Event()
    admitted: list[int] = []
    refused: list[int] = []

    def worker() -> None:
        barrier.wait()
        try:
            with limiter.slot("acme-ai", limit=limit):
                admitted.append(limiter.running("acme-ai"))
                decided.release()
                release.wait(WAIT_S)
        except NodeBusyError:
            refused.append(1)
            decided.release()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for _ in range(threads):
        assert decided.acquire(timeout=WAIT_S)
    # Holders never let go before every thread has been decided: exactly `limit` got in.
    assert len(admitted) == limit
    assert max(admitted) <= limit
    assert len(refused) == threads - limit
    release.set()
    for t in pool:
        t.join()
    assert limiter.running("acme-ai") == 0


# ---------------------------------------------------------------- deadlines


def test_watchdog_fires_an_overdue_deadline_once() -> None:
    fired = threading.Event()
    calls: list[int] = []
    watchdog = Watchdog()
    try:

        def expire() -> None:
            calls.append(1)
            fired.set()

        with watchdog.deadline(expire, timeout_s=0.01) as deadline:
            assert fired.wait(WAIT_S)
            assert deadline.expired
            assert deadline.remaining_s == 0.0
            assert not deadline.fire()  # at most once
        assert calls == [1]
    finally:
        watchdog.close()


def test_watchdog_does_not_fire_a_finished_deadline() -> None:
    clock = [0.0]
    watchdog = Watchdog(clock=lambda: clock[0])
    fired: list[str] = []
    try:
        with watchdog.deadline(lambda: fired.append("early"), timeout_s=5.0) as deadline:
            assert deadline.remaining_s == 5.0
            assert not deadline.expired
        # A later deadline fires; the finished one, due earlier, never does.
        done = threading.Event()

        def late() -> None:
            fired.append("late")
            done.set()

        watchdog.start(late, timeout_s=6.0)
        clock[0] = 10.0
        with watchdog._condition:  # wake the thread to re-read the (fake) clock
            watchdog._condition.notify()
        assert done.wait(WAIT_S)
        assert fired == ["late"]
    finally:
        watchdog.close()


def test_deadline_says_whether_it_fired() -> None:
    watchdog = Watchdog()
    try:
        with watchdog.deadline(lambda: None, timeout_s=WAIT_S) as finished:
            pass
        assert not finished.fired
        fired = threading.Event()
        with watchdog.deadline(fired.set, timeout_s=0.01) as overdue:
            assert fired.wait(WAIT_S)
        assert overdue.fired
    finally:
        watchdog.close()


def test_closed_watchdog_refuses_new_deadlines() -> None:
    watchdog = Watchdog()
    watchdog.close()
    with pytest.raises(RuntimeError, match="closed"):
        watchdog.start(lambda: None, timeout_s=1.0)


def test_server_options_bound_every_connection() -> None:
    options = dict(server_options(max_message_bytes=4096, max_request_s=300.0))
    assert options["grpc.max_receive_message_length"] == 4096
    assert options["grpc.max_send_message_length"] == 4096
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 300_000
    assert options["grpc.max_connection_idle_ms"] > 0
    assert options["grpc.keepalive_time_ms"] > 0
    assert options["grpc.keepalive_timeout_ms"] > 0
    assert options["grpc.http2.max_pings_without_data"] == 0
    longer = dict(server_options(max_message_bytes=4096, max_request_s=300.0, longest_rpc_s=1800.0))
    assert longer["grpc.max_connection_age_grace_ms"] == 1_800_000


# ---------------------------------------------------------------- reading after admission


def _read(messages: list[bytes], *, ended: bool = False) -> pb.AnalyzeRequest:
    return read_single(
        iter(messages), pb.AnalyzeRequest.FromString, method="Analyze", call_ended=lambda: ended
    )


def test_read_single_parses_the_one_message() -> None:
    request = pb.AnalyzeRequest(epsilon=0.5)
    assert _read([request.SerializeToString()]) == request
    assert _read([b""]) == pb.AnalyzeRequest()  # an empty message is a valid one


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "Analyze takes exactly one request message; this call sent none"),
        ([b"", b""], "Analyze takes exactly one request message; this call sent more than one"),
        ([b"\xff\xff\xff"], r"Analyze: the request message \(3 bytes\) does not parse"),
    ],
)
def test_read_single_refuses_anything_but_one_valid_message(
    messages: list[bytes], problem: str
) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        _read(messages)


def test_read_single_tells_an_ended_call_from_an_empty_request() -> None:
    with pytest.raises(CallEndedError):
        _read([], ended=True)


# ---------------------------------------------------------------- start-up warning


def test_node_warns_when_one_consumer_and_health_calls_can_hold_every_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The default max_concurrent_requests (4) plus every health call (max_workers // 4).
    for max_workers in (6, 8, 16):
        config = node_config(tmp_path, node_extra=f"max_workers = {max_workers}")
        _warn_if_one_consumer_can_fill_the_pool(config)
    assert not caplog.records
    _warn_if_one_consumer_can_fill_the_pool(node_config(tmp_path, node_extra="max_workers = 5"))
    [record] = caplog.records
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert "consumer 'acme-ai' may hold 4 worker threads" in message
    assert "health calls 1 more (the node-wide health limit)" in message
    assert "set node.max_workers to at least 6" in message


# ---------------------------------------------------------------- guard admission


class FakeContext:
    """The two things an insecure node's guard reads from a call, and cancel."""

    def __init__(self, consumer: str) -> None:
        self.metadata: Sequence[tuple[str, str]] = ((CONSUMER_HEADER, consumer),)
        self.cancelled = threading.Event()

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    def cancel(self) -> None:
        self.cancelled.set()


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    # 16 workers: 4 health calls at once on the node.
    config = node_config(
        tmp_path, node_extra="max_workers = 16", consumer_extra="max_concurrent_requests = 1"
    )
    guard = Guard(config, use_tls=False)
    yield guard
    guard.close()


def test_admission_holds_a_slot_and_releases_it(guard: Guard) -> None:
    ctx = FakeContext("acme-ai")
    with guard.admit(ctx, "describe") as admitted:  # type: ignore[arg-type]
        assert admitted.consumer == "acme-ai"
        assert admitted.policy.name == "acme-ai"
        with (
            pytest.raises(NodeBusyError, match="too many concurrent requests"),
            guard.admit(FakeContext("acme-ai"), "analyze"),  # type: ignore[arg-type]
        ):
            pass  # pragma: no cover - never entered
        with guard.admit(FakeContext("beta-labs"), "analyze"):  # type: ignore[arg-type]
            pass
    with guard.admit(FakeContext("acme-ai"), "analyze"):  # type: ignore[arg-type]
        pass
    assert not ctx.cancelled.is_set()


def test_admission_cancels_a_request_past_its_deadline(guard: Guard) -> None:
    ctx = FakeContext("acme-ai")
    with guard.admit(ctx, "analyze", limit_s=0.01) as admitted:  # type: ignore[arg-type]
        assert ctx.cancelled.wait(WAIT_S)
        assert admitted.deadline.expired
    assert guard.limiter.running("acme-ai") == 0


def test_health_admission_needs_no_policy_but_has_its_own_limit(guard: Guard) -> None:
    # acme-ai runs its one request and may still check health; so may a stranger.
    with ExitStack() as stack:
        stack.enter_context(guard.admit(FakeContext("acme-ai"), "analyze"))  # type: ignore[arg-type]
        for _ in range(HEALTH_MAX_CONCURRENT):
            stack.enter_context(guard.admit_health(FakeContext("acme-ai")))  # type: ignore[arg-type]
        with (
            pytest.raises(NodeBusyError, match="concurrent health calls.*'acme-ai'"),
            guard.admit_health(FakeContext("acme-ai")),  # type: ignore[arg-type]
        ):
            pass  # pragma: no cover - never entered
        with guard.admit_health(FakeContext("stranger")):  # type: ignore[arg-type]
            assert guard.health_limiter.running("stranger") == 1
    assert guard.health_limiter.running("acme-ai") == 0


def test_health_admission_without_tls_takes_anonymous_probes(guard: Guard) -> None:
    ctx = FakeContext("")
    ctx.metadata = ()
    with guard.admit_health(ctx) as admitted:  # type: ignore[arg-type]
        assert admitted.caller == ANONYMOUS
        assert guard.health_limiter.running(ANONYMOUS) == 1
        assert not admitted.deadline.expired
    assert guard.health_limiter.running(ANONYMOUS) == 0


def test_health_admission_has_a_node_wide_limit(tmp_path: Path) -> None:
    guard = Guard(node_config(tmp_path, node_extra="max_workers = 8"), use_tls=False)
    total = health_total_limit(8)
    try:
        with ExitStack() as stack:
            # Identities with no policy entry, one health call each: the node-wide cap.
            for i in range(total):
                stack.enter_context(guard.admit_health(FakeContext(f"stranger-{i}")))  # type: ignore[arg-type]
            with (
                pytest.raises(
                    NodeBusyError,
                    match=rf"too many concurrent health calls on node 'hong-kong' \(limit {total},",
                ),
                guard.admit_health(FakeContext("acme-ai")),  # type: ignore[arg-type]
            ):
                pass  # pragma: no cover - never entered
            assert guard.health_limiter.running("acme-ai") == 0  # its own slot given back
            assert guard.health_limiter.running(None) == total
        assert guard.health_limiter.running(None) == 0
    finally:
        guard.close()


def test_health_calls_end_within_the_health_call_limit(guard: Guard) -> None:
    assert guard.config.max_request_s > HEALTH_CALL_S
    with guard.admit_health(FakeContext("acme-ai")) as admitted:  # type: ignore[arg-type]
        assert admitted.deadline.remaining_s <= HEALTH_CALL_S


def test_health_admission_cancels_a_call_at_max_request_s(tmp_path: Path) -> None:
    guard = Guard(node_config(tmp_path, node_extra="max_request_s = 0.01"), use_tls=False)
    try:
        ctx = FakeContext("acme-ai")
        with guard.admit_health(ctx):  # type: ignore[arg-type]
            assert ctx.cancelled.wait(WAIT_S)
    finally:
        guard.close()


def test_read_deadline_cancels_a_call_whose_request_does_not_arrive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = node_config(tmp_path, node_extra="max_request_read_s = 0.01")
    guard = Guard(config, use_tls=False)
    try:
        ctx = FakeContext("acme-ai")
        with (
            caplog.at_level(logging.WARNING, logger="nodes.guard"),
            guard.admit(ctx, "analyze") as admitted,  # type: ignore[arg-type]
        ):
            with guard.read_deadline(ctx, "analyze", admitted.consumer) as read:  # type: ignore[arg-type]
                assert ctx.cancelled.wait(WAIT_S)
            assert read.fired
            assert not admitted.deadline.expired  # max_request_s (300) is far off
        assert "cancelled analyze by 'acme-ai': request not received within 0.01s" in caplog.text
    finally:
        guard.close()


def test_read_deadline_leaves_a_call_whose_request_arrived(guard: Guard) -> None:
    ctx = FakeContext("acme-ai")
    with guard.read_deadline(ctx, "analyze", "acme-ai") as read:  # type: ignore[arg-type]
        pass  # the request was read at once
    assert not read.fired
    assert not ctx.cancelled.is_set()


# ---------------------------------------------------------------- revocation file


@pytest.fixture
def tls_guard(tmp_path: Path) -> Iterator[tuple[Guard, Path]]:
    pki_dir = tmp_path / "pki"
    ca = pki.init_ca(pki_dir)
    cert, key = pki.issue(pki_dir, name="hong-kong", role="node")
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# nobody yet\n")
    tls = textwrap.dedent(
        f"""
        [tls]
        ca = "{ca}"
        cert = "{cert}"
        key = "{key}"
        revocation = "{revoked}"
        """
    )
    guard = Guard(node_config(tmp_path, tls=tls), use_tls=True)
    yield guard, revoked
    guard.close()


def test_malformed_revocation_file_fails_closed_until_fixed(
    tls_guard: tuple[Guard, Path], caplog: pytest.LogCaptureFixture
) -> None:
    guard, revoked = tls_guard
    assert guard._revocations() == frozenset()
    revoked.write_text("not-a-serial-or-name!\n")
    guard.reload_revocations()  # what SIGHUP does: it must not raise
    assert "refusing every certificate" in caplog.text
    with pytest.raises(UnauthenticatedError, match="cannot read its certificate revocation"):
        guard._revocations()
    revoked.write_text("cn:acme-ai\n")
    guard.reload_revocations()
    assert guard._revocations() == frozenset({"cn:acme-ai"})


def test_deleted_revocation_file_fails_closed(tls_guard: tuple[Guard, Path]) -> None:
    guard, revoked = tls_guard
    revoked.unlink()
    with pytest.raises(UnauthenticatedError, match="revocation file"):
        guard._revocations()  # noticed through the modification time, without SIGHUP
