"""Mutual TLS, consumer identities and node-side authorization, end to end.

Real node processes (``python -m nodes serve``) on 127.0.0.1 with certificates generated for
this module: each refusal comes back with the right status, names its problem, charges
nothing, and leaves the node serving everyone else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from _waits import hold_slots

from federation import (
    Count,
    Histogram,
    Mean,
    NodeBusyError,
    NodeUnavailableError,
    PolicyError,
    Sum,
    UnauthenticatedError,
    parse_filter,
    pki,
)
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.coordinator import Coordinator, NodeClient
from federation.datasets import CREDIT_SCHEMA, synthetic_credit, write_dataset
from federation.local import LocalFederation, node_config_toml
from federation.queries import Mechanism, Query
from federation.releases import BudgetStatus, Release
from federation.wire import AnalyzeRequest

WAIT_S = 20.0  # bound on waiting for a node to report something; never a timing assertion
HK, SZ = "hong-kong", "shenzhen"
BASE: dict[str, object] = {
    "epsilon": 100.0,
    "max_epsilon_per_release": 5.0,
    "operations": ["describe", "analyze"],
}
HK_POLICIES: dict[str, dict[str, object]] = {
    "acme-ai": BASE,
    "beta-labs": BASE,
    "viewer": {**BASE, "operations": ["describe"]},
    "burst": {**BASE, "epsilon": 1000.0, "max_concurrent_requests": 1},
    "cohort": {**BASE, "min_cohort": 1000},
    "revoked-hup": BASE,
    "revoked-mtime": BASE,
    "expired": BASE,
}
SZ_POLICIES: dict[str, dict[str, object]] = {
    "acme-ai": BASE,
    "burst": BASE,
    "cohort": {**BASE, "min_cohort": 0},
}
NOBODY = parse_filter("income < 0")  # incomes are >= 0: an empty cohort


@dataclass
class Env:
    """Two CA-1 nodes (hong-kong, shenzhen) and the consumers' TLS identities."""

    root: Path
    local: LocalFederation
    identities: dict[str, pki.Identity]
    revocation: Path
    macau: LocalFederation  # a node of another federation CA
    revoked: list[str] = field(default_factory=list)

    def address(self, node: str = HK) -> str:
        return self.local.processes[node].address

    def client(self, consumer: str, node: str = HK, *, busy_retries: int = 3) -> NodeClient:
        identity = self.identities[consumer]
        return NodeClient(node, self.address(node), identity=identity, busy_retries=busy_retries)

    def log(self, node: str = HK) -> str:
        return self.local.processes[node].log_path.read_text(errors="replace")

    def budget(self, consumer: str, node: str = HK) -> BudgetStatus:
        client = self.client(consumer, node)
        try:
            return client.describe().budget
        finally:
            client.close()


def _issue(pki_dir: Path, name: str, **kwargs: object) -> pki.Identity:
    cert, key = pki.issue(pki_dir, name=name, role="consumer", **kwargs)  # type: ignore[arg-type]
    return pki.Identity.load(ca=pki_dir / "ca.pem", cert=cert, key=key)


