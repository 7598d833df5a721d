"""The egress audit chain: a signed, hash-chained record of everything a node releases.

Storage: the ``audit`` table of the ledger's SQLite database (``<state_dir>/ledger.sqlite``,
WAL mode, ``synchronous=FULL``). SQLite rather than an append-only file because the budget
lives there: a ``charge`` entry is inserted in the *same* ``BEGIN IMMEDIATE`` transaction
that spends the budget, so the two cannot disagree whatever the process dies of. A separate
file would need a two-phase protocol between two fsyncs to give the same guarantee.

Entries, in order (``seq`` 1, 2, ... with no gaps):

* ``key``: the public key (and certificate) that signs the entries after it; the first entry.
* ``charge``: consumer, operation, public parameters, ε/δ charged and the budget after it;
  written with the spend (``nodes.ledger.Ledger.charge``).
* ``release``: references its charge; SHA-256 of the exact payload released
  (``federation.receipts``); written after computing and *before* sending. A crash in
  between leaves a visible "charged, never released" charge: wasted budget, never an
  unrecorded release. ``consumer_release`` numbers the consumer's releases 1, 2, ...:
  it is the ``sequence`` of the consumer's receipt, which so reveals nothing of other
  consumers' activity (the chain's ``seq`` would). A gap in the numbers a consumer holds
  is a release recorded under its name that it holds no receipt for: lost after it was
  recorded (a crash, a cancelled call, a dropped connection), taken by another client
  with the same identity, or not kept; the chain names it. Releases recorded before the
  numbers existed count towards them (their receipts carry the chain position).
* ``refused``: a refused request (consumer if known, status code, reason); costs nothing.
  At most :data:`REFUSALS_PER_MINUTE` per consumer and :data:`REFUSALS_PER_MINUTE_TOTAL` in
  all are written; the rest are counted in ``suppressed_before`` of the next one written
  (or a ``refused_summary`` on shutdown), so a flood of bad requests cannot fill the disk.
* ``override``: the operator started the node on a broken chain (``--allow-broken-audit``).

Hash chain: ``hash = SHA-256(b"federation-audit-v1\\n" + f"{seq}\\n{prev_hash}\\n" + body)``
where ``body`` is the canonical JSON (``federation.receipts.canonical_json``) of the
entry's fields and ``prev_hash`` is the previous entry's hash (64 zeros for the first).
Every entry is signed: ``signature = sign(b"federation-audit-entry-v1\\n" + hash)`` with the
node's TLS key (ECDSA P-256, so anyone with the federation CA can check it) or, for a
plaintext development node, an Ed25519 key kept in the state directory (mode 0600).
Because each hash covers the previous one, the newest signature vouches for the whole
chain; ``nodes.audit_verify`` checks it all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from federation.errors import ConfigError
from federation.privacy import Charge
from federation.receipts import canonical_json, key_id_of, receipt_message
from federation.releases import BudgetStatus, Receipt
from nodes.config import NodeConfig

__all__ = [
    "ED25519_KEY_FILE",
    "GENESIS_HASH",
    "LEDGER_FILE",
    "REFUSALS_PER_MINUTE",
    "REFUSALS_PER_MINUTE_TOTAL",
    "SCHEMA",
    "AuditChain",
    "Entry",
    "Signer",
    "entry_hash",
    "ed25519_signer",
    "entry_message",
    "iter_entries",
    "load_signer",
    "open_state_dir",
    "transaction",
]

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"
ED25519_KEY_FILE = "audit-ed25519.key"
GENESIS_HASH = "0" * 64
REFUSALS_PER_MINUTE = 20
REFUSALS_PER_MINUTE_TOTAL = 100
MAX_REASON_CHARS = 300
MAX_NAME_CHARS = 128
_THROTTLE_KEYS = 256  # distinct consumers tracked before they share one bucket
_OTHERS = "<other consumers>"
_HASH_DOMAIN = "federation-audit-v1\n"
_SIGN_DOMAIN = b"federation-audit-entry-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")

Kind = Literal["key", "charge", "release", "refused", "refused_summary", "override"]
Algorithm = Literal["ecdsa-p256-sha256", "ed25519"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- position in the chain; never reused
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    consumer TEXT NOT NULL,
    ref TEXT NOT NULL,              -- release: the id of its charge entry; else ''
    body TEXT NOT NULL,             -- canonical JSON of the entry's fields (hashed)
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_kind ON audit (kind, seq);
-- A consumer's latest release, for the next receipt's number.
CREATE INDEX IF NOT EXISTS audit_consumer_kind_seq ON audit (consumer, kind, seq);
-- One release per charge, enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS audit_release_of ON audit (ref) WHERE kind = 'release';
"""


