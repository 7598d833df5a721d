"""Verify a node's audit chain: hashes, links, signatures, keys, and agreement with the budget.

``verify_chain`` walks the ``audit`` table in order and reports every problem it finds, the
first one being the first broken entry:

* **edited**: an entry's stored hash is not the hash of its position, link and body, or a
  column disagrees with the signed body;
* **deleted**: a sequence number is missing (sequences are never reused: SQLite's
  AUTOINCREMENT high-water mark also reveals entries cut off the *end* of the chain);
* **reordered**: an entry's ``prev_hash`` is not the stored hash of the entry before it;
* **rewritten without the key**: hashes recomputed consistently, but a signature fails;
* **budget disagrees with the audit**: a charge without its entry (or the reverse), a cost
  edited in the ledger's ``charges`` table, or a consumer's stored spend that is not the
  composition of its audited charges.

A key-less attacker who deletes the newest entries *and* rewinds the high-water mark and
the spend is caught only by something outside the state directory: a consumer's receipt
(:func:`check_receipts`) or a chain head an auditor noted earlier (``expect_head``).

Cost (2-core machine, 100k entries): hashes and links ~0.6 s, every signature ~30 s more.
So a node start checks every hash and link, the key entries and the newest
:data:`START_SIGNATURES` signatures (the newest signature covers every hash before it);
``federation audit verify`` checks everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from federation.errors import ConfigError, InvalidRequestError
from federation.privacy import Charge, Spend
from federation.receipts import (
    ReceiptError,
    ReceiptRecord,
    VerificationKey,
    receipt_message,
    verify_signature,
)
from nodes.audit import (
    ED25519_KEY_FILE,
    GENESIS_HASH,
    LEDGER_FILE,
    AuditChain,
    ed25519_signer,
    entry_hash,
    entry_message,
    load_signer,
)
from nodes.config import NodeConfig
from nodes.ledger import Ledger

__all__ = [
    "START_SIGNATURES",
    "Problem",
    "Verification",
    "check_at_start",
    "chain_node",
    "check_receipts",
    "open_ledger",
    "verify_chain",
]

log = logging.getLogger(__name__)

START_SIGNATURES = 256
_SPECIAL = frozenset({"key", "override"})
_DOMAIN = "federation-audit-v1\n"  # nodes.audit.entry_hash, inlined on the fast path
MAX_PROBLEMS = 100


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the chain, at an entry (``sequence``) or ledger-wide (0)."""

    sequence: int
    message: str

    def __str__(self) -> str:
        """``entry N: message`` or the message alone."""
        return f"entry {self.sequence}: {self.message}" if self.sequence else self.message


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of a chain check."""

    entries: int
    head_sequence: int
    head_hash: str
    signatures_checked: int
    keys: tuple[str, ...]
    anchored: bool  # signing keys checked against the federation CA / trusted keys
    problems: tuple[Problem, ...] = field(default=())
    acknowledged_head: int = 0  # problems at or before this entry were overridden
    # Every problem found (listed or past MAX_PROBLEMS) is a signing key the given CA does
    # not vouch for, or an entry it signed. Intact otherwise, such a chain is one of two
    # things it cannot tell apart: checked against the wrong CA, or re-signed.
    unanchored_only: bool = False

    @property
    def is_intact(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    @property
    def unacknowledged(self) -> tuple[Problem, ...]:
        """Problems after the last operator override (those a node start refuses)."""
        return tuple(p for p in self.problems if p.sequence > self.acknowledged_head)


@dataclass
class _Walk:
    """State carried along the chain."""

    ca_pem: bytes | None
    trusted_keys: frozenset[str]
    sign_from: int
    keys: dict[str, PublicKeyTypes] = field(default_factory=dict)
    node: str | None = None
    problems: list[Problem] = field(default_factory=list)
    signatures: int = 0
    acknowledged: int = 0
    untrusted: set[str] = field(default_factory=set)  # key ids the given CA does not vouch for
    other_problems: bool = False  # any problem but an untrusted key, listed or not

    def flag(self, sequence: int, message: str, *, untrusted_key: bool = False) -> None:
        self.other_problems |= not untrusted_key
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(sequence, message))


def verify_chain(
    conn: sqlite3.Connection,
    *,
    full: bool = True,
    ca_pem: bytes | None = None,
    trusted_keys: Iterable[str] = (),
    expect_head: tuple[int, str] | None = None,
) -> Verification:
    """Check the whole chain in ``conn`` (one read snapshot) and say what is wrong.

    Args:
        conn: the ledger database.
        full: check every signature and the budget in detail; False checks hashes and
            links of every entry but only key entries' and the newest signatures.
        ca_pem: the federation CA: key certificates must be issued by it to the node.
            Without it, keys are trusted on first use (``anchored`` is False).
        trusted_keys: key ids of bare (Ed25519) keys to accept when ``ca_pem`` is given.
        expect_head: ``(sequence, hash)`` of a head seen earlier, which must still be there.
    """
    conn.execute("BEGIN")
    try:
        return _verify(conn, full, ca_pem, frozenset(trusted_keys), expect_head)
    finally:
        conn.execute("ROLLBACK")


def _verify(
    conn: sqlite3.Connection,
    full: bool,
    ca_pem: bytes | None,
    trusted: frozenset[str],
    expect_head: tuple[int, str] | None,
) -> Verification:
    high = _high_water(conn)
    top = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0] or 0
    walk = _Walk(ca_pem, trusted, sign_from=1 if full else max(1, top - START_SIGNATURES + 1))
    rows = conn.execute(
        "SELECT seq, id, kind, created_at, consumer, ref, body, prev_hash, hash, key_id,"
        " signature FROM audit ORDER BY seq"
    )
    count, last_seq, last_hash, charges = 0, 0, GENESIS_HASH, []
    releases: dict[str, int] = {}  # per consumer, for the receipts' numbers (full only)
    sign_from, sha256 = walk.sign_from, hashlib.sha256
    for row in rows:
        count += 1
        seq, kind, body, prev, stored = row[0], row[2], row[6], row[7], row[8]
        # Fast path (node start): an ordinary, well-linked entry whose hash checks and
        # whose signature is not due needs nothing else.
        if (
            not full
            and seq == last_seq + 1
            and seq < sign_from
            and prev == last_hash
            and kind not in _SPECIAL
            and sha256(f"{_DOMAIN}{seq}\n{prev}\n{body}".encode()).hexdigest() == stored
        ):
            last_seq, last_hash = seq, stored
            continue
        parsed = _check_row(walk, row, last_seq, last_hash, parse=full)
        if parsed is not None and parsed.get("kind") == "charge":
            charges.append((int(seq), parsed))
        if full and kind == "release":  # an unreadable one still counts (its column)
            _check_number(walk, int(seq), parsed or {"consumer": row[4]}, releases)
        last_seq, last_hash = int(seq), str(stored)
    if high > last_seq:
        gone = f"entry {high} is" if high == last_seq + 1 else f"entries {last_seq + 1}..{high} are"
        walk.flag(last_seq + 1, f"{gone} missing from the end (the chain was truncated)")
    if expect_head is not None:
        _check_anchor(conn, walk, expect_head)
    _check_budget(conn, walk, charges, full=full, head=max(high, last_seq))
    return Verification(
        entries=count,
        head_sequence=last_seq,
        head_hash=last_hash,
        signatures_checked=walk.signatures,
        keys=tuple(walk.keys),
        anchored=ca_pem is not None,
        problems=tuple(walk.problems),
        acknowledged_head=walk.acknowledged,
        unanchored_only=bool(walk.problems) and not walk.other_problems,
    )


def _high_water(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    return int(row[0]) if row else 0


def _check_row(
    walk: _Walk, row: tuple[object, ...], last_seq: int, last_hash: str, *, parse: bool
) -> dict[str, object] | None:
    """Check one entry; return its parsed body (None if not parsed or unreadable)."""
    seq, entry_id, kind, created_at, consumer, ref, body, prev, stored, key_id, sig = row
    seq, body, stored, key_id = int(str(seq)), str(body), str(stored), str(key_id)
    before = len(walk.problems)
    if seq != last_seq + 1:
        missing = f"{last_seq + 1}" if seq == last_seq + 2 else f"{last_seq + 1}..{seq - 1}"
        walk.flag(seq, f"entries before it are missing ({missing}: deleted)")
    elif prev != last_hash:
        walk.flag(seq, f"does not follow entry {last_seq} (entries reordered, or one replaced)")
    if entry_hash(seq, str(prev), body) != stored:
        walk.flag(seq, "its content does not match its hash (edited)")
    parsed: dict[str, object] | None = None
    special = kind in _SPECIAL
    if parse or special:
        parsed = _parse(body)
        columns = {
            "id": entry_id,
            "kind": kind,
            "time": created_at,
            "consumer": consumer,
            "ref": ref,
        }
        if parsed is None or any(parsed.get(k) != v for k, v in columns.items()):
            walk.flag(seq, "its columns differ from its hashed body (edited)")
            parsed = None
        elif kind == "key":
            _register_key(walk, seq, parsed)
    signed = (
        _check_signature(walk, seq, key_id, stored, sig)
        if special or seq >= walk.sign_from
        else False
    )
    if kind == "override" and parsed is not None and signed and len(walk.problems) == before:
        head = parsed.get("acknowledged_head")
        if isinstance(head, int):
            walk.acknowledged = max(walk.acknowledged, min(head, seq - 1))
    if len(walk.problems) > before + 1:  # report one problem per entry: the first found
        del walk.problems[before + 1 :]
    return parsed


def _check_number(
    walk: _Walk, seq: int, release: Mapping[str, object], releases: dict[str, int]
) -> None:
    """A release's ``consumer_release`` is one more than its consumer's releases before it."""
    consumer = str(release.get("consumer"))
    releases[consumer] = releases.get(consumer, 0) + 1
    number = release.get("consumer_release")
    if number is not None and number != releases[consumer]:
        walk.flag(
            seq,
            f"its receipt number {number} is not {consumer!r}'s release {releases[consumer]} "
            "(a consumer's releases are numbered 1, 2, ... in chain order)",
        )


def _parse(body: str) -> dict[str, object] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _register_key(walk: _Walk, seq: int, body: dict[str, object]) -> None:
    node, key_id = body.get("node"), body.get("key_id")
    if walk.node is None and isinstance(node, str):
        walk.node = node
    elif node != walk.node:
        walk.flag(seq, f"key entry names node {node!r}, but the chain belongs to {walk.node!r}")
        return
    cert, public = body.get("certificate"), body.get("public_key")
    pem = cert if isinstance(cert, str) and cert else public
    try:
        key = VerificationKey.from_pem(str(pem).encode("ascii"))
        if key.key_id != key_id:
            raise ReceiptError(f"its key is {key.key_id}, not the {key_id!r} it claims")
    except (ReceiptError, UnicodeEncodeError) as err:
        walk.flag(seq, f"untrusted signing key: {err}")
        return
    if walk.ca_pem is not None:
        try:
            if key.certificate is not None:
                key.check_issued(ca_pem=walk.ca_pem, node_name=str(node))
            elif key.key_id not in walk.trusted_keys:
                raise ReceiptError(
                    "it introduces a bare key that is neither CA-certified nor trusted"
                )
        except ReceiptError as err:
            # Not vouched for by the given CA (as opposed to a CA certificate naming
            # another node, which is wrong whatever the CA).
            foreign = key.certificate is None or not _issued_by(key, walk.ca_pem)
            if foreign:
                walk.untrusted.add(key.key_id)
            walk.flag(seq, f"untrusted signing key: {err}", untrusted_key=foreign)
            return
    walk.keys[key.key_id] = key.public_key


def _issued_by(key: VerificationKey, ca_pem: bytes) -> bool:
    """Whether the given CA issued ``key``'s certificate (False if the CA does not load)."""
    try:
        return key.issued_by(ca_pem)
    except ReceiptError:
        return False


