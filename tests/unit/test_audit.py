"""The audit chain, receipts and compliance report, without sockets.

Policies use delta = 0 (basic composition) so no RDP conversion, and hence no Opacus import,
slows these tests down.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import cli as federation_cli
from federation import pki
from federation.errors import BudgetExhaustedError, ConfigError
from federation.privacy import laplace_charge
from federation.queries import Mechanism
from federation.receipts import (
    ReceiptError,
    ReceiptRecord,
    VerificationKey,
    analyze_payload,
    canonical_json,
    payload_sha256,
    receipt_from_dict,
    receipt_message,
    receipt_to_dict,
    verify_receipt,
)
from federation.releases import GroupRelease, Measurement, NoiseInfo, Receipt
from nodes import audit
from nodes.audit import LEDGER_FILE, Signer, entry_hash, entry_message
from nodes.audit_cli import main as audit_main
from nodes.audit_report import build_report, parse_since, plot_spend, render
from nodes.audit_verify import (
    check_at_start,
    check_receipts,
    open_ledger,
    reconcile_budgets,
    verify_chain,
)
from nodes.config import ConsumerPolicy, NodeConfig, parse_config
from nodes.ledger import ChargeRecord, Ledger

POLICY = ConsumerPolicy(name="acme", epsilon=1.0, delta=0.0, max_epsilon_per_release=1.0)
OTHER = ConsumerPolicy(name="beta", epsilon=2.0, delta=0.0, max_epsilon_per_release=1.0)
CHARGE = laplace_charge(epsilon=0.1, sensitivity=1)


def groups(value: float = 42.0) -> tuple[GroupRelease, ...]:
    noise = NoiseInfo(Mechanism.LAPLACE, scale=10.0, sensitivity=1.0, granularity=1.0)
    return (GroupRelease("", (Measurement("count", (value,), noise),)),)


def payload(value: float = 42.0) -> dict[str, object]:
    return analyze_payload(groups(value), bin_labels=(), bin_edges=())


def release(ledger: Ledger, policy: ConsumerPolicy = POLICY, value: float = 42.0) -> Receipt:
    record = ledger.charge(CHARGE, policy=policy, operation="analyze", details={"query": "count"})
    return ledger.record_release(record, payload_sha256=payload_sha256(payload(value)))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger.sqlite", node_name="hong-kong", jurisdiction="HK")
    yield opened
    opened.close()


@pytest.fixture
def busy(ledger: Ledger) -> Ledger:
    """A ledger with a key entry, three charge+release pairs, a refusal and a bare charge.

    Entries: 1 key, 2-3 acme, 4-5 beta, 6-7 acme, 8 refused, 9 charge never released.
    """
    release(ledger, POLICY, 1.0)
    release(ledger, OTHER, 2.0)
    release(ledger, POLICY, 3.0)
    ledger.record_refusal(consumer="acme", operation="analyze", code="INVALID_ARGUMENT", reason="r")
    ledger.charge(CHARGE, policy=POLICY, operation="analyze", details={"query": "sum"})
    return ledger


def db(ledger: Ledger) -> sqlite3.Connection:
    """A second connection, as an attacker editing the file would have."""
    return sqlite3.connect(ledger.path, isolation_level=None)


def first_problem(ledger: Ledger, **kwargs: object) -> tuple[int, str]:
    result = verify_chain(ledger.connection(), **kwargs)  # type: ignore[arg-type]
    assert not result.is_intact
    return result.problems[0].sequence, result.problems[0].message


def rewrite_from(conn: sqlite3.Connection, start: int, signer: Signer | None = None) -> None:
    """Recompute hashes and links from ``start`` on (re-signing only with ``signer``)."""
    rows = conn.execute("SELECT seq, body, hash FROM audit ORDER BY seq").fetchall()
    prev = audit.GENESIS_HASH
    for seq, body, stored in rows:
        if seq >= start:
            digest = entry_hash(seq, prev, body)
            conn.execute(
                "UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq)
            )
            if signer is not None:
                conn.execute(
                    "UPDATE audit SET signature = ?, key_id = ? WHERE seq = ?",
                    (signer.sign(entry_message(digest)), signer.key_id, seq),
                )
            stored = digest
        prev = stored


# ---------------------------------------------------------------- an intact chain


def test_intact_chain_verifies_fully_and_quickly(busy: Ledger) -> None:
    for full in (True, False):
        result = verify_chain(busy.connection(), full=full)
        assert result.is_intact, result.problems
        assert (result.entries, result.head_sequence) == (9, 9)
    kinds = [e.kind for e in audit.iter_entries(busy.connection())]
    assert kinds == [
        "key",
        "charge",
        "release",
        "charge",
        "release",
        "charge",
        "release",
        "refused",
        "charge",
    ]


def test_charge_entry_records_cost_parameters_and_budget_after(busy: Ledger) -> None:
    entries = list(audit.iter_entries(busy.connection()))
    charge, released = entries[5], entries[6]
    assert (charge.consumer, charge.operation) == ("acme", "analyze")
    assert charge.fields["epsilon"] == 0.1
    assert charge.fields["parameters"] == {"query": "count"}
    assert charge.fields["budget"] == {
        "epsilon": 1.0,
        "delta": 0.0,
        "spent_epsilon": pytest.approx(0.2),
        "remaining_epsilon": pytest.approx(0.8),
        "releases": 2,
    }
    assert released.fields["ref"] == charge.id
    assert released.fields["payload_sha256"] == payload_sha256(payload(3.0))
    assert released.prev_hash == charge.hash


# ---------------------------------------------------------------- tampering


def test_edited_cost_is_the_first_broken_entry(busy: Ledger) -> None:
    with db(busy) as conn:
        body = conn.execute("SELECT body FROM audit WHERE seq = 4").fetchone()[0]
        conn.execute(
            "UPDATE audit SET body = ? WHERE seq = 4",
            (body.replace('"epsilon":0.1', '"epsilon":0.01'),),
        )
    assert first_problem(busy) == (4, "its content does not match its hash (edited)")
    assert first_problem(busy, full=False)[0] == 4


def test_edited_cost_in_the_budget_table_is_caught(busy: Ledger) -> None:
    with db(busy) as conn:
        charge = conn.execute("SELECT charge FROM charges ORDER BY seq LIMIT 1").fetchone()[0]
        conn.execute(
            "UPDATE charges SET charge = ? WHERE seq = 1",
            (charge.replace('"epsilon": 0.1', '"epsilon": 0.01'),),
        )
    sequence, message = first_problem(busy)
    assert (sequence, "budget's record of this charge was altered" in message) == (2, True)


def test_edited_spend_is_caught(busy: Ledger) -> None:
    with db(busy) as conn:
        state = json.loads(
            conn.execute("SELECT state FROM spend WHERE consumer = 'acme'").fetchone()[0]
        )
        state["epsilon_sum"] = 0.0
        conn.execute("UPDATE spend SET state = ? WHERE consumer = 'acme'", (json.dumps(state),))
    assert "stored spend is not the composition" in first_problem(busy)[1]


def test_deleted_entry_is_reported_at_its_successor(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 5")
    assert first_problem(busy) == (6, "entries before it are missing (5: deleted)")
    assert first_problem(busy, full=False)[0] == 6


def test_swapped_entries_are_caught(busy: Ledger) -> None:
    columns = "id, kind, created_at, consumer, ref, body, prev_hash, hash, key_id, signature"
    with db(busy) as conn:
        a = conn.execute(f"SELECT {columns} FROM audit WHERE seq = 4").fetchone()  # noqa: S608
        b = conn.execute(f"SELECT {columns} FROM audit WHERE seq = 6").fetchone()  # noqa: S608
        sets = ", ".join(f"{c} = ?" for c in columns.split(", "))
        conn.execute("UPDATE audit SET id = id || '-' WHERE seq IN (4, 6)")  # free the ids
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 4", (*b,))  # noqa: S608
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 6", (*a,))  # noqa: S608
    sequence, message = first_problem(busy)
    assert sequence == 4
    assert "does not follow entry 3" in message


def test_truncated_tail_is_caught(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 8")
    problems = verify_chain(busy.connection()).problems
    assert str(problems[0]) == (
        "entry 8: entries 8..9 are missing from the end (the chain was truncated)"
    )
    assert any("is in the budget but not in the audit chain" in p.message for p in problems)


def test_appending_after_a_truncation_leaves_a_gap(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 8")
    busy.record_refusal(consumer="acme", operation="analyze", code="INTERNAL", reason="x")
    assert first_problem(busy)[0] == 10  # sequence numbers are never reused


def test_rewritten_chain_without_the_key_fails_its_signatures(busy: Ledger) -> None:
    with db(busy) as conn:
        body = conn.execute("SELECT body FROM audit WHERE seq = 4").fetchone()[0]
        conn.execute("UPDATE audit SET body = ? WHERE seq = 4", (body.replace("beta", "gamma"),))
        conn.execute("UPDATE audit SET consumer = 'gamma' WHERE seq = 4")
        rewrite_from(conn, 4)
    assert first_problem(busy) == (
        4,
        "its signature does not verify (rewritten without the node's key)",
    )
    # The node-start check verifies the newest signatures, which cover every hash before.
    assert "signature does not verify" in first_problem(busy, full=False)[1]


def test_chain_resigned_with_another_key_is_caught_when_keys_are_anchored(busy: Ledger) -> None:
    mine = busy.audit.signer.key_id
    forger = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())
    with db(busy) as conn:
        body = json.loads(conn.execute("SELECT body FROM audit WHERE seq = 1").fetchone()[0])
        body.update(key_id=forger.key_id, public_key=forger.public_key_pem.decode())
        conn.execute("UPDATE audit SET body = ? WHERE seq = 1", (canonical_json(body).decode(),))
        rewrite_from(conn, 1, signer=forger)
    assert verify_chain(busy.connection()).is_intact  # unanchored: trusted on first use
    anchored = {"ca_pem": b"unused", "trusted_keys": [mine]}
    sequence, message = first_problem(busy, **anchored)
    assert sequence == 1
    assert "untrusted signing key" in message


def test_edited_column_is_caught_by_the_full_check(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("UPDATE audit SET consumer = 'beta' WHERE seq = 2")
    assert first_problem(busy) == (2, "its columns differ from its hashed body (edited)")


# ---------------------------------------------------------------- budget and audit together


class BrokenSigner(Signer):
    """Signs nothing: as if the audit append failed inside the charge transaction."""

    def sign(self, message: bytes) -> bytes:
        raise OSError("disk full")


def test_a_charge_that_cannot_be_audited_is_not_budgeted(tmp_path: Path) -> None:
    good = Ledger(tmp_path / "ledger.sqlite")
    release(good)
    broken = audit.ed25519_signer(tmp_path)
    signer = BrokenSigner(
        broken.private_key, broken.algorithm, broken.key_id, broken.public_key_pem
    )
    ledger = Ledger(tmp_path / "ledger.sqlite", signer=signer)
    with pytest.raises(OSError, match="disk full"):
        ledger.charge(CHARGE, policy=POLICY, operation="analyze", details={})
    assert ledger.count() == 1
    assert ledger.status(POLICY).releases == 1
    assert verify_chain(ledger.connection()).is_intact
    good.close()
    ledger.connection().close()


def test_refused_charge_writes_no_audit_entry(ledger: Ledger) -> None:
    big = laplace_charge(epsilon=1.0, sensitivity=1)
    release(ledger)
    before = verify_chain(ledger.connection()).entries
    with pytest.raises(BudgetExhaustedError):
        ledger.charge(big, policy=POLICY, operation="analyze", details={})
    assert verify_chain(ledger.connection()).entries == before


def test_a_charge_is_released_at_most_once(ledger: Ledger) -> None:
    record = ledger.charge(CHARGE, policy=POLICY, operation="analyze", details={})
    ledger.record_release(record, payload_sha256="a" * 64)
    with pytest.raises(ValueError, match="already released"):
        ledger.record_release(record, payload_sha256="b" * 64)
    with pytest.raises(ValueError, match="64 lower-case hex"):
        ledger.record_release(record, payload_sha256="not a digest")
    ghost = ChargeRecord(id="nope", consumer="acme", created_at=0.0, budget=record.budget)
    with pytest.raises(ValueError, match="not in the audit chain"):
        ledger.record_release(ghost, payload_sha256="c" * 64)


# ---------------------------------------------------------------- refusals


def test_refusals_are_audited_rate_limited_and_cost_nothing(ledger: Ledger) -> None:
    flood = audit.REFUSALS_PER_MINUTE + 15
    for i in range(flood):
        ledger.record_refusal(
            consumer="acme",
            operation="analyze",
            code="INVALID_ARGUMENT",
            reason=f"bad {i} " + "x" * 1000,
        )
    ledger.record_refusal(consumer="", operation="describe", code="UNAUTHENTICATED", reason="?")
    entries = [e for e in audit.iter_entries(ledger.connection()) if e.kind == "refused"]
    assert len(entries) == audit.REFUSALS_PER_MINUTE + 1
    assert len(str(entries[0].fields["reason"])) == audit.MAX_REASON_CHARS
    assert ledger.status(POLICY).releases == 0
    ledger.close()  # writes the count of refusals that were only counted
    summary = [e for e in audit.iter_entries(ledger.connection()) if e.kind == "refused_summary"]
    assert [(e.consumer, e.fields["suppressed"]) for e in summary] == [("acme", 15)]
    report = build_report(ledger.connection(), verify_chain(ledger.connection()))
    assert report.consumers["acme"].refused == flood


# ---------------------------------------------------------------- receipts


def test_receipt_verifies_against_the_released_bytes(busy: Ledger) -> None:
    receipt = release(busy, value=7.0)
    key = VerificationKey.from_pem(busy.audit.signer.verification_pem)
    verify_receipt(receipt, key=key, payload=payload(7.0))
    assert (receipt.epsilon, receipt.operation, receipt.node_name) == (0.1, "analyze", "hong-kong")
    with pytest.raises(ReceiptError, match="values were altered"):
        verify_receipt(receipt, key=key, payload=payload(8.0))
    forged = Receipt(**{**_fields(receipt), "epsilon": 0.01})
    with pytest.raises(ReceiptError, match="signature does not verify"):
        verify_receipt(forged, key=key)
    other = VerificationKey.from_pem(
        audit.Signer.from_private_key(ec.generate_private_key(ec.SECP256R1())).public_key_pem
    )
    with pytest.raises(ReceiptError, match="signed by key"):
        verify_receipt(receipt, key=other)
    assert (
        check_receipts(busy.connection(), [ReceiptRecord("hong-kong", receipt, payload(7.0))]) == []
    )


def test_a_receipt_numbers_its_consumers_releases_not_the_chain(ledger: Ledger) -> None:
    # Numbered by the chain's position, acme's receipts 1 and 4 would show that three
    # entries (beta's charge and release, a refusal) came in between: another consumer's
    # activity. Each consumer's receipts count its own releases: 1, 2, 3.
    acme = [release(ledger, POLICY, 1.0)]
    beta = [release(ledger, OTHER, 2.0)]
    ledger.record_refusal(consumer="beta", operation="analyze", code="INVALID_ARGUMENT", reason="r")
    ledger.charge(CHARGE, policy=OTHER, operation="analyze", details={"query": "sum"})
    acme += [release(ledger, POLICY, 3.0), release(ledger, POLICY, 4.0)]
    beta.append(release(ledger, OTHER, 5.0))
    assert [r.sequence for r in acme] == [1, 2, 3]
    assert [r.sequence for r in beta] == [1, 2]
    conn = ledger.connection()
    held = [
        ReceiptRecord("hong-kong", r, payload(v))
        for r, v in zip(acme, (1.0, 3.0, 4.0), strict=True)
    ]
    held += [
        ReceiptRecord("hong-kong", r, payload(v)) for r, v in zip(beta, (2.0, 5.0), strict=True)
    ]
    assert check_receipts(conn, held) == []
    assert verify_chain(conn).is_intact
    # A receipt that claims another number than its entry's is not that release.
    renumbered = Receipt(**{**_fields(acme[1]), "sequence": 7})
    (failure,) = check_receipts(conn, [ReceiptRecord("hong-kong", renumbered, payload(3.0))])
    assert "is another release" in failure


def _strip_numbers(ledger: Ledger) -> dict[str, int]:
    """Rewrite the release entries as written before ``consumer_release`` (re-hashed and
    re-signed: an old, intact chain); return each release id's chain position."""
    conn = db(ledger)
    positions = {}
    prev = audit.GENESIS_HASH
    rows = conn.execute("SELECT seq, id, kind, body FROM audit ORDER BY seq").fetchall()
    for seq, entry_id, kind, body in rows:
        if kind == "release":
            fields = json.loads(body)
            del fields["consumer_release"]
            body = canonical_json(fields).decode("ascii")
            positions[entry_id] = seq
        digest = entry_hash(seq, prev, body)
        signature = ledger.audit.signer.sign(entry_message(digest))
        conn.execute(
            "UPDATE audit SET body = ?, prev_hash = ?, hash = ?, signature = ? WHERE seq = ?",
            (body, prev, digest, signature, seq),
        )
        prev = digest
    conn.close()
    return positions


