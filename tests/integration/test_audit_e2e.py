"""Audit and receipts end to end: real node processes, SIGKILL, tampering, the commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import BudgetExhaustedError, Count, FederationError, Mean
from federation.coordinator import Coordinator, QueryResult
from federation.local import LocalFederation
from federation.queries import Mechanism
from federation.receipts import ReceiptRecord, find_receipt_records, verify_records
from federation.wire import AnalyzeRequest
from nodes.audit import iter_entries, open_state_dir
from nodes.audit_verify import check_receipts, verify_chain

LAPLACE = Mechanism.LAPLACE

QUERIES_BEFORE_KILL = 6
QUERIES_AFTER_KILL = 4
MAX_QUERIES = 200


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def synthetic(workdir: Path, nodes: tuple[str, ...] = ("hong-kong", "shenzhen")) -> LocalFederation:
    return LocalFederation.synthetic(
        nodes, rows=2000, epsilon=100.0, max_epsilon_per_release=1.0, workdir=workdir
    )


@pytest.fixture
def small_fed(tmp_path: Path) -> Iterator[LocalFederation]:
    """Two nodes of its own, for a test that kills or tampers."""
    local = synthetic(tmp_path / "fed")
    local.start()
    yield local
    local.stop()


@pytest.fixture(scope="module")
def audited_fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Two nodes shared by the tests that only query (starting nodes takes seconds)."""
    local = synthetic(tmp_path_factory.mktemp("audited") / "fed")
    local.start()
    yield local
    local.stop()


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[LocalFederation]:
    local = synthetic(tmp_path / "fed", nodes=("hong-kong",))
    local.start()
    yield local
    local.stop()


def state_dir(local: LocalFederation, node: str) -> Path:
    return local.workdir / node / "state"


def received_records(results: list[QueryResult], node: str) -> list[ReceiptRecord]:
    records = [n.receipt_record() for r in results for n in r.nodes if n.node == node]
    return [r for r in records if r is not None]


class QueryStream:
    """Fire queries from a thread; signal after the first few and after a few more."""

    def __init__(self, fed: Coordinator) -> None:
        self.fed = fed
        self.results: list[QueryResult] = []
        self.errors: list[FederationError] = []
        self.warmed_up = threading.Event()
        self.killed = threading.Event()
        self.done = threading.Event()
        self._after_kill = 0
        self.thread = threading.Thread(target=self._fire, daemon=True)

    def _fire(self) -> None:
        for i in range(MAX_QUERIES):
            if self.done.is_set():
                break
            try:
                result = self.fed.analyze(
                    Count("credit", group_by="housing"), epsilon=0.01 * (1 + i % 3), min_nodes=1
                )
            except FederationError as err:
                self.errors.append(err)
                continue
            self.results.append(result)
            if len(self.results) >= QUERIES_BEFORE_KILL:
                self.warmed_up.set()
            if self.killed.is_set():
                self._after_kill += 1
                if self._after_kill >= QUERIES_AFTER_KILL:
                    self.done.set()
        self.warmed_up.set()
        self.done.set()


def test_sigkill_mid_stream_leaves_every_received_release_audited(
    small_fed: LocalFederation,
) -> None:
    fed = small_fed.coordinator
    assert fed is not None
    ca_pem = (small_fed.workdir / "pki" / "ca.pem").read_bytes()
    stream = QueryStream(fed)
    stream.thread.start()
    assert stream.warmed_up.wait(timeout=300)
    small_fed.processes["shenzhen"].kill()  # SIGKILL, while queries are in flight
    stream.killed.set()
    assert stream.done.wait(timeout=300)
    stream.thread.join(timeout=60)
    assert any(n.node == "shenzhen" for r in stream.results for n in r.nodes)
    assert any(r.missing == ("shenzhen",) for r in stream.results)

    for node in ("shenzhen", "hong-kong"):
        records = received_records(stream.results, node)
        conn = open_state_dir(state_dir(small_fed, node))
        verification = verify_chain(conn, ca_pem=ca_pem)
        assert verification.is_intact, verification.problems
        charged = sum(
            float(str(e.fields["epsilon"])) for e in iter_entries(conn) if e.kind == "charge"
        )
        assert charged >= sum(r.receipt.epsilon for r in records) - 1e-12
        assert check_receipts(conn, records) == []
        assert all(failure is None for _, failure in verify_records(records, ca_pem=ca_pem))
        conn.close()

    # The killed node's chain is intact, so it starts again without an override.
    small_fed.restart("shenzhen")
    assert small_fed.coordinator is not None
    assert small_fed.coordinator.describe()["shenzhen"].receipt_key_pem.startswith(b"-----BEGIN")