def _node_config(
    root: Path,
    name: str,
    *,
    rows: int,
    seed: int,
    consumers: Mapping[str, Mapping[str, object]],
    tls: Mapping[str, Path] | None,
    listen: str = "127.0.0.1:0",
) -> Path:
    node_dir = root / name
    node_dir.mkdir(parents=True, exist_ok=True)
    frame = synthetic_credit(jurisdiction=name, rows=rows, seed=seed)
    data = write_dataset(frame, node_dir / "credit.parquet", schema=CREDIT_SCHEMA)
    text = node_config_toml(
        name=name,
        jurisdiction=name[:2].upper(),
        data_path=data,
        schema=CREDIT_SCHEMA,
        state_dir=node_dir / "state",
        consumers=consumers,
        tls=tls,
        listen=listen,
    )
    # More worker threads than one consumer's burst, so a refused burst shows the limit.
    path = node_dir / "node.toml"
    path.write_text(text.replace("[node]\n", "[node]\nmax_workers = 16\n", 1))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("mtls")
    pki_dir = root / "pki"
    ca = pki.init_ca(pki_dir, name="federation-ca")
    revocation = root / "revoked.txt"
    revocation.write_text("# serials, fingerprints or cn:<name>, one per line\n")
    configs = {}
    for i, (node, policies) in enumerate(((HK, HK_POLICIES), (SZ, SZ_POLICIES))):
        cert, key = pki.issue(pki_dir, name=node, role="node", hosts=["127.0.0.1", "localhost"])
        tls = {"ca": ca, "cert": cert, "key": key, "revocation": revocation}
        rows = 200_000 if node == HK else 20_000
        configs[node] = _node_config(root, node, rows=rows, seed=i, consumers=policies, tls=tls)
    past = datetime.now(UTC) - timedelta(days=30)
    identities = {
        name: _issue(pki_dir, name) for name in (*HK_POLICIES, "stranger") if name != "expired"
    }
    identities["expired"] = _issue(pki_dir, "expired", not_before=past, validity_days=1)
    # Another federation: its CA signs a node (macau) and a consumer called acme-ai too.
    other = root / "other-pki"
    other_ca = pki.init_ca(other, name="other-ca")
    identities["foreign"] = _issue(other, "acme-ai")
    cert, key = pki.issue(other, name="macau", role="node", hosts=["127.0.0.1"])
    macau_tls = {"ca": other_ca, "cert": cert, "key": key}
    macau_config = _node_config(
        root, "macau", rows=1000, seed=9, consumers={"acme-ai": BASE}, tls=macau_tls
    )
    local = LocalFederation(root, configs, identity=identities["acme-ai"], owns_workdir=False)
    macau = LocalFederation(
        root, {"macau": macau_config}, identity=identities["foreign"], owns_workdir=False
    )
    try:
        local.start()
        macau.start()
        yield Env(root, local, identities, revocation, macau)
    finally:
        local.stop()
        macau.stop()


def _count(epsilon: float = 0.5, query: Query | None = None) -> AnalyzeRequest:
    return AnalyzeRequest(
        query=query or Count("credit"), epsilon=epsilon, delta=0.0, mechanism=Mechanism.LAPLACE
    )


def _raw_call(
    address: str, credentials: grpc.ChannelCredentials | None, *, expected_node: str = HK
) -> grpc.RpcError:
    """Describe over a bare channel and return the error it must fail with."""
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", expected_node)]
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.NodeStub(channel).Describe(pb.DescribeRequest(), timeout=10)
    return info.value


def _refused(call: Callable[[], object], error: type[Exception]) -> str:
    with pytest.raises(error) as info:
        call()
    return str(info.value)


# ---------------------------------------------------------------- the handshake


def test_identity_comes_from_the_certificate(env: Env) -> None:
    with closing(env.client("acme-ai")) as acme, closing(env.client("beta-labs")) as beta:
        assert acme.describe().consumer == "acme-ai"
        assert beta.describe().consumer == "beta-labs"


def test_client_trusting_another_ca_fails_the_handshake(env: Env) -> None:
    foreign = env.identities["foreign"]
    err = _raw_call(env.address(), pki.channel_credentials(foreign))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    with closing(NodeClient(HK, env.address(), identity=foreign)) as client:
        message = _refused(client.describe, NodeUnavailableError)
    assert f"TLS handshake with node 'hong-kong' at {env.address()} failed" in message
    assert "not signed by the CA this coordinator trusts" in message
    assert env.budget("acme-ai").epsilon == 100.0  # the node still serves its consumers


def test_tls_client_against_a_node_with_another_ca(env: Env) -> None:
    address, acme = env.macau.processes["macau"].address, env.identities["acme-ai"]
    err = _raw_call(address, pki.channel_credentials(acme), expected_node="macau")
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    with closing(NodeClient("macau", address, identity=acme)) as client:
        message = _refused(client.describe, NodeUnavailableError)
    assert "TLS handshake with node 'macau'" in message
    assert "not signed by the CA this coordinator trusts" in message


