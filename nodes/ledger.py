"""The privacy ledger: durable, atomic check-and-charge per (node, consumer).

Storage is SQLite in WAL mode with ``synchronous=FULL`` in the node's state directory. A
charge is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock (which also
serialises other *processes* sharing the file), reads the consumer's composed spend, checks
the new total against the budget, inserts the charge and updates the spend, then commits.
Only after the commit returns does the node compute and release anything, so a crash can
waste budget but never release something unrecorded.

The same transaction appends the charge's entry to the audit chain (``nodes.audit``), so
the budget and the audit trail cannot disagree even if the process is killed;
``record_release`` appends the release's entry, with the digest of the released bytes,
before anything is sent, and returns the signed receipt.

The spend composes every release with ``federation.privacy.Spend``: the smaller of basic
composition and Rényi-DP composition at the consumer's delta (both valid bounds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from federation.errors import (
    BudgetExhaustedError,
    InvalidRequestError,
    NodeBusyError,
    NodeUnavailableError,
)
from federation.privacy import Charge, Spend
from federation.releases import BudgetStatus, Receipt
from nodes.audit import SCHEMA as AUDIT_SCHEMA
from nodes.audit import AuditChain, Signer, ed25519_signer
from nodes.config import ConsumerPolicy

__all__ = ["ChargeRecord", "JobRecord", "Ledger"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    consumer TEXT PRIMARY KEY,
    state TEXT NOT NULL            -- Spend.to_json()
);
CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,       -- also the id of the charge's audit entry
    consumer TEXT NOT NULL,
    operation TEXT NOT NULL,
    created_at REAL NOT NULL,
    charge TEXT NOT NULL,          -- Charge.to_json()
    details TEXT NOT NULL,         -- JSON: the request's public parameters
    spent_epsilon REAL NOT NULL    -- consumer's composed spend after this charge
);
"""