def test_receipts_from_before_consumer_numbers_still_check_and_numbering_continues(
    ledger: Ledger,
) -> None:
    # A ledger written before releases were numbered per consumer: its receipts carry the
    # chain position. The auditor still matches them, and new releases continue the
    # consumer's count (two earlier acme releases: the next is number 3).
    old = [release(ledger, POLICY, 1.0), release(ledger, OTHER, 2.0), release(ledger, POLICY, 3.0)]
    positions = _strip_numbers(ledger)
    key = ledger.audit.signer
    legacy = []
    for receipt, value in zip(old, (1.0, 2.0, 3.0), strict=True):
        unsigned = Receipt(**{**_fields(receipt), "sequence": positions[receipt.id]})
        signed = Receipt(**{**_fields(unsigned), "signature": key.sign(receipt_message(unsigned))})
        legacy.append(ReceiptRecord("hong-kong", signed, payload(value)))
    conn = ledger.connection()
    assert verify_chain(conn).is_intact
    assert check_receipts(conn, legacy) == []
    # Numbered the new way, an old entry's receipt does not match it.
    renumbered = Receipt(**{**_fields(legacy[0].receipt), "sequence": 1})
    (failure,) = check_receipts(conn, [ReceiptRecord("hong-kong", renumbered, payload(1.0))])
    assert "is another release" in failure
    assert release(ledger, POLICY, 4.0).sequence == 3
    assert release(ledger, OTHER, 5.0).sequence == 2
    assert verify_chain(ledger.connection()).is_intact


