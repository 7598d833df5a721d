"""Slow-loris callers, end to end: a certificate holder that opens calls and withholds their
requests holds only its own slots, is cut off at the read deadline, is charged nothing, and
never stalls another consumer; health calls, which any certificate may make, have a
node-wide limit too.

One real node process on 127.0.0.1 with mutual TLS, 16 worker threads (so 4 health calls at
once), a 3 s server-side deadline and a 2 s read deadline. gRPC Python reads a unary request
before any handler runs, so without admission before the read, the withheld calls below
would hold every worker thread until connection age cut them off, and nobody else would be
served in the meantime.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from _waits import hold_slots
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation import pki
from federation._proto.v1 import node_pb2 as pb
from federation.coordinator import NodeClient
from federation.datasets import CREDIT_SCHEMA, synthetic_credit, write_dataset
from federation.errors import REFUSAL_KEY
from federation.local import LocalFederation, node_config_toml
from federation.queries import Count, Mechanism
from federation.releases import BudgetStatus
from federation.wire import AnalyzeRequest
from nodes.limits import HEALTH_MAX_CONCURRENT, health_total_limit

WAIT_S = 20.0  # bound on waiting for the node to do something; never a timing assertion
NODE = "hong-kong"
MAX_WORKERS = 16
MAX_REQUEST_S = 3.0
MAX_REQUEST_READ_S = 2.0  # shorter than max_request_s: the log says which cut a call off
HEALTH_TOTAL = health_total_limit(MAX_WORKERS)
SLOW_LIMIT = 2  # the slow consumer's max_concurrent_requests
CALLS = 8  # withheld calls the slow consumer opens at once
BASE: dict[str, object] = {"epsilon": 100.0, "operations": ["describe", "analyze"]}
POLICIES: dict[str, dict[str, object]] = {
    "acme-ai": {**BASE, "max_concurrent_requests": 2},
    "slow": {
        **BASE,
        "operations": ["describe", "analyze", "train"],
        "max_concurrent_requests": SLOW_LIMIT,
    },
}
# Certificates of the federation with no policy entry on the node (one more than the
# node-wide health limit), and one the node's operator has revoked.
NOBODIES = tuple(f"nobody-{i}" for i in range(HEALTH_TOTAL + 1))
REVOKED = "revoked"
ANALYZE = "/federation.v1.Node/Analyze"
DESCRIBE = "/federation.v1.Node/Describe"
CHECK = "/grpc.health.v1.Health/Check"
TRAIN = "/federation.v1.Node/Train"
Call = Any  # what stream_unary(...).future() returns: a grpc.Future that is also a grpc.Call
CUT_OFF = {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}


@dataclass
class Env:
    local: LocalFederation
    identities: dict[str, pki.Identity]

    @property
    def address(self) -> str:
        return self.local.processes[NODE].address

    def log(self) -> str:
        return self.local.processes[NODE].log_path.read_text(errors="replace")

    def client(self, consumer: str, *, busy_retries: int = 0) -> NodeClient:
        identity = self.identities[consumer]
        return NodeClient(NODE, self.address, identity=identity, busy_retries=busy_retries)

    def channel(self, consumer: str) -> grpc.Channel:
        credentials = pki.channel_credentials(self.identities[consumer])
        options = [("grpc.ssl_target_name_override", NODE)]
        return grpc.secure_channel(self.address, credentials, options=options)

    def budget(self, consumer: str) -> BudgetStatus:
        with closing(self.client(consumer)) as client:
            return client.describe().budget


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("slow")
    pki_dir = root / "pki"
    ca = pki.init_ca(pki_dir, name="federation-ca")
    cert, key = pki.issue(pki_dir, name=NODE, role="node", hosts=["127.0.0.1", "localhost"])
    revocation = root / "revoked.txt"
    revocation.write_text(f"cn:{REVOKED}\n")
    frame = synthetic_credit(jurisdiction=NODE, rows=1000, seed=0)
    data = write_dataset(frame, root / "credit.parquet", schema=CREDIT_SCHEMA)
    text = node_config_toml(
        name=NODE,
        jurisdiction="HK",
        data_path=data,
        schema=CREDIT_SCHEMA,
        state_dir=root / "state",
        consumers=POLICIES,
        tls={"ca": ca, "cert": cert, "key": key, "revocation": revocation},
    )
    # 16 workers: the slow consumer may hold 2 requests and all health calls 4; 10 are left.
    node_extra = (
        f"[node]\nmax_workers = {MAX_WORKERS}\nmax_request_s = {MAX_REQUEST_S}\n"
        f"max_request_read_s = {MAX_REQUEST_READ_S}\n"
    )
    config = root / "node.toml"
    config.write_text(text.replace("[node]\n", node_extra, 1))
    identities = {}
    for name in (*POLICIES, "stranger", *NOBODIES, REVOKED):
        cert, key = pki.issue(pki_dir, name=name, role="consumer")
        identities[name] = pki.Identity.load(ca=ca, cert=cert, key=key)
    local = LocalFederation(
        root, {NODE: config}, identity=identities["acme-ai"], owns_workdir=False
    )
    try:
        local.start()
        yield Env(local, identities)
    finally:
        local.stop()


def _count() -> AnalyzeRequest:
    return AnalyzeRequest(
        query=Count("credit"), epsilon=0.5, delta=0.0, mechanism=Mechanism.LAPLACE
    )


def _withheld(until: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing (not even its end) until ``until`` is set."""
    until.wait()
    yield from ()