# Budgets are compared with a tiny relative slack so that spending exactly the whole budget
# in pieces (e.g. 10 x 0.1 of 1.0) is not refused by floating-point summation error.
_SLACK = 1e-9
_LOCK_WAIT_S = 60.0  # how long a write waits for SQLite's lock (other writers) before busy


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """The durable record of one accepted charge."""

    id: str
    consumer: str
    created_at: float
    budget: BudgetStatus
    operation: str = ""
    sequence: int = 0  # the charge entry's position in the audit chain


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A training job's rounds in a ledger (``Ledger.job_record``).

    Attributes:
        first: the details recorded with its first charged round; None for a new job.
        rounds: how many of its rounds were charged, retried rounds included.
    """

    first: dict[str, object] | None
    rounds: int


class Ledger:
    """Per-consumer privacy spend and the audit chain, in ``<state_dir>/ledger.sqlite``."""

    def __init__(
        self,
        path: Path,
        *,
        node_name: str = "node",
        jurisdiction: str = "",
        signer: Signer | None = None,
    ) -> None:
        """Open (creating if needed) the ledger database at ``path``.

        ``signer`` signs the audit entries and receipts (``nodes.audit.load_signer``); by
        default an Ed25519 key kept next to the database.
        """
        self.path = path
        self._local = threading.local()
        # Consumers whose budget records are damaged (``freeze``): charged nothing more.
        self._frozen: dict[str, str] = {}
        self.audit = AuditChain(
            node_name=node_name,
            jurisdiction=jurisdiction,
            signer=signer if signer is not None else ed25519_signer(path.parent),
        )
        with self._connect() as conn:
            conn.executescript(_SCHEMA + AUDIT_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=_LOCK_WAIT_S, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def spend(self, consumer: str) -> Spend:
        """Return the consumer's composed spend so far (zero if none)."""
        row = (
            self._connect()
            .execute("SELECT state FROM spend WHERE consumer = ?", (consumer,))
            .fetchone()
        )
        return Spend.from_json(row[0]) if row else Spend()

    def job_record(self, consumer: str, job_id: str) -> JobRecord:
        """What this ledger holds on training job ``job_id`` of ``consumer``: the details
        recorded with its first charged round and how many rounds were charged."""
        rows = (
            self._connect()
            .execute(
                "SELECT details FROM charges WHERE consumer = ? AND operation = 'train'"
                " AND json_extract(details, '$.job_id') = ? ORDER BY created_at",
                (consumer, job_id),
            )
            .fetchall()
        )
        first: dict[str, object] | None = json.loads(rows[0][0]) if rows else None
        return JobRecord(first=first, rounds=len(rows))

    def job_spend(self, consumer: str, job_id: str) -> Spend:
        """The composed spend of every training round charged to ``job_id`` for
        ``consumer``, retried rounds included (zero if none)."""
        rows = (
            self._connect()
            .execute(
                "SELECT charge FROM charges WHERE consumer = ? AND operation = 'train'"
                " AND json_extract(details, '$.job_id') = ? ORDER BY created_at",
                (consumer, job_id),
            )
            .fetchall()
        )
        spend = Spend()
        for (charge,) in rows:
            spend = spend.plus(Charge.from_json(charge))
        return spend

    def freeze(self, consumers: Mapping[str, str]) -> None:
        """Refuse every charge to ``consumers`` (name -> why) from now on, whatever their
        budget says: their records were found damaged (``reconcile_budgets``)."""
        self._frozen.update(consumers)

    def status(self, policy: ConsumerPolicy) -> BudgetStatus:
        """Return the consumer's budget status under its current policy (none left if
        its budget is frozen)."""
        if policy.name not in self._frozen:
            return _status(self.spend(policy.name), policy)
        try:
            spend = self.spend(policy.name)
        except InvalidRequestError:  # its stored spend may be what was damaged
            spend = Spend()
        return dataclasses.replace(_status(spend, policy), remaining_epsilon=0.0)

    def charge(
        self,
        charge: Charge,
        *,
        policy: ConsumerPolicy,
        operation: str,
        details: dict[str, object],
        abandoned: Callable[[], bool] | None = None,
        recheck: Callable[[], None] | None = None,
    ) -> ChargeRecord:
        """Atomically check ``charge`` against the budget and record it durably.

        ``abandoned``, if given, is asked once the ledger's write lock is held (waiting for
        it can take seconds while another process charges): True means nobody is left to
        receive the release, so nothing is charged. ``recheck``, if given, runs then too,
        so what it reads from this ledger cannot change before the charge is written; an
        exception it raises refuses the charge.

        Raises:
            BudgetExhaustedError: the composed spend would exceed the budget; nothing is
                recorded. The message carries ``remaining_epsilon=...``.
            NodeUnavailableError: ``abandoned()`` said so; nothing is recorded.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise  # a disk or database fault: INTERNAL, with an incident id
            raise NodeBusyError(  # still locked by other writers after the wait
                f"{operation}: the node's budget ledger stayed locked by other writers past "
                f"its {_LOCK_WAIT_S:g} s wait; nothing was charged: retry"
            ) from err
        try:
            if policy.name in self._frozen:
                raise BudgetExhaustedError(
                    f"consumer {policy.name!r}: this node's budget records for it are "
                    f"damaged ({self._frozen[policy.name]}); it charges nothing more to it "
                    "until its operator restores the ledger; remaining_epsilon=0",
                    remaining_epsilon=0.0,
                )
            if abandoned is not None and abandoned():
                raise NodeUnavailableError(
                    f"{operation}: the call ended or ran past its deadline before it was "
                    "charged; nothing was charged"
                )
            if recheck is not None:
                recheck()
            row = conn.execute(
                "SELECT state FROM spend WHERE consumer = ?", (policy.name,)
            ).fetchone()
            before = Spend.from_json(row[0]) if row else Spend()
            after = before.plus(charge)
            spent = after.epsilon_at(policy.delta)
            if spent > policy.epsilon * (1 + _SLACK):
                remaining = _status(before, policy).remaining_epsilon
                raise BudgetExhaustedError(
                    f"consumer {policy.name!r} cannot afford epsilon {charge.epsilon:g}: "
                    f"it would bring the composed spend to {spent:.6g} of {policy.epsilon:g}; "
                    f"remaining_epsilon={remaining:.6g}",
                    remaining_epsilon=remaining,
                )
            record_id = uuid.uuid4().hex
            now = time.time()
            charge_json = charge.to_json()
            conn.execute(
                "INSERT INTO charges (id, consumer, operation, created_at, charge, details,"
                " spent_epsilon) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record_id,
                    policy.name,
                    operation,
                    now,
                    charge_json,
                    json.dumps(details, sort_keys=True),
                    spent,
                ),
            )
            conn.execute(
                "INSERT INTO spend (consumer, state) VALUES (?, ?)"
                " ON CONFLICT(consumer) DO UPDATE SET state = excluded.state",
                (policy.name, after.to_json()),
            )
            status = _status(after, policy)
            entry = self.audit.append(
                conn,
                "charge",
                consumer=policy.name,
                operation=operation,
                entry_id=record_id,
                now=now,
                fields=AuditChain.charge_fields(
                    charge, charge_json=charge_json, details=details, budget=status
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return ChargeRecord(
            id=record_id,
            consumer=policy.name,
            created_at=now,
            budget=status,
            operation=operation,
            sequence=entry.sequence,
        )

    def record_release(self, record: ChargeRecord, *, payload_sha256: str) -> Receipt:
        """Durably audit the release of a charge's result; return its signed receipt.

        Call it after computing and *before* sending; if it raises, send nothing.
        ``payload_sha256`` is ``federation.receipts.payload_sha256`` of the released values.
        """
        return self.audit.record_release(
            self._connect(), charge_id=record.id, payload_sha256=payload_sha256
        )

    def record_refusal(self, *, consumer: str, operation: str, code: str, reason: str) -> None:
        """Audit a refused request (rate-limited per consumer; never touches the budget)."""
        self.audit.record_refusal(
            self._connect(), consumer=consumer, operation=operation, code=code, reason=reason
        )

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the database (for audit checks)."""
        return self._connect()

    def total_charged(self, consumer: str) -> float:
        """Sum of the per-release epsilons recorded for ``consumer`` (for audits and tests)."""
        rows = (
            self._connect()
            .execute("SELECT charge FROM charges WHERE consumer = ?", (consumer,))
            .fetchall()
        )
        return sum(Charge.from_json(r[0]).epsilon for r in rows)

    def count(self, consumer: str | None = None) -> int:
        """Number of recorded charges (for one consumer, or all)."""
        if consumer is None:
            row = self._connect().execute("SELECT COUNT(*) FROM charges").fetchone()
        else:
            row = (
                self._connect()
                .execute("SELECT COUNT(*) FROM charges WHERE consumer = ?", (consumer,))
                .fetchone()
            )
        return int(row[0])

    def close(self) -> None:
        """Write pending refusal counts to the audit chain and close this thread's connection."""
        self.audit.flush_refusals(self._connect())
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _status(spend: Spend, policy: ConsumerPolicy) -> BudgetStatus:
    spent = spend.epsilon_at(policy.delta) if spend.releases else 0.0
    spent = spent if math.isfinite(spent) else policy.epsilon
    return BudgetStatus(
        epsilon=policy.epsilon,
        delta=policy.delta,
        spent_epsilon=spent,
        remaining_epsilon=max(0.0, policy.epsilon - spent),
        releases=spend.releases,
        max_epsilon_per_release=policy.max_epsilon_per_release,
        max_delta_per_release=policy.max_delta_per_release,
    )