def test_the_auditor_checks_each_consumers_numbers_run_one_two_three(ledger: Ledger) -> None:
    for value in (1.0, 2.0, 3.0):
        release(ledger, POLICY, value)
    assert verify_chain(ledger.connection()).is_intact
    # A release entry renumbered (re-hashed and re-signed, as a node bug would write it).
    conn = db(ledger)
    rows = conn.execute("SELECT seq, kind, body FROM audit ORDER BY seq").fetchall()
    prev = audit.GENESIS_HASH
    for seq, kind, body in rows:
        fields = json.loads(body)
        if kind == "release" and fields["consumer_release"] == 2:
            fields["consumer_release"] = 3
            body = canonical_json(fields).decode("ascii")
        digest = entry_hash(seq, prev, body)
        conn.execute(
            "UPDATE audit SET body = ?, prev_hash = ?, hash = ?, signature = ? WHERE seq = ?",
            (body, prev, digest, ledger.audit.signer.sign(entry_message(digest)), seq),
        )
        prev = digest
    conn.close()
    result = verify_chain(ledger.connection())
    assert [p.message for p in result.problems] == [
        "its receipt number 3 is not 'acme''s release 2 (a consumer's releases are numbered "
        "1, 2, ... in chain order)"
    ]


def _fields(receipt: Receipt) -> dict[str, object]:
    return {name: getattr(receipt, name) for name in receipt.__dataclass_fields__}


