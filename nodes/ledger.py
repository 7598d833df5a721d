"""The privacy ledger: durable, atomic check-and-charge per (node, consumer).

Storage is SQLite in WAL mode with ``synchronous=FULL`` in the node's state directory. A
charge is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock (which also
serialises other *processes* sharing the file), reads the consumer's composed spend, checks
the new total against the budget, inserts the charge and updates the spend, then commits.
Only after the commit returns does the node compute and release anything, so a crash can
waste budget but never release something unrecorded.

The spend composes every release with ``federation.privacy.Spend``: the smaller of basic
composition and Rényi-DP composition at the consumer's delta (both valid bounds).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from federation.errors import BudgetExhaustedError
from federation.privacy import Charge, Spend
from federation.releases import BudgetStatus
from nodes.config import ConsumerPolicy

__all__ = ["ChargeRecord", "Ledger"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    consumer TEXT PRIMARY KEY,
    state TEXT NOT NULL            -- Spend.to_json()
);
CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,       -- receipt id
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


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """The durable record of one accepted charge."""

    id: str
    consumer: str
    created_at: float
    budget: BudgetStatus


class Ledger:
    """Per-consumer privacy spend, persisted in ``<state_dir>/ledger.sqlite``."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the ledger database at ``path``."""
        self.path = path
        self._local = threading.local()
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
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

    def status(self, policy: ConsumerPolicy) -> BudgetStatus:
        """Return the consumer's budget status under its current policy."""
        return _status(self.spend(policy.name), policy)

    def charge(
        self,
        charge: Charge,
        *,
        policy: ConsumerPolicy,
        operation: str,
        details: dict[str, object],
    ) -> ChargeRecord:
        """Atomically check ``charge`` against the budget and record it durably.

        Raises:
            BudgetExhaustedError: the composed spend would exceed the budget; nothing is
                recorded. The message carries ``remaining_epsilon=...``.
        """
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
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
            conn.execute(
                "INSERT INTO charges (id, consumer, operation, created_at, charge, details,"
                " spent_epsilon) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record_id,
                    policy.name,
                    operation,
                    now,
                    charge.to_json(),
                    json.dumps(details, sort_keys=True),
                    spent,
                ),
            )
            conn.execute(
                "INSERT INTO spend (consumer, state) VALUES (?, ?)"
                " ON CONFLICT(consumer) DO UPDATE SET state = excluded.state",
                (policy.name, after.to_json()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return ChargeRecord(
            id=record_id, consumer=policy.name, created_at=now, budget=_status(after, policy)
        )

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
        """Close this thread's connection."""
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
    )