def _open_withheld(
    channel: grpc.Channel,
    method: str,
    parse: Callable[[bytes], Any],
    until: threading.Event,
    *,
    count: int = CALLS,
) -> list[Call]:
    """Open ``count`` calls of ``method`` whose headers go out but whose request never does."""
    call = channel.stream_unary(method, request_serializer=None, response_deserializer=parse)
    return [call.future(_withheld(until), timeout=60) for _ in range(count)]


def _wait_done(calls: Sequence[Call], count: int, problem: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while sum(c.done() for c in calls) < count:
        assert time.monotonic() < deadline, problem
        time.sleep(0.05)


def _outcomes(calls: Sequence[Call]) -> tuple[list[Call], list[Call]]:
    """Wait until every call has ended; return the refused ones and the cut-off ones."""
    _wait_done(calls, len(calls), "the node never cut off the withheld calls")
    refused = [c for c in calls if c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
    cut_off = [c for c in calls if c not in refused]
    # CANCELLED by the node's deadline; UNAVAILABLE when the connection, told to go away at
    # max_request_s too, closes as its last call goes. The node's log says which did it.
    assert {c.code() for c in cut_off} <= CUT_OFF
    return refused, cut_off


def _assert_refused(calls: Sequence[Call], message: str) -> None:
    for call in calls:
        assert call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert message in call.details()
        # Marked busy, so clients raise NodeBusyError (retry), not BudgetExhaustedError.
        assert (REFUSAL_KEY, "busy") in tuple(call.trailing_metadata() or ())


def test_withheld_requests_hold_only_their_own_slots_and_are_cut_off(env: Env) -> None:
    with closing(env.client("acme-ai")) as acme:
        acme.describe()  # warm: handshake and accountant loaded before the slow calls
        before = (acme.analyze(_count()).budget.releases, env.budget("slow"))
        until = threading.Event()
        with env.channel("slow") as channel:
            try:
                calls = _open_withheld(channel, ANALYZE, pb.AnalyzeResponse.FromString, until)
                _wait_done(calls, CALLS - SLOW_LIMIT, "the node never refused the calls")
                # The other consumer is served whether or not the withheld calls are open.
                assert acme.describe().consumer == "acme-ai"
                release = acme.analyze(_count())
                refused, cut_off = _outcomes(calls)
            finally:
                until.set()
    # Only SLOW_LIMIT calls were admitted, and cut off; the others were refused at once.
    assert len(cut_off) == SLOW_LIMIT
    _assert_refused(refused, "too many concurrent requests for consumer 'slow'")
    assert release.budget.releases == before[0] + 1
    # The read deadline cut them off, not max_request_s (which is longer).
    log = env.log()
    read_limit = f"request not received within {MAX_REQUEST_READ_S:g}s"
    assert len(re.findall(rf"cancelled analyze by 'slow': {read_limit}", log)) >= SLOW_LIMIT
    assert "cancelled analyze by 'slow': still running" not in log
    # Nothing read, nothing charged: refusals and cut-offs alike.
    slow = env.budget("slow")
    assert (slow.releases, slow.spent_epsilon) == (before[1].releases, before[1].spent_epsilon)


def test_a_client_retries_a_busy_node_and_is_served_once_a_slot_frees(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # 'slow' may run 2 requests at once. Two withheld calls hold both slots until the read
    # deadline (2 s) cuts them off; an Analyze meanwhile is refused busy, nothing charged,
    # and the client's retries (about 0.2, 0.6, 1.8, 5.4 s) get it served: charged once.
    caplog.set_level(logging.INFO, logger="federation.coordinator.client")
    until = threading.Event()
    before = env.budget("slow")
    with (
        env.channel("slow") as channel,
        closing(env.client("slow", busy_retries=0)) as probe,
        closing(env.client("slow", busy_retries=4)) as client,
    ):
        client.timeout_s = WAIT_S
        client.describe()  # connected before the slots are taken: its first try comes at once
        call = channel.stream_unary(
            ANALYZE, request_serializer=None, response_deserializer=pb.AnalyzeResponse.FromString
        )
        try:
            calls = hold_slots(
                lambda: call.future(_withheld(until), timeout=60),
                SLOW_LIMIT,
                probe,
                within_s=WAIT_S,
                problem="the calls never took the slots",
            )
            release = client.analyze(_count())
            # Let the read deadline end every withheld call before their streams are let go.
            _wait_done(calls, len(calls), "the node never cut off the withheld calls")
        finally:
            until.set()
        _outcomes(calls)
    assert release.budget.releases == before.releases + 1
    assert release.budget.spent_epsilon == pytest.approx(before.spent_epsilon + 0.5)
    # The first try was refused busy: a retry served it.
    assert f"node {NODE} is busy; retry 1 of 4" in caplog.text


def test_withheld_health_checks_hold_only_their_own_slots(env: Env) -> None:
    until = threading.Event()
    request = health_pb2.HealthCheckRequest(service="")
    with (
        env.channel("slow") as slow,
        env.channel("stranger") as stranger,
        env.channel("acme-ai") as acme,
    ):
        watch = health_pb2_grpc.HealthStub(acme).Watch(request, timeout=WAIT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        try:
            calls = _open_withheld(slow, CHECK, health_pb2.HealthCheckResponse.FromString, until)
            _wait_done(calls, CALLS - HEALTH_MAX_CONCURRENT, "the node never refused the calls")
            # Any certificate of the federation may check health, policy entry or not.
            reply = health_pb2_grpc.HealthStub(stranger).Check(request, timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with closing(env.client("acme-ai")) as client:
                assert client.describe().consumer == "acme-ai"
            refused, cut_off = _outcomes(calls)
        finally:
            until.set()
        with pytest.raises(grpc.RpcError) as info:
            next(watch)  # no status change: the node ends the stream at its deadline
        assert info.value.code() in CUT_OFF
    assert len(cut_off) == HEALTH_MAX_CONCURRENT
    _assert_refused(refused, "too many concurrent health calls for consumer 'slow'")
    log = env.log()
    read_limit = f"request not received within {MAX_REQUEST_READ_S:g}s"
    cut = re.findall(rf"cancelled health by 'slow': {read_limit}", log)
    assert len(cut) >= HEALTH_MAX_CONCURRENT
    # A health call's deadline: min(HEALTH_CALL_S, max_request_s).
    assert f"cancelled health by 'acme-ai': still running after {MAX_REQUEST_S:g}s" in log


def test_health_calls_of_all_certificates_together_have_a_node_wide_limit(env: Env) -> None:
    until = threading.Event()
    parse = health_pb2.HealthCheckResponse.FromString
    with ExitStack() as stack:
        # More identities than the node-wide limit, each within its own limit.
        channels = [stack.enter_context(env.channel(name)) for name in NOBODIES]
        try:
            calls = [
                call
                for channel in channels
                for call in _open_withheld(
                    channel, CHECK, parse, until, count=HEALTH_MAX_CONCURRENT
                )
            ]
            _wait_done(calls, len(calls) - HEALTH_TOTAL, "the node never refused the calls")
            # The consumers' worker threads are not theirs to take.
            with closing(env.client("acme-ai")) as client:
                assert client.describe().consumer == "acme-ai"
            refused, cut_off = _outcomes(calls)
        finally:
            until.set()
    assert len(refused) >= len(calls) - HEALTH_TOTAL
    _assert_refused(
        refused, f"too many concurrent health calls on node '{NODE}' (limit {HEALTH_TOTAL},"
    )
    cut = re.findall(r"cancelled health by 'nobody-\d+': request not received", env.log())
    assert len(cut) >= len(cut_off)


def test_a_caller_without_a_policy_entry_is_refused_before_its_request_is_read(
    env: Env,
) -> None:
    until = threading.Event()
    with env.channel("stranger") as channel:
        try:
            calls = _open_withheld(channel, DESCRIBE, pb.DescribeResponse.FromString, until)
            _wait_done(calls, CALLS, "the node never refused the stranger")
        finally:
            until.set()
    for call in calls:
        assert call.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"consumer 'stranger' is not in node '{NODE}'" in call.details()


def test_a_revoked_certificate_may_not_check_health(env: Env) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    with env.channel(REVOKED) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(request, timeout=WAIT_S)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED  # not taken for anonymous
    details = info.value.details() or ""
    assert f"client certificate for '{REVOKED}'" in details
    assert "is revoked" in details
    assert f"refused health Check: client certificate for '{REVOKED}'" in env.log()


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "Describe takes exactly one request message; this call sent none"),
        ([b"", b""], "Describe takes exactly one request message; this call sent more than one"),
        ([b"\xff\xff\xff"], "Describe: the request message (3 bytes) does not parse"),
    ],
)
def test_describe_needs_exactly_one_valid_request_message(
    env: Env, messages: list[bytes], problem: str
) -> None:
    with env.channel("acme-ai") as channel:
        call = channel.stream_unary(DESCRIBE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(iter(messages), timeout=WAIT_S)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (info.value.details() or "")
    assert f"refused describe: {problem}" in env.log()


def test_a_train_stream_withholding_its_opening_message_is_cut_off_at_the_read_limit(
    env: Env,
) -> None:
    until = threading.Event()
    with env.channel("slow") as channel:
        call = channel.stream_stream(TRAIN, request_serializer=None, response_deserializer=None)
        responses = call(_withheld(until), timeout=60)
        try:
            with pytest.raises(grpc.RpcError) as info:
                next(responses)
        finally:
            until.set()
    assert info.value.code() in CUT_OFF  # type: ignore[attr-defined]
    read_limit = f"request not received within {MAX_REQUEST_READ_S:g}s"
    assert f"cancelled train by 'slow': {read_limit}" in env.log()