def test_a_consumer_certificate_named_like_a_node_cannot_sign_for_it(tmp_path: Path) -> None:
    # Found by review: the CA issues consumers' certificates too, and one named
    # "hong-kong" signed a forged receipt (and could sign a rewritten chain) that verified
    # against the CA. A node's certificate has serverAuth; a consumer's has clientAuth only.
    ca = pki.init_ca(tmp_path / "ca")
    cert, key = pki.issue(tmp_path / "ca", name="hong-kong", role="consumer")
    signer = Signer.from_private_key(
        audit._private_key(key.read_bytes(), key), certificate_pem=cert.read_bytes()
    )
    ledger = Ledger(tmp_path / "ledger.sqlite", node_name="hong-kong", signer=signer)
    receipt = release(ledger)
    verification = VerificationKey.from_pem(cert.read_bytes())
    with pytest.raises(ReceiptError, match="not a node's .*cannot sign for node 'hong-kong'"):
        verify_receipt(receipt, key=verification, payload=payload(), ca_pem=ca.read_bytes())
    assert first_problem(ledger, ca_pem=ca.read_bytes()) == (
        1,
        "untrusted signing key: certificate named 'hong-kong' is not a node's (no serverAuth "
        "usage: a consumer's certificate), so it cannot sign for node 'hong-kong'",
    )
    ledger.close()