def _check_signature(walk: _Walk, seq: int, key_id: str, digest: str, sig: object) -> bool:
    key = walk.keys.get(key_id)
    if key is None:
        walk.flag(
            seq,
            f"signed by key {key_id}, which no trusted key entry introduced",
            untrusted_key=key_id in walk.untrusted,
        )
        return False
    walk.signatures += 1
    signature = bytes(sig) if isinstance(sig, bytes | bytearray | memoryview) else b""
    if not verify_signature(key, entry_message(digest), signature):
        walk.flag(seq, "its signature does not verify (rewritten without the node's key)")
        return False
    return True


def _check_anchor(conn: sqlite3.Connection, walk: _Walk, head: tuple[int, str]) -> None:
    seq, digest = head
    row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        walk.flag(seq, "the expected head entry is gone (the chain was truncated)")
    elif row[0] != digest:
        walk.flag(seq, "the expected head entry has another hash (the chain was rewritten)")


def _check_budget(
    conn: sqlite3.Connection,
    walk: _Walk,
    charges: list[tuple[int, dict[str, object]]],
    *,
    full: bool,
    head: int,
) -> None:
    """Check that the budget tables and the chain's charge entries agree."""
    unaudited = conn.execute(
        # Ids are unique across the chain, so an id match is the charge's entry (its kind
        # is checked with its body by the full check); the covering index keeps this fast.
        "SELECT c.id FROM charges c LEFT JOIN audit a ON a.id = c.id WHERE a.id IS NULL LIMIT 1"
    ).fetchone()
    if unaudited is not None:
        walk.flag(head, f"charge {unaudited[0]} is in the budget but not in the audit chain")
    unbudgeted = conn.execute(
        "SELECT a.seq FROM audit a LEFT JOIN charges c ON c.id = a.id"
        " WHERE a.kind = 'charge' AND c.id IS NULL ORDER BY a.seq LIMIT 1"
    ).fetchone()
    if unbudgeted is not None:
        walk.flag(int(unbudgeted[0]), "audited charge is missing from the budget's charges")
    stored: dict[str, Spend] = {}
    for consumer, state in conn.execute("SELECT consumer, state FROM spend"):
        try:
            stored[str(consumer)] = Spend.from_json(str(state))
        except (InvalidRequestError, ValueError):
            walk.flag(head, f"consumer {consumer!r}: its stored spend does not parse")
    if full:
        _check_composition(conn, walk, charges, stored, head)
        return
    counts = dict(
        conn.execute("SELECT consumer, COUNT(*) FROM audit WHERE kind = 'charge' GROUP BY consumer")
    )
    for consumer in sorted(set(stored) | set(counts)):
        spend = stored.get(consumer, Spend())
        if spend.releases != counts.get(consumer, 0):
            walk.flag(
                head,
                f"consumer {consumer!r}: the budget counts {spend.releases} "
                f"releases, the audit chain {counts.get(consumer, 0)}",
            )