def test_expired_client_certificate_is_refused_by_the_node(env: Env) -> None:
    expired = env.identities["expired"]
    err = _raw_call(env.address(), pki.channel_credentials(expired))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    with closing(NodeClient(HK, env.address(), identity=expired)) as client:
        message = _refused(client.describe, NodeUnavailableError)
    assert "TLS handshake with node 'hong-kong'" in message
    assert "this client's certificate 'expired'" in message
    assert "expired at" in message
    assert env.budget("acme-ai").epsilon == 100.0  # everyone else is still served


def test_wrong_node_name_fails_and_names_the_expected_name(env: Env) -> None:
    # The coordinator expects shenzhen at this address, but hong-kong answers.
    acme = env.identities["acme-ai"]
    err = _raw_call(env.address(HK), pki.channel_credentials(acme), expected_node=SZ)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    with Coordinator.from_addresses({SZ: env.address(HK)}, identity=acme) as fed:
        message = _refused(fed.describe, NodeUnavailableError)
    assert "TLS handshake with node 'shenzhen'" in message
    assert "not valid for the name 'shenzhen'" in message


def test_plaintext_client_against_a_tls_node(env: Env) -> None:
    err = _raw_call(env.address(), None)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    with closing(NodeClient(HK, env.address(), consumer="acme-ai")) as client:
        message = _refused(client.describe, NodeUnavailableError)
    assert "plaintext client" in message
    assert "[tls]" in message


# ---------------------------------------------------------------- revocation