def test_receipt_round_trips_through_json(busy: Ledger) -> None:
    receipt = release(busy)
    assert receipt_from_dict(json.loads(json.dumps(receipt_to_dict(receipt)))) == receipt


def test_receipt_checked_against_the_ca_and_the_node_name(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca")
    cert, key = pki.issue(tmp_path / "ca", name="hong-kong", role="node")
    other_ca = pki.init_ca(tmp_path / "other")
    signer = Signer.from_private_key(
        audit._private_key(key.read_bytes(), key), certificate_pem=cert.read_bytes()
    )
    ledger = Ledger(tmp_path / "ledger.sqlite", node_name="hong-kong", signer=signer)
    receipt = release(ledger)
    verification = VerificationKey.from_pem(cert.read_bytes())
    verify_receipt(receipt, key=verification, payload=payload(), ca_pem=ca.read_bytes())
    with pytest.raises(ReceiptError, match="not issued by the given CA"):
        verify_receipt(receipt, key=verification, ca_pem=other_ca.read_bytes())
    impostor = Receipt(**{**_fields(receipt), "node_name": "shenzhen"})
    with pytest.raises(ReceiptError, match="not node 'shenzhen'"):
        verify_receipt(impostor, key=verification, ca_pem=ca.read_bytes())
    assert verify_chain(ledger.connection(), ca_pem=ca.read_bytes()).is_intact
    assert "untrusted signing key" in first_problem(ledger, ca_pem=other_ca.read_bytes())[1]
    ledger.close()


def test_suppressed_values_hash_as_null_and_survive_json() -> None:
    released = payload(math.nan)
    assert b'"values":[null]' in canonical_json(released)
    assert payload_sha256(json.loads(json.dumps(released))) == payload_sha256(released)


@settings(max_examples=100)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5))
def test_payload_digest_survives_a_json_round_trip(values: list[float]) -> None:
    noise = NoiseInfo(Mechanism.GAUSSIAN, scale=1.5, sensitivity=1.0, granularity=0.25)
    released = analyze_payload(
        (GroupRelease("g", (Measurement("bins", tuple(values), noise),)),),
        bin_labels=("a",),
        bin_edges=(0.0, 1.0),
    )
    assert payload_sha256(json.loads(json.dumps(released))) == payload_sha256(released)


# ---------------------------------------------------------------- node start