def _check_composition(
    conn: sqlite3.Connection,
    walk: _Walk,
    charges: list[tuple[int, dict[str, object]]],
    stored: dict[str, Spend],
    head: int,
) -> None:
    """Recompose every consumer's spend from its audited charges, in chain order."""
    rows = {
        str(i): (str(c), str(j))
        for i, c, j in conn.execute("SELECT id, consumer, charge FROM charges")
    }
    composed: dict[str, Spend] = {}
    for seq, body in charges:
        row = rows.get(str(body.get("id")))
        if row is None:
            continue  # already reported
        consumer, charge_json = row
        digest = hashlib.sha256(charge_json.encode("utf-8")).hexdigest()
        if consumer != body.get("consumer") or digest != body.get("charge_sha256"):
            walk.flag(seq, "the budget's record of this charge was altered (cost or consumer)")
            continue
        composed[consumer] = composed.get(consumer, Spend()).plus(Charge.from_json(charge_json))
    for consumer in sorted(set(stored) | set(composed)):
        if stored.get(consumer, Spend()) != composed.get(consumer, Spend()):
            walk.flag(
                head,
                f"consumer {consumer!r}: the stored spend is not the composition "
                "of its audited charges (budget edited)",
            )


# ------------------------------------------------------------------ node start


def check_at_start(
    conn: sqlite3.Connection,
    chain: AuditChain,
    *,
    allow_broken: bool,
    ca_pem: bytes | None,
    trusted_keys: Iterable[str] = (),
) -> Verification:
    """Verify the chain before serving; refuse a broken one unless the operator overrides.

    Raises:
        ConfigError: the chain has problems after the last override and ``allow_broken``
            is False (the message names the first broken entry and the way out).
    """
    result = verify_chain(conn, full=False, ca_pem=ca_pem, trusted_keys=trusted_keys)
    fresh = result.unacknowledged
    if result.problems and not fresh:
        log.warning(
            "audit chain of node %r has %d problem(s), acknowledged by an operator override "
            "at or after entry %d; first: %s",
            chain.node_name,
            len(result.problems),
            result.acknowledged_head,
            result.problems[0],
        )
    if not fresh:
        return result
    where = f"the audit chain of node {chain.node_name!r} is broken: {fresh[0]}"
    if not allow_broken:
        raise ConfigError(
            f"{where}. Refusing to serve. Inspect it with `federation audit verify "
            "--state-dir <state_dir>`; to serve anyway, and record that you did in the "
            "chain, start the node with --allow-broken-audit"
        )
    banner = "!" * 78
    log.critical(
        "\n%s\n%s\nSERVING ANYWAY because of --allow-broken-audit; %d problem(s):\n%s\n"
        "This override is recorded in the audit chain.\n%s",
        banner,
        where,
        len(fresh),
        "\n".join(f"  - {p}" for p in fresh[:20]),
        banner,
    )
    head = max(result.head_sequence, _high_water(conn), max(p.sequence for p in fresh))
    chain.record_override(conn, problems=[str(p) for p in fresh], head=head)
    return result