def _write_keeping_mtime(path: Path, text: str) -> None:
    """Rewrite ``path`` but restore its modification time: only SIGHUP can reveal it."""
    before = path.stat()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _write_changing_mtime(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its modification time on by a second (coarse clocks too)."""
    before = path.stat()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def _revocation_text(env: Env) -> str:
    return "# revoked by the operator\n" + "".join(f"{entry}\n" for entry in env.revoked)


def _wait_for_log(env: Env, pattern: str, *, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(re.findall(pattern, env.log())) < count:
        assert time.monotonic() < deadline, f"the node never logged {pattern!r}"
        time.sleep(0.05)


def test_revoked_consumer_is_cut_off_on_sighup(env: Env) -> None:
    loaded = len(re.findall("revocation list loaded", env.log()))
    with closing(env.client("revoked-hup")) as client:
        client.describe()
        env.revoked.append("cn:revoked-hup")
        _write_keeping_mtime(env.revocation, _revocation_text(env))
        client.describe()  # the file changed but the node has not re-read it yet
        env.local.processes[HK].process.send_signal(signal.SIGHUP)
        _wait_for_log(env, "revocation list loaded", count=loaded + 1)
        message = _refused(client.describe, UnauthenticatedError)
    assert "client certificate for 'revoked-hup'" in message
    assert "is revoked" in message
    assert env.budget("acme-ai").epsilon == 100.0  # the others are still served


def test_revoked_consumer_is_cut_off_when_the_file_changes(env: Env) -> None:
    revoked = env.identities["revoked-mtime"]
    with closing(env.client("revoked-mtime")) as client:
        before = client.describe().budget
        client.analyze(_count())
        env.revoked.append(pki.serial_hex(revoked.cert_pem))  # by serial number this time
        _write_changing_mtime(env.revocation, _revocation_text(env))
        message = _refused(lambda: client.analyze(_count()), UnauthenticatedError)
        describe = _refused(client.describe, UnauthenticatedError)
    assert "'revoked-mtime'" in message
    assert "is revoked" in message
    assert "is revoked" in describe
    assert "refused analyze" in env.log()
    # Nothing was charged for the refused request: only the first analyze counts. (Taking
    # the line out of the file restores access, long enough to read the budget.)
    env.revoked.remove(pki.serial_hex(revoked.cert_pem))
    _write_changing_mtime(env.revocation, _revocation_text(env))
    assert env.budget("revoked-mtime").releases == before.releases + 1
    env.revoked.append(pki.serial_hex(revoked.cert_pem))
    _write_changing_mtime(env.revocation, _revocation_text(env))


def test_unusable_revocation_file_refuses_everyone_until_fixed(env: Env) -> None:
    try:
        _write_changing_mtime(env.revocation, "this is not a revocation entry\n")
        with closing(env.client("acme-ai")) as client:
            message = _refused(client.describe, UnauthenticatedError)
        assert "cannot read its certificate revocation file" in message
        assert "refusing every certificate" in env.log()
    finally:
        _write_changing_mtime(env.revocation, _revocation_text(env))
    assert env.budget("acme-ai").epsilon == 100.0


# ---------------------------------------------------------------- policy


def test_consumer_cannot_spend_or_read_another_consumers_budget(env: Env) -> None:
    b_before = env.budget("beta-labs")
    a_before = env.budget("acme-ai")
    with closing(env.client("acme-ai")) as acme:
        for _ in range(3):
            acme.analyze(_count(0.5))
        description = acme.describe()
    assert description.consumer == "acme-ai"
    assert description.budget.releases == a_before.releases + 3
    # The plaintext header that names a consumer means nothing over TLS.
    address, acme_id = env.address(), env.identities["acme-ai"]
    options = [("grpc.ssl_target_name_override", HK)]
    with grpc.secure_channel(address, pki.channel_credentials(acme_id), options=options) as ch:
        request = pb.AnalyzeRequest(
            query=pb.Query(kind=pb.QUERY_KIND_COUNT, dataset="credit"),
            epsilon=0.5,
            mechanism=pb.MECHANISM_LAPLACE,
        )
        response = pb_grpc.NodeStub(ch).Analyze(
            request, timeout=10, metadata=(("x-federation-consumer", "beta-labs"),)
        )
    assert response.receipt.consumer == "acme-ai"
    assert env.budget("acme-ai").releases == a_before.releases + 4
    b_after = env.budget("beta-labs")
    assert (b_after.releases, b_after.spent_epsilon) == (b_before.releases, b_before.spent_epsilon)


def test_no_request_field_can_name_a_consumer() -> None:
    requests = (pb.DescribeRequest, pb.AnalyzeRequest, pb.Query, pb.TrainRequest, pb.TrainConfig)
    for message in requests:
        names = {f.name for f in message.DESCRIPTOR.fields}
        assert not any("consumer" in n for n in names), (message.__name__, names)


def test_disallowed_operation_is_denied_charges_nothing_and_is_logged(env: Env) -> None:
    with closing(env.client("viewer")) as viewer:
        before = viewer.describe().budget
        message = _refused(lambda: viewer.analyze(_count()), PolicyError)
        after = viewer.describe().budget
    assert "consumer 'viewer' may not analyze on node 'hong-kong'; allowed: describe" in message
    assert (after.releases, after.spent_epsilon) == (before.releases, before.spent_epsilon)
    assert re.search(
        r"refused analyze: consumer 'viewer' may not analyze.*PERMISSION_DENIED", env.log()
    )


def test_unknown_consumer_is_denied_and_logged(env: Env) -> None:
    with closing(env.client("stranger")) as stranger:
        message = _refused(stranger.describe, PolicyError)
        _refused(lambda: stranger.analyze(_count()), PolicyError)
    assert "consumer 'stranger' is not in node 'hong-kong'" in message
    assert re.search(r"refused describe: consumer 'stranger' is not in node", env.log())


def test_a_node_certificate_cannot_act_as_a_consumer_of_the_same_name(env: Env) -> None:
    # Issued by the federation CA for a node, with the name of a real consumer: a node's
    # key (held on another machine, by another operator) must not spend acme-ai's budget.
    pki_dir = env.root / "pki"
    cert, key = pki.issue(
        pki_dir, name="acme-ai", role="node", hosts=["127.0.0.1"], out_dir=env.root / "impostor"
    )
    identity = pki.Identity.load(ca=pki_dir / "ca.pem", cert=cert, key=key)
    before = env.budget("acme-ai")
    with closing(NodeClient(HK, env.address(), identity=identity)) as impostor:
        message = _refused(impostor.describe, PolicyError)
        _refused(lambda: impostor.analyze(_count()), PolicyError)
    assert "certificate for 'acme-ai' may serve TLS (a node's, or one without" in message
    assert "a consumer needs its own (`federation certs issue --role consumer" in message
    assert env.budget("acme-ai") == before


# ---------------------------------------------------------------- request limits


def test_a_node_still_busy_after_retries_counts_like_an_unreachable_one(env: Env) -> None:
    # 'burst' may run one request at a time at hong-kong. A withheld call holds that slot
    # for longer than the client's retries last, so hong-kong's Describe stays busy and its
    # schema cannot be checked: the query is never sent there. Needing both nodes, it fails
    # before shenzhen pays; with min_nodes=1, shenzhen answers (charged once).
    before = {node: env.budget("burst", node) for node in (HK, SZ)}
    until = threading.Event()

    def withheld() -> Iterator[bytes]:
        until.wait(60)
        yield from ()

    credentials = pki.channel_credentials(env.identities["burst"])
    options = [("grpc.ssl_target_name_override", HK)]
    asked: list[str] = []
    with grpc.secure_channel(env.address(HK), credentials, options=options) as channel:
        call = channel.stream_unary("/federation.v1.Node/Analyze", request_serializer=None)
        held: list[grpc.Future] = []
        try:
            with closing(env.client("burst", busy_retries=0)) as probe:
                held = hold_slots(
                    lambda: call.future(withheld(), timeout=60),
                    1,
                    probe,
                    within_s=20,
                    problem="the call never took the slot",
                )
            addresses = {HK: env.address(HK), SZ: env.address(SZ)}
            with Coordinator.from_addresses(addresses, identity=env.identities["burst"]) as fed:
                hong_kong = fed.clients[HK]
                hong_kong.busy_retries = 1  # one short retry: well within the slot's hold
                analyze = hong_kong.analyze

                def spy(request: AnalyzeRequest) -> Release:
                    asked.append(HK)
                    return analyze(request)

                hong_kong.analyze = spy  # type: ignore[method-assign]
                with pytest.raises(NodeUnavailableError, match="only 1 of 2 nodes answered"):
                    fed.analyze(Count("credit"), epsilon=0.01)
                assert env.budget("burst", SZ).releases == before[SZ].releases  # nobody paid
                result = fed.analyze(Count("credit"), epsilon=0.01, min_nodes=1)
        finally:
            until.set()
            for one in held:
                one.cancel()
    assert result.missing == (HK,)
    assert [n.node for n in result.nodes] == [SZ]
    assert asked == []  # the query never went to hong-kong
    after = {node: env.budget("burst", node) for node in (HK, SZ)}
    assert after[SZ].releases == before[SZ].releases + 1
    assert after[HK].releases == before[HK].releases
    assert after[HK].spent_epsilon == before[HK].spent_epsilon


def test_consumer_over_its_concurrency_limit_is_refused_while_others_are_served(
    env: Env,
) -> None:
    burst_before = env.budget("burst")
    beta_before = env.budget("beta-labs")
    heavy = _count(0.01, Histogram("credit", "income", bins=64, group_by="housing"))
    outcomes: list[str] = []
    refusals: list[str] = []
    beta_answers: list[Release] = []
    beta_errors: list[Exception] = []
    stop = threading.Event()

    def beta_loop() -> None:
        with closing(env.client("beta-labs")) as beta:
            while not stop.is_set():
                try:
                    beta_answers.append(beta.analyze(_count(0.01)))
                except Exception as err:  # noqa: BLE001 - reported by the assertion below
                    beta_errors.append(err)
                    return

    # No retries: this test wants to see the refusals themselves.
    burst_client = env.client("burst", busy_retries=0)
    with closing(burst_client) as burst, ThreadPoolExecutor(max_workers=8) as pool:

        def one(barrier: threading.Barrier) -> str:
            barrier.wait()
            try:
                burst.analyze(heavy)
            except NodeBusyError as err:  # not BudgetExhaustedError: retry, budget is fine
                refusals.append(str(err))
                return "refused"
            return "answered"

        other = threading.Thread(target=beta_loop)
        other.start()
        try:
            for _ in range(20):  # 8 requests at once; almost always the first round refuses
                barrier = threading.Barrier(8)
                outcomes += pool.map(one, [barrier] * 8)
                if "refused" in outcomes:
                    break
        finally:
            stop.set()
            other.join()
    assert "refused" in outcomes
    assert "answered" in outcomes
    for message in refusals:
        assert "too many concurrent requests for consumer 'burst'" in message
        assert "(limit 1); nothing was charged" in message
    assert not beta_errors
    assert beta_answers
    burst_after = env.budget("burst")
    assert burst_after.releases == burst_before.releases + outcomes.count("answered")
    assert burst_after.spent_epsilon == pytest.approx(
        burst_before.spent_epsilon + 0.01 * outcomes.count("answered")
    )
    assert env.budget("beta-labs").releases == beta_before.releases + len(beta_answers)


# ---------------------------------------------------------------- min_cohort


def test_min_cohort_suppresses_small_cohorts_at_the_node(env: Env) -> None:
    with closing(env.client("cohort")) as cohort:
        before = cohort.describe().budget
        everyone = cohort.analyze(_count(1.0))
        nobody = cohort.analyze(_count(1.0, Count("credit", where=NOBODY)))
        mean = cohort.analyze(_count(1.0, Mean("credit", "income", where=NOBODY)))
        students = parse_filter("employment != 'student'")
        hist = cohort.analyze(_count(1.0, Histogram("credit", "employment", where=students)))
        total = cohort.analyze(_count(1.0, Sum("credit", "income")))
        after = cohort.describe().budget
    assert everyone.groups[0].measurement("count").values[0] > 100_000
    assert all(v != v for v in nobody.groups[0].measurement("count").values)  # NaN
    assert all(v != v for m in mean.groups[0].measurements for v in m.values)
    bins = dict(zip(hist.bin_labels, hist.groups[0].measurement("bins").values, strict=True))
    assert bins["student"] != bins["student"]  # the empty cell is withheld
    assert all(v == v for label, v in bins.items() if label != "student")
    # A guarded sum buys its count with a share of the epsilon asked for, not more.
    assert [m.name for m in total.groups[0].measurements] == ["sum", "count"]
    assert total.cost_epsilon == pytest.approx(1.0)
    # Suppression is post-processing of a release that happened: each one is charged.
    assert after.releases == before.releases + 5


def test_a_group_suppressed_at_any_node_is_reported_suppressed(env: Env) -> None:
    addresses = {HK: env.address(HK), SZ: env.address(SZ)}
    with Coordinator.from_addresses(addresses, identity=env.identities["cohort"]) as fed:
        empty = fed.analyze(Count("credit", where=NOBODY), epsilon=1.0)
        full = fed.analyze(Count("credit"), epsilon=1.0)
    # hong-kong guards this consumer with min_cohort=1000, shenzhen does not guard it.
    assert empty.estimate().suppressed
    assert empty.to_dict()["groups"][0]["estimates"][0]["value"] is None  # type: ignore[index]
    assert not full.estimate().suppressed
    assert full.value > 200_000


# ---------------------------------------------------------------- plaintext


def _serve(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodes", "serve", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_node_off_loopback_without_tls_refuses_to_start_even_with_insecure(
    tmp_path: Path,
) -> None:
    config = _node_config(
        tmp_path,
        "exposed",
        rows=100,
        seed=0,
        consumers={"acme-ai": BASE},
        tls=None,
        listen="0.0.0.0:0",
    )
    done = _serve(config, "--insecure")
    assert done.returncode == 2
    assert "node 'exposed' has no [tls] section" in done.stderr
    assert "plaintext is only allowed on a loopback address with --insecure" in done.stderr
    assert "0.0.0.0:0" in done.stderr
    assert '"serving"' not in done.stdout


def test_plaintext_on_loopback_needs_insecure(tmp_path: Path) -> None:
    config = _node_config(
        tmp_path, "laptop", rows=500, seed=0, consumers={"acme-ai": BASE}, tls=None
    )
    done = _serve(config)
    assert done.returncode == 2
    assert "has no [tls] section" in done.stderr
    local = LocalFederation(
        tmp_path, {"laptop": config}, identity=None, consumer="acme-ai", owns_workdir=False
    )
    with local as fed:  # LocalFederation passes --insecure when it has no identity
        assert fed.describe()["laptop"].consumer == "acme-ai"