def test_node_start_refuses_a_broken_chain_unless_overridden(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 5")
    conn = busy.connection()
    with pytest.raises(ConfigError, match=r"broken: entry 6: .*--allow-broken-audit"):
        check_at_start(conn, busy.audit, allow_broken=False, ca_pem=None)
    check_at_start(conn, busy.audit, allow_broken=True, ca_pem=None)
    override = list(audit.iter_entries(conn))[-1]
    assert override.kind == "override"
    assert override.fields["acknowledged_head"] == 9
    # Acknowledged: the next start serves (with a warning) ...
    assert check_at_start(conn, busy.audit, allow_broken=False, ca_pem=None).problems
    # ... but tampering after the override is refused again.
    with db(busy) as attacker:
        release(busy)  # entries 11 (charge) and 12 (release)
        attacker.execute("DELETE FROM audit WHERE seq = 12")
    with pytest.raises(ConfigError, match="entry 12 is missing from the end"):
        check_at_start(conn, busy.audit, allow_broken=False, ca_pem=None)


def test_a_forged_override_acknowledges_nothing(busy: Ledger) -> None:
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 5")
    forger = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())
    fake = audit.AuditChain(node_name="hong-kong", signer=forger)
    with db(busy) as conn:
        conn.execute("BEGIN IMMEDIATE")
        fake._append(
            conn,
            "override",
            consumer="",
            operation="serve",
            fields={"acknowledged_head": 10**9},
            entry_id=None,
            ref="",
            now=0.0,
        )
        conn.execute("COMMIT")
    with pytest.raises(ConfigError, match="entry 6"):
        check_at_start(busy.connection(), busy.audit, allow_broken=False, ca_pem=None)


# ---------------------------------------------------------------- report and command line


def test_report_summarises_spend_releases_refusals_and_remaining(busy: Ledger) -> None:
    report = build_report(busy.connection(), verify_chain(busy.connection()))
    acme = report.consumers["acme"]
    assert (acme.releases, acme.never_released, acme.refused) == (2, 1, 1)
    assert acme.remaining_epsilon == pytest.approx(0.7)
    assert report.operations == [
        {
            "operation": "analyze",
            "query": "count",
            "releases": 3,
            "epsilon_charged": pytest.approx(0.3),
        },
        {
            "operation": "analyze",
            "query": "sum",
            "releases": 1,
            "epsilon_charged": pytest.approx(0.1),
        },
    ]
    markdown = render(report, "md")
    assert "| acme | 1 | 0.3 | 0.7 | 0 | 2 | 1 | 1 |" in markdown
    assert "VERIFIED: 9 entries" in markdown
    assert json.loads(render(report, "json"))["consumers"][1]["consumer"] == "beta"
    assert "<table>" in render(report, "html")
    later = build_report(busy.connection(), verify_chain(busy.connection()), since=4e9)
    assert later.daily == []
    assert later.consumers["acme"].remaining_epsilon == pytest.approx(0.7)