def reconcile_budgets(
    conn: sqlite3.Connection, deltas: Mapping[str, float]
) -> tuple[dict[str, str], dict[str, str]]:
    """After an override, never serve a budget below what the ledger shows was spent.

    A broken chain may come with a damaged budget: the ``spend`` table is a running total,
    and serving from a deleted or edited row would give a consumer its spent epsilon back.
    Each consumer's spend is recomposed from every charge the ledger holds for it (the
    budget's charge rows, intact or not: counting more is safe), and the stored spend is
    raised to the element-wise maximum of the two (epsilon and delta sums, every RDP order,
    releases), an upper bound of both now and after any later charge. A consumer is frozen
    (the node charges it nothing more until its operator restores the ledger) where what
    it spent cannot be recomposed: an audited charge whose budget row is missing or
    altered, or a row that does not parse. The consumer is taken from every place that
    names it (the budget row, the audit entry's column and body), so a damaged entry
    cannot shift the freeze onto another name.

    Returns:
        Consumers whose spend was raised (with from/to, at their delta: ``deltas``, 1e-6
        for one no longer configured), and frozen consumers (with why).
    """
    frozen: dict[str, str] = {}
    composed: dict[str, Spend] = {}
    rows: dict[str, tuple[str, str]] = {}
    for entry_id, consumer, charge_json in conn.execute("SELECT id, consumer, charge FROM charges"):
        rows[str(entry_id)] = (str(consumer), str(charge_json))
        try:
            charge = Charge.from_json(str(charge_json))
        except (InvalidRequestError, ValueError) as err:
            frozen.setdefault(str(consumer), f"its budget charge {entry_id} does not parse: {err}")
            continue
        composed[str(consumer)] = composed.get(str(consumer), Spend()).plus(charge)
    for seq, entry_id, column, body in conn.execute(
        "SELECT seq, id, consumer, body FROM audit WHERE kind = 'charge' ORDER BY seq"
    ):
        parsed = _parse(str(body)) or {}
        row = rows.get(str(entry_id))
        names = {str(column), str(parsed.get("consumer", column))}
        if row is not None:
            names.add(row[0])
        intact = (
            row is not None
            and names == {row[0]}
            and hashlib.sha256(row[1].encode("utf-8")).hexdigest() == parsed.get("charge_sha256")
        )
        if not intact:
            why = f"its audited charge at entry {seq} is missing from the budget or altered"
            for name in sorted(names - {""}):
                frozen.setdefault(name, why)
    stored: dict[str, Spend] = {}
    unreadable: set[str] = set()
    for consumer, state in conn.execute("SELECT consumer, state FROM spend"):
        try:
            stored[str(consumer)] = Spend.from_json(str(state))
        except (InvalidRequestError, ValueError) as err:
            frozen.setdefault(str(consumer), f"its stored spend does not parse: {err}")
            unreadable.add(str(consumer))
    raised: dict[str, str] = {}
    # Frozen consumers too: their budget then shows at least what the ledger holds.
    for consumer in sorted(set(composed) - unreadable):
        before = stored.get(consumer, Spend())
        after = _upper(before, composed[consumer])
        if after == before:
            continue
        conn.execute(
            "INSERT INTO spend (consumer, state) VALUES (?, ?)"
            " ON CONFLICT(consumer) DO UPDATE SET state = excluded.state",
            (consumer, after.to_json()),
        )
        delta = deltas.get(consumer, 1e-6)
        raised[consumer] = (
            f"epsilon {before.epsilon_at(delta):.6g} -> {after.epsilon_at(delta):.6g} "
            f"({before.releases} -> {after.releases} releases)"
        )
    return raised, frozen