# ------------------------------------------------------------------ signing keys


@dataclass(frozen=True, slots=True)
class Signer:
    """The node's signing key and the public material that verifies it."""

    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)
    algorithm: Algorithm
    key_id: str
    public_key_pem: bytes
    certificate_pem: bytes = b""  # the node's TLS certificate (leaf), if it signs with TLS

    @classmethod
    def from_private_key(cls, key: PrivateKeyTypes, *, certificate_pem: bytes = b"") -> Signer:
        """Wrap an EC P-256 or Ed25519 private key.

        Raises:
            ConfigError: another key type or curve.
        """
        algorithm: Algorithm
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            algorithm = "ecdsa-p256-sha256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "ed25519"
        else:
            raise ConfigError(
                f"audit signing key must be EC P-256 or Ed25519; got {type(key).__name__}"
            )
        public = key.public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, algorithm, key_id_of(public), pem, certificate_pem)

    @property
    def verification_pem(self) -> bytes:
        """What verifies this key's signatures: the certificate if any, else the public key."""
        return self.certificate_pem or self.public_key_pem

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` (ECDSA P-256 with SHA-256, DER; or Ed25519)."""
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return self.private_key.sign(message)


def load_signer(config: NodeConfig) -> Signer:
    """Return the node's signing key: its TLS key, or the state directory's Ed25519 key.

    Raises:
        ConfigError: the TLS files cannot be read, or the key does not match the certificate.
    """
    if config.tls is None:
        return ed25519_signer(config.state_dir)
    cert_pem = _read(config.tls.cert, "TLS certificate")
    key = _private_key(_read(config.tls.key, "TLS private key"), config.tls.key)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as err:
        raise ConfigError(f"tls.cert {config.tls.cert} is not a PEM certificate") from err
    signer = Signer.from_private_key(key, certificate_pem=leaf.public_bytes(_PEM))
    if key_id_of(leaf.public_key()) != signer.key_id:
        raise ConfigError(f"tls.key {config.tls.key} does not belong to {config.tls.cert}")
    return signer


_PEM = serialization.Encoding.PEM


def ed25519_signer(state_dir: Path) -> Signer:
    """Return the Ed25519 key in ``state_dir``, creating it (mode 0600) the first time."""
    path = state_dir / ED25519_KEY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
    return Signer.from_private_key(_private_key(_read(path, "audit signing key"), path))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from err


def _private_key(pem: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from err


# ------------------------------------------------------------------ entries


def entry_hash(sequence: int, prev_hash: str, body: str) -> str:
    """Return an entry's hash: SHA-256 over the domain tag, its position, link and body."""
    return hashlib.sha256(f"{_HASH_DOMAIN}{sequence}\n{prev_hash}\n{body}".encode()).hexdigest()


def entry_message(hash_hex: str) -> bytes:
    """Return the bytes signed for an entry whose hash is ``hash_hex``."""
    return _SIGN_DOMAIN + hash_hex.encode("ascii")


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit entry as stored (``fields`` parsed from its body)."""

    sequence: int
    id: str
    kind: str
    time: float
    consumer: str
    operation: str
    fields: Mapping[str, object]
    prev_hash: str
    hash: str
    key_id: str
    signature: bytes


_COLUMNS = "seq, id, kind, created_at, consumer, ref, body, prev_hash, hash, key_id, signature"


def _entry_from_row(row: tuple[object, ...]) -> Entry:
    seq, entry_id, kind, created_at, consumer, _ref, body, prev, digest, key_id, sig = row
    try:
        parsed = json.loads(str(body))
    except ValueError:
        parsed = None  # a mangled body: verification reports it; readers see no fields
    fields = parsed if isinstance(parsed, dict) else {}
    operation = fields.get("operation", "")
    return Entry(
        sequence=int(str(seq)),
        id=str(entry_id),
        kind=str(kind),
        time=float(str(created_at)),
        consumer=str(consumer),
        operation=operation if isinstance(operation, str) else "",
        fields=fields,
        prev_hash=str(prev),
        hash=str(digest),
        key_id=str(key_id),
        signature=bytes(sig) if isinstance(sig, bytes | bytearray | memoryview) else b"",
    )


def iter_entries(conn: sqlite3.Connection, *, since: float | None = None) -> Iterator[Entry]:
    """Yield the stored entries in chain order (bodies parsed; nothing verified)."""
    if since is None:
        cursor = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")  # noqa: S608
    else:
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM audit WHERE created_at >= ? ORDER BY seq",  # noqa: S608
            (since,),
        )
    for row in cursor:
        yield _entry_from_row(row)


def _consumer_releases(conn: sqlite3.Connection, consumer: str) -> int:
    """How many releases the chain records for ``consumer`` (call in the write transaction).

    A receipt's number counts the consumer's releases only (1, 2, ...): the chain's
    position would tell a consumer how much others asked in between. Read from the
    consumer's latest release entry (an index seek); counted when that entry predates
    the numbers.
    """
    last = conn.execute(
        "SELECT body FROM audit WHERE consumer = ? AND kind = 'release' ORDER BY seq DESC LIMIT 1",
        (consumer,),
    ).fetchone()
    if last is None:
        return 0
    number = json.loads(str(last[0])).get("consumer_release")
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM audit WHERE consumer = ? AND kind = 'release'", (consumer,)
    ).fetchone()
    return int(count)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one ``BEGIN IMMEDIATE`` transaction (commit, or roll back and raise)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def open_state_dir(state_dir: Path) -> sqlite3.Connection:
    """Open a node's ledger for reading (an auditor's copy or a running node's).

    Read-only (SQLite's ``mode=ro``): an auditor's copy may sit on read-only storage. There,
    SQLite cannot make the shared-memory file a WAL database needs, so a ledger without a
    pending write-ahead log is opened ``immutable`` instead.

    Raises:
        ConfigError: there is no ledger in ``state_dir``, or it cannot be opened (read-only
            storage with a pending write-ahead log, not a database).
    """
    path = state_dir / LEDGER_FILE
    if not path.is_file():
        raise ConfigError(f"no audit ledger at {path}; pass the node's state_dir")
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the file
        except sqlite3.Error:
            conn.close()
            raise
    except sqlite3.OperationalError as err:
        wal = path.with_name(f"{path.name}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise ConfigError(
                f"cannot open the audit ledger {path} read-only ({err}): it has a pending "
                "write-ahead log, which SQLite cannot read without write access to the "
                "directory; copy the state dir to writable storage and audit the copy"
            ) from err
        conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
    except sqlite3.Error as err:
        raise ConfigError(f"cannot open the audit ledger {path}: {err}") from err
    conn.execute("PRAGMA query_only = ON")
    return conn


# ------------------------------------------------------------------ appending


class _RefusalThrottle:
    """Fixed one-minute windows: per-consumer and total caps on refusals written."""

    def __init__(self, per_consumer: int, total: int) -> None:
        self.per_consumer, self.total = per_consumer, total
        self._lock = threading.Lock()
        self._window = -1
        self._written: dict[str, int] = {}
        self._written_total = 0
        self.pending: dict[str, int] = {}

    def key(self, consumer: str) -> str:
        with self._lock:
            known = consumer in self._written or consumer in self.pending
            if known or len(self._written) + len(self.pending) < _THROTTLE_KEYS:
                return consumer
            return _OTHERS

    def admit(self, key: str, now: float) -> tuple[bool, int]:
        """Say whether to write this refusal; if so, also how many were suppressed before."""
        with self._lock:
            window = math.floor(now / 60.0)
            if window != self._window:
                self._window, self._written, self._written_total = window, {}, 0
            used = self._written.get(key, 0)
            if used >= self.per_consumer or self._written_total >= self.total:
                self.pending[key] = self.pending.get(key, 0) + 1
                return False, 0
            self._written[key] = used + 1
            self._written_total += 1
            return True, self.pending.pop(key, 0)

    def drain(self) -> dict[str, int]:
        with self._lock:
            pending, self.pending = self.pending, {}
            return pending


class AuditChain:
    """Appends signed, hash-chained entries to the ``audit`` table of a ledger database.

    ``append`` runs inside the caller's write transaction (the ledger's charge); the
    ``record_*`` methods open their own.
    """

    def __init__(
        self,
        *,
        node_name: str,
        signer: Signer,
        jurisdiction: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Sign entries for ``node_name`` with ``signer``."""
        self.node_name = node_name
        self.jurisdiction = jurisdiction
        self.signer = signer
        self.clock = clock
        self._throttle = _RefusalThrottle(REFUSALS_PER_MINUTE, REFUSALS_PER_MINUTE_TOTAL)

    def append(
        self,
        conn: sqlite3.Connection,
        kind: Kind,
        *,
        consumer: str,
        operation: str,
        fields: Mapping[str, object],
        entry_id: str | None = None,
        ref: str = "",
        now: float | None = None,
    ) -> Entry:
        """Append one entry; the caller must hold a write transaction (``BEGIN IMMEDIATE``).

        If the chain's current key is not this node's signing key, a ``key`` entry that
        introduces it is appended first.
        """
        if not conn.in_transaction:
            raise RuntimeError("AuditChain.append needs an open BEGIN IMMEDIATE transaction")
        at = self.clock() if now is None else now
        if kind != "key" and self._current_key(conn) != self.signer.key_id:
            self._append(
                conn,
                "key",
                consumer="",
                operation="",
                fields=self._key_fields(),
                entry_id=None,
                ref="",
                now=at,
            )
        return self._append(
            conn,
            kind,
            consumer=consumer,
            operation=operation,
            fields=fields,
            entry_id=entry_id,
            ref=ref,
            now=at,
        )

    def _append(
        self,
        conn: sqlite3.Connection,
        kind: Kind,
        *,
        consumer: str,
        operation: str,
        fields: Mapping[str, object],
        entry_id: str | None,
        ref: str,
        now: float,
    ) -> Entry:
        entry_id = entry_id or uuid.uuid4().hex
        sequence, prev_hash = _next_position(conn)
        content = {
            **fields,
            "kind": kind,
            "id": entry_id,
            "time": float(now),
            "node": self.node_name,
            "consumer": consumer,
            "operation": operation,
            "ref": ref,
        }
        body = canonical_json(content).decode("ascii")
        digest = entry_hash(sequence, prev_hash, body)
        signature = self.signer.sign(entry_message(digest))
        conn.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            (
                sequence,
                entry_id,
                kind,
                float(now),
                consumer,
                ref,
                body,
                prev_hash,
                digest,
                self.signer.key_id,
                signature,
            ),
        )
        return Entry(
            sequence,
            entry_id,
            kind,
            float(now),
            consumer,
            operation,
            content,
            prev_hash,
            digest,
            self.signer.key_id,
            signature,
        )

    def _current_key(self, conn: sqlite3.Connection) -> str | None:
        row = conn.execute(
            "SELECT body FROM audit WHERE kind = 'key' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        key_id = json.loads(row[0]).get("key_id")
        return key_id if isinstance(key_id, str) else None

    def _key_fields(self) -> dict[str, object]:
        return {
            "key_id": self.signer.key_id,
            "algorithm": self.signer.algorithm,
            "public_key": self.signer.public_key_pem.decode("ascii"),
            "certificate": self.signer.certificate_pem.decode("ascii"),
            "jurisdiction": self.jurisdiction,
        }

    # ---------------------------------------------------------------- what the ledger records

    @staticmethod
    def charge_fields(
        charge: Charge, *, charge_json: str, details: Mapping[str, object], budget: BudgetStatus
    ) -> dict[str, object]:
        """The fields of a ``charge`` entry: cost, parameters and the budget after it."""
        return {
            "epsilon": charge.epsilon,
            "delta": charge.delta,
            "mechanism": charge.mechanism,
            "charge_sha256": hashlib.sha256(charge_json.encode("utf-8")).hexdigest(),
            "parameters": dict(details),
            "budget": {
                "epsilon": budget.epsilon,
                "delta": budget.delta,
                "spent_epsilon": budget.spent_epsilon,
                "remaining_epsilon": budget.remaining_epsilon,
                "releases": budget.releases,
            },
        }

    def record_release(
        self, conn: sqlite3.Connection, *, charge_id: str, payload_sha256: str
    ) -> Receipt:
        """Durably append the ``release`` entry of a charge and return its signed receipt.

        Call it after computing the release and before sending it; if it raises, send
        nothing.

        Raises:
            ValueError: ``payload_sha256`` is not 64 lower-case hex digits, the charge is
                not in the chain, or it was already released (one release per charge).
        """
        if not _HEX64.fullmatch(payload_sha256):
            raise ValueError(
                f"payload_sha256 must be 64 lower-case hex digits; got {payload_sha256!r}"
            )
        with transaction(conn):
            row = conn.execute(
                "SELECT seq, body FROM audit WHERE id = ? AND kind = 'charge'", (charge_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"charge {charge_id!r} is not in the audit chain")
            charge = json.loads(row[1])
            consumer = str(charge["consumer"])
            fields: dict[str, float] = {
                "charge_sequence": int(row[0]),
                "consumer_release": _consumer_releases(conn, consumer) + 1,
                "epsilon": float(charge["epsilon"]),
                "delta": float(charge["delta"]),
            }
            try:
                entry = self.append(
                    conn,
                    "release",
                    consumer=consumer,
                    operation=str(charge["operation"]),
                    fields={**fields, "payload_sha256": payload_sha256},
                    ref=charge_id,
                )
            except sqlite3.IntegrityError as err:
                raise ValueError(f"charge {charge_id!r} was already released") from err
        unsigned = Receipt(
            id=entry.id,
            node_name=self.node_name,
            consumer=entry.consumer,
            issued_at=entry.time,
            payload_sha256=payload_sha256,
            key_id=self.signer.key_id,
            sequence=int(fields["consumer_release"]),
            epsilon=fields["epsilon"],
            delta=fields["delta"],
            operation=entry.operation,
            charge_id=charge_id,
        )
        return replace(unsigned, signature=self.signer.sign(receipt_message(unsigned)))

    def record_refusal(
        self, conn: sqlite3.Connection, *, consumer: str, operation: str, code: str, reason: str
    ) -> Entry | None:
        """Append a ``refused`` entry (no cost), unless this consumer is over its rate.

        Returns:
            The entry, or None when the refusal was only counted (see module docstring).
        """
        consumer = consumer[:MAX_NAME_CHARS]
        now = self.clock()
        admitted, suppressed = self._throttle.admit(self._throttle.key(consumer), now)
        if not admitted:
            return None
        fields = {
            "code": code,
            "reason": reason[:MAX_REASON_CHARS],
            "suppressed_before": suppressed,
        }
        with transaction(conn):
            return self.append(
                conn,
                "refused",
                consumer=consumer,
                operation=operation[:MAX_NAME_CHARS],
                fields=fields,
                now=now,
            )

    def flush_refusals(self, conn: sqlite3.Connection) -> None:
        """Write a ``refused_summary`` for each consumer with refusals only counted so far."""
        pending = self._throttle.drain()
        if not pending:
            return
        with transaction(conn):
            for consumer, count in sorted(pending.items()):
                self.append(
                    conn,
                    "refused_summary",
                    consumer=consumer,
                    operation="",
                    fields={"suppressed": count},
                )

    def record_override(self, conn: sqlite3.Connection, *, problems: list[str], head: int) -> Entry:
        """Append the ``override`` entry of a start on a broken chain."""
        with transaction(conn):
            return self.append(
                conn,
                "override",
                consumer="",
                operation="serve",
                fields={
                    "flag": "--allow-broken-audit",
                    "acknowledged_head": head,
                    "problems": problems[:20],
                },
            )


def _next_position(conn: sqlite3.Connection) -> tuple[int, str]:
    """The next sequence number (after the high-water mark: never reused) and the link."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    high = int(row[0]) if row else 0
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if last is None:
        return high + 1, GENESIS_HASH
    return max(high, int(last[0])) + 1, str(last[1])