def test_report_plot_writes_a_png(busy: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "spend.png"
    plot_spend(build_report(busy.connection(), verify_chain(busy.connection())), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_since() -> None:
    assert parse_since("2026-01-01") == 1767225600.0
    assert parse_since("2026-01-01T08:00+08:00") == 1767225600.0
    with pytest.raises(ConfigError, match="--since"):
        parse_since("last week")


def test_audit_cli_exit_codes(busy: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(busy.path.parent)
    assert audit_main(["verify", "--state-dir", state]) == 0
    assert "OK: every entry is intact" in capsys.readouterr().out
    assert audit_main(["report", "--state-dir", state, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["integrity"]["intact"] is True
    with db(busy) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 3")
    assert audit_main(["verify", "--state-dir", state, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_broken_entry"] == 4
    assert audit_main(["verify", "--state-dir", str(busy.path.parent / "nowhere")]) == 2


def test_receipts_verify_command(busy: Ledger, tmp_path: Path) -> None:
    receipt = release(busy, value=5.0)
    record = ReceiptRecord("hong-kong", receipt, payload(5.0)).to_dict()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"nodes": [record]}))
    record["released"]["groups"][0]["measurements"][0]["values"] = [6.0]  # type: ignore[index]
    bad.write_text(json.dumps([record]))
    key = tmp_path / "hk.pem"
    key.write_bytes(busy.audit.signer.verification_pem)
    node_key = f"hong-kong={key}"
    assert federation_cli.main(["receipts", "verify", str(good), "--node-cert", node_key]) == 0
    assert federation_cli.main(["receipts", "verify", str(bad), "--node-cert", node_key]) == 1
    assert federation_cli.main(["receipts", "verify", str(good)]) == 1  # no trusted key
    assert federation_cli.main(["receipts", "verify", str(key)]) == 2  # not JSON


def test_verify_against_another_ca_says_not_anchored_not_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong --ca breaks every signature check, but the chain is intact: say which of the
    # two it is. An edited entry on top is still BROKEN.
    ca = pki.init_ca(tmp_path / "ca")
    cert, key = pki.issue(tmp_path / "ca", name="hong-kong", role="node")
    other_ca = pki.init_ca(tmp_path / "other")
    signer = Signer.from_private_key(
        audit._private_key(key.read_bytes(), key), certificate_pem=cert.read_bytes()
    )
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(state / "ledger.sqlite", node_name="hong-kong", signer=signer)
    for value in (1.0, 2.0, 3.0):
        release(ledger, POLICY, value)
    args = ["verify", "--state-dir", str(state)]
    assert audit_main([*args, "--ca", str(ca)]) == 0
    capsys.readouterr()
    assert audit_main([*args, "--ca", str(other_ca)]) == 1
    out = capsys.readouterr().out
    assert "NOT ANCHORED: the chain's hashes and links are intact and its budget" in out
    assert "BROKEN" not in out
    assert audit_main([*args, "--ca", str(other_ca), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["unanchored_only"] is True
    with db(ledger) as conn:
        conn.execute("UPDATE audit SET body = body || ' ' WHERE seq = 3")
    assert audit_main([*args, "--ca", str(other_ca)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: first broken" in out
    assert "NOT ANCHORED" not in out
    ledger.close()


def _node_config(state: Path) -> NodeConfig:
    (state / "credit.csv").write_text("age\n30\n")
    policy = {"epsilon": 1.0, "delta": 0.0, "max_epsilon_per_release": 1.0}
    return parse_config(
        {
            "node": {
                "name": "hong-kong",
                "jurisdiction": "HK",
                "listen": "127.0.0.1:0",
                "state_dir": str(state),
            },
            "datasets": [
                {
                    "name": "credit",
                    "source": "credit.csv",
                    "columns": [{"name": "age", "type": "int", "lower": 18, "upper": 90}],
                }
            ],
            "consumers": {"acme": policy, "beta": {**policy, "epsilon": 2.0}},
        },
        base_dir=state,
    )


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir whose ledger holds ``busy``'s entries (acme: 3 charges, beta: 1)."""
    made = Ledger(tmp_path / LEDGER_FILE, node_name="hong-kong", jurisdiction="HK")
    busy_ledger(made)
    made.close()
    return tmp_path


def busy_ledger(ledger: Ledger) -> None:
    release(ledger, POLICY, 1.0)
    release(ledger, OTHER, 2.0)
    release(ledger, POLICY, 3.0)
    ledger.charge(CHARGE, policy=POLICY, operation="analyze", details={"query": "sum"})


def test_an_override_never_serves_a_budget_below_its_audited_charges(state: Path) -> None:
    # Found by review: with the budget rows deleted, --allow-broken-audit served from
    # zero, and a consumer that had spent its budget had all of it back.
    with sqlite3.connect(state / LEDGER_FILE, isolation_level=None) as attacker:
        attacker.execute("DELETE FROM spend")
    attacker.close()
    with pytest.raises(ConfigError, match="the budget counts 0 releases, the audit chain 3"):
        open_ledger(_node_config(state))
    ledger = open_ledger(_node_config(state), allow_broken_audit=True)
    try:
        assert ledger.spend("acme").releases == 3
        assert ledger.status(POLICY).spent_epsilon == pytest.approx(0.3)
        assert ledger.spend("beta").releases == 1
    finally:
        ledger.close()
    # Recorded: the next start, acknowledged, serves the same spend.
    again = open_ledger(_node_config(state))
    try:
        assert again.status(POLICY).spent_epsilon == pytest.approx(0.3)
    finally:
        again.close()


def test_a_consumer_whose_audited_charges_cannot_be_recomposed_is_frozen(state: Path) -> None:
    # acme's charge rows and spend gone: what it spent cannot be recomposed, so nothing
    # more is charged to it. beta's records are intact: it is served as before.
    with sqlite3.connect(state / LEDGER_FILE, isolation_level=None) as attacker:
        attacker.execute("DELETE FROM charges WHERE consumer = 'acme'")
        attacker.execute("DELETE FROM spend WHERE consumer = 'acme'")
    attacker.close()
    ledger = open_ledger(_node_config(state), allow_broken_audit=True)
    try:
        assert ledger.status(POLICY).remaining_epsilon == 0.0
        with pytest.raises(BudgetExhaustedError, match="budget records for it are damaged"):
            release(ledger, POLICY)
        assert ledger.status(OTHER).spent_epsilon == pytest.approx(0.1)
        release(ledger, OTHER)
        assert ledger.status(OTHER).spent_epsilon == pytest.approx(0.2)
    finally:
        ledger.close()


def test_reconciling_an_intact_ledger_changes_nothing(busy: Ledger) -> None:
    before = {c: busy.spend(c) for c in ("acme", "beta")}
    assert reconcile_budgets(busy.connection(), {"acme": 0.0, "beta": 0.0}) == ({}, {})
    assert {c: busy.spend(c) for c in ("acme", "beta")} == before


def test_an_auditor_opens_a_ledger_read_only(busy: Ledger) -> None:
    conn = audit.open_state_dir(busy.path.parent)
    try:
        assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 9
        conn.execute("PRAGMA query_only = OFF")  # mode=ro holds below it
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only"):
            conn.execute("DELETE FROM audit")
    finally:
        conn.close()


def test_a_ca_file_that_is_no_certificate_is_a_usage_error(busy: Ledger, tmp_path: Path) -> None:
    # Found by review: it was reported NOT ANCHORED (exit 1, "tampered") with 54 lines.
    not_a_cert = tmp_path / "credit.csv"
    not_a_cert.write_text("age\n30\n")
    state = str(busy.path.parent)
    assert audit_main(["verify", "--state-dir", state, "--ca", str(not_a_cert)]) == 2


def test_a_ledger_on_read_only_storage_is_opened_immutable_or_refused_clearly(
    busy: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: on a read-only mount, opening the ledger (SQLite wants its -shm
    # file) raised a traceback with exit 1, the code that means "tampered". Read-only
    # storage is simulated: SQLite refuses "mode=ro" as it does there.
    busy.close()
    state = busy.path.parent
    real = sqlite3.connect

    def read_only_media(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if "mode=ro" in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_media)
    conn = audit.open_state_dir(state)
    try:  # no pending write-ahead log: the file alone is the ledger, opened immutable
        assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 9
    finally:
        conn.close()
    (state / "ledger.sqlite-wal").write_bytes(b"pending")
    with pytest.raises(ConfigError, match="pending write-ahead log.*copy the state dir"):
        audit.open_state_dir(state)
    (state / "ledger.sqlite-wal").unlink()
    monkeypatch.setattr(sqlite3, "connect", real)
    garbage = state / "garbage"
    garbage.mkdir()
    (garbage / "ledger.sqlite").write_bytes(b"not a database at all")
    assert audit_main(["verify", "--state-dir", str(garbage)]) == 2


@pytest.mark.parametrize(
    "damage",
    [
        # The audit entry's body names another consumer, or does not parse: the freeze
        # follows the budget row and the entry's column too, not the body alone (review).
        'UPDATE audit SET body = replace(body, \'"consumer":"acme"\', \'"consumer":"zzz"\')'
        " WHERE seq = 2",
        "UPDATE audit SET body = 'garbage' WHERE seq = 2",
        # Rows that do not parse: the node still starts, and freezes their consumer.
        "INSERT INTO charges (id, consumer, operation, created_at, charge, details,"
        " spent_epsilon) VALUES ('x', 'acme', 'analyze', 0, 'garbage', '{}', 0)",
        "UPDATE spend SET state = 'garbage' WHERE consumer = 'acme'",
    ],
)
def test_an_override_freezes_the_consumer_whose_records_are_damaged(
    state: Path, damage: str
) -> None:
    garbled_spend = damage.startswith("UPDATE spend")
    with sqlite3.connect(state / LEDGER_FILE, isolation_level=None) as attacker:
        if not garbled_spend:
            attacker.execute("DELETE FROM spend WHERE consumer = 'acme'")
        attacker.execute(damage)
    attacker.close()
    ledger = open_ledger(_node_config(state), allow_broken_audit=True)
    try:
        assert ledger.status(POLICY).remaining_epsilon == 0.0
        with pytest.raises(BudgetExhaustedError, match="budget records for it are damaged"):
            release(ledger, POLICY)
        if not garbled_spend:  # its spend shows every charge the ledger holds
            assert ledger.spend("acme").releases == 3
        assert ledger.status(OTHER).spent_epsilon == pytest.approx(0.1)  # beta: served
    finally:
        ledger.close()


def test_a_raised_spend_bounds_both_by_every_measure() -> None:
    # Found by review: replacing the stored spend by a recomposed one that was larger at
    # today's delta could compose to less after later charges. The maximum by every
    # measure (sums, each RDP order, releases) is never below either, now or later.
    from federation.privacy import Spend, gaussian_charge
    from nodes.audit_verify import _upper

    stored = Spend().plus(laplace_charge(epsilon=3.0, sensitivity=1))
    recomposed = Spend()
    for _ in range(37):
        recomposed = recomposed.plus(gaussian_charge(epsilon=0.5, delta=1e-7, sensitivity=1))
    both = _upper(stored, recomposed)
    later = gaussian_charge(epsilon=0.5, delta=1e-7, sensitivity=1)
    for _ in range(20):
        both, stored, recomposed = both.plus(later), stored.plus(later), recomposed.plus(later)
    for delta in (1e-7, 1e-6, 1e-5):
        assert both.epsilon_at(delta) >= max(stored.epsilon_at(delta), recomposed.epsilon_at(delta))