def _upper(a: Spend, b: Spend) -> Spend:
    """A spend at least as large as ``a`` and ``b`` by every measure the ledger composes."""
    return Spend(
        epsilon_sum=max(a.epsilon_sum, b.epsilon_sum),
        delta_sum=max(a.delta_sum, b.delta_sum),
        rdp=tuple(max(x, y) for x, y in zip(a.rdp, b.rdp, strict=True)),
        releases=max(a.releases, b.releases),
    )


# ------------------------------------------------------------------ receipts vs ledger


def chain_node(conn: sqlite3.Connection) -> str:
    """The node a chain belongs to, as its first key entry names it ("" if none)."""
    row = conn.execute("SELECT body FROM audit WHERE kind = 'key' ORDER BY seq LIMIT 1").fetchone()
    node = (_parse(str(row[0])) or {}).get("node") if row else None
    return node if isinstance(node, str) else ""


def check_receipts(conn: sqlite3.Connection, records: Iterable[ReceiptRecord]) -> list[str]:
    """Check that each receipt a consumer holds is in the chain, unchanged and signed.

    Returns:
        One message per receipt that fails (empty if all hold).
    """
    keys: dict[str, PublicKeyTypes] = {}
    for (body,) in conn.execute("SELECT body FROM audit WHERE kind = 'key'"):
        parsed = _parse(str(body)) or {}
        pem = parsed.get("certificate") or parsed.get("public_key")
        try:
            key = VerificationKey.from_pem(str(pem).encode("ascii"))
        except ReceiptError:
            continue
        keys[key.key_id] = key.public_key
    failures = []
    for record in records:
        receipt = record.receipt
        row = conn.execute(
            "SELECT seq, kind, ref, body FROM audit WHERE id = ?", (receipt.id,)
        ).fetchone()
        label = (
            f"receipt {receipt.id} (release {receipt.sequence} of {receipt.consumer!r}, "
            f"node {receipt.node_name!r})"
        )
        body = _parse(str(row[3])) if row else None
        # The receipt's number is the consumer's release count (``consumer_release``);
        # receipts from before it was were numbered by the chain's position.
        number = body.get("consumer_release", row[0]) if row and body is not None else None
        if row is None or body is None:
            failures.append(f"{label}: no such entry in the ledger (deleted or truncated)")
        elif (row[1], row[2], body.get("consumer"), number) != (
            "release",
            receipt.charge_id,
            receipt.consumer,
            receipt.sequence,
        ):
            failures.append(f"{label}: the ledger's entry {receipt.id} is another release")
        elif body.get("payload_sha256") != receipt.payload_sha256 or (
            body.get("epsilon"),
            body.get("delta"),
        ) != (receipt.epsilon, receipt.delta):
            failures.append(f"{label}: the ledger records another digest or cost")
        elif receipt.key_id not in keys or not verify_signature(
            keys[receipt.key_id], receipt_message(receipt), receipt.signature
        ):
            failures.append(f"{label}: its signature does not verify with the node's key")
    return failures