def test_refusal_is_audited_with_its_reason_and_costs_nothing(audited_fed: LocalFederation) -> None:
    fed = audited_fed.coordinator
    assert fed is not None
    before = fed.budgets()["hong-kong"]
    # Straight to the node: Coordinator.analyze would not even ask a node whose Describe
    # shows a per-release cap below the epsilon.
    with pytest.raises(BudgetExhaustedError):
        fed.clients["hong-kong"].analyze(AnalyzeRequest(Count("credit"), 5.0, 0.0, LAPLACE))
    assert fed.budgets()["hong-kong"] == before
    conn = open_state_dir(state_dir(audited_fed, "hong-kong"))
    refused = [e for e in iter_entries(conn) if e.kind == "refused"]
    conn.close()
    assert [(e.consumer, e.operation, e.fields["code"]) for e in refused] == [
        ("local-researcher", "analyze", "RESOURCE_EXHAUSTED")
    ]
    assert "per-release cap" in str(refused[0].fields["reason"])


def test_node_refuses_a_broken_chain_unless_told_and_records_the_override(
    one_node: LocalFederation,
) -> None:
    fed = one_node.coordinator
    assert fed is not None
    fed.analyze(Count("credit"), epsilon=0.1)
    fed.analyze(Count("credit"), epsilon=0.1)
    node = one_node.processes["hong-kong"]
    node.stop()
    state = state_dir(one_node, "hong-kong")
    with sqlite3.connect(state / "ledger.sqlite", isolation_level=None) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 3")  # as an attacker editing the file
    conn.close()
    serve = [sys.executable, "-m", "nodes", "serve", "--config", str(node.config_path)]
    refused = subprocess.run(serve, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2
    assert "audit chain of node 'hong-kong' is broken: entry 4" in refused.stderr
    assert "--allow-broken-audit" in refused.stderr

    proc = subprocess.Popen(
        [*serve, "--allow-broken-audit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "serving"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "SERVING ANYWAY because of --allow-broken-audit" in err
    with open_state_dir(state) as conn:
        assert [e.kind for e in iter_entries(conn)][-1] == "override"
    conn.close()
    verified = run("audit", "verify", "--state-dir", str(state))
    assert verified.returncode == 1
    assert "BROKEN: first broken entry 4" in verified.stdout


def test_commands_verify_receipts_and_ledgers_and_write_a_report(
    audited_fed: LocalFederation, tmp_path: Path
) -> None:
    fed = audited_fed.coordinator
    assert fed is not None
    pki = audited_fed.workdir / "pki"
    result = fed.analyze(Mean("credit", "income", group_by="housing"), epsilon=0.5)
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result.to_dict()))
    assert len(list(find_receipt_records(json.loads(saved.read_text())))) == 2

    ok = run("receipts", "verify", str(saved), "--ca", str(pki / "ca.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 receipts: 2 verified, 0 failed" in ok.stdout
    altered = json.loads(saved.read_text())
    altered["nodes"][0]["released"]["groups"][0]["measurements"][0]["values"][0] += 1.0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(altered))
    bad = run("receipts", "verify", str(tampered), "--ca", str(pki / "ca.pem"))
    assert bad.returncode == 1
    assert "the values were altered" in bad.stdout

    state = state_dir(audited_fed, "hong-kong")
    audit = run(
        "audit",
        "verify",
        "--state-dir",
        str(state),
        "--ca",
        str(pki / "ca.pem"),
        "--receipts",
        str(saved),
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "OK: every entry is intact" in audit.stdout
    assert "receipts of node 'hong-kong' checked against the ledger: 1, failed: 0" in audit.stdout
    chart = tmp_path / "spend.png"
    report = run(
        "audit", "report", "--state-dir", str(state), "--since", "1d", "--plot", str(chart)
    )
    assert report.returncode == 0, report.stderr
    assert "| local-researcher | 100 | 0.5 | 99.5 |" in report.stdout
    assert chart.read_bytes()[:4] == b"\x89PNG"