# ------------------------------------------------------------------ opening a node's ledger


def open_ledger(config: NodeConfig, *, allow_broken_audit: bool = False) -> Ledger:
    """Open the node's ledger with its signing key, and verify the audit chain first.

    Raises:
        ConfigError: the chain is broken and ``allow_broken_audit`` is False, or the
            signing key cannot be loaded.
    """
    ledger = Ledger(
        config.state_dir / LEDGER_FILE,
        node_name=config.name,
        jurisdiction=config.jurisdiction,
        signer=load_signer(config),
    )
    trusted = []
    if (config.state_dir / ED25519_KEY_FILE).exists():
        trusted.append(ed25519_signer(config.state_dir).key_id)  # an earlier plaintext run
    try:
        ca_pem = config.tls.ca.read_bytes() if config.tls is not None else None
        result = check_at_start(
            ledger.connection(),
            ledger.audit,
            allow_broken=allow_broken_audit,
            ca_pem=ca_pem,
            trusted_keys=trusted,
        )
        if result.problems:  # serving past problems (now or at an earlier override)
            raised, frozen = reconcile_budgets(
                ledger.connection(), {n: c.delta for n, c in config.consumers.items()}
            )
            for consumer, change in raised.items():
                log.critical(
                    "consumer %r: its stored budget was below the composition of its "
                    "audited charges; raised, %s",
                    consumer,
                    change,
                )
            for consumer, why in frozen.items():
                log.critical(
                    "consumer %r: budget FROZEN, nothing more is charged to it until the "
                    "ledger is restored: %s",
                    consumer,
                    why,
                )
            ledger.freeze(frozen)
    except BaseException:
        ledger.close()
        raise
    return ledger
