"""``federation audit ...`` (run as ``python -m nodes audit ...``): check and report a ledger.

``verify --state-dir DIR`` checks the whole audit chain (hashes, links, every signature,
the keys, and that the budget agrees with the audit) and names the first broken entry;
exit code 0 when intact, 1 when broken, 2 for bad usage. ``report --state-dir DIR`` writes
the compliance report (Markdown, JSON or HTML; ``--plot`` adds a chart of cumulative ε).
Both only read the state directory; they may run while the node serves.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from federation.errors import ConfigError
from federation.receipts import ReceiptError, VerificationKey, find_receipt_records
from nodes.audit import open_state_dir
from nodes.audit_report import build_report, parse_since, plot_spend, render
from nodes.audit_verify import Verification, chain_node, check_receipts, verify_chain

__all__ = ["main"]


_UNANCHORED = (
    "the chain's hashes and links are intact and its budget agrees, but the given CA did "
    "not certify the key that signed it, so no signature was checked. Either --ca is not "
    "the CA that issued this node's certificate, or the chain was re-signed with another key."
)
_PROBLEMS_SHOWN = 20  # in text output; a wrong --ca breaks every entry of a long chain


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="federation audit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify the audit chain; exit 1 if it is broken")
    _common(v)
    v.add_argument(
        "--expect-head",
        metavar="SEQ:SHA256",
        help="a chain head noted earlier (from a report) that must still be there",
    )
    v.add_argument(
        "--receipts",
        type=Path,
        action="append",
        default=[],
        help="a consumer's query result or checkpoint JSON: each receipt in it must be in "
        "the ledger, unchanged (repeatable)",
    )
    v.add_argument("--quick", action="store_true", help="the node-start check only")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    r = sub.add_parser("report", help="spend, releases and refusals: the compliance report")
    _common(r)
    r.add_argument("--since", help="ISO date or date-time (UTC), or an age: 7d, 12h, 30m")
    r.add_argument("--format", choices=["md", "json", "html"], default="md")
    r.add_argument("--out", type=Path, help="write here instead of stdout")
    r.add_argument("--plot", type=Path, help="also draw cumulative ε per consumer to a PNG")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, required=True, help="the node's state_dir")
    p.add_argument(
        "--ca",
        type=Path,
        help="federation CA certificate: the signing certificates must be issued by it "
        "(without it, keys are trusted on first use)",
    )
    p.add_argument(
        "--trust-key",
        type=Path,
        action="append",
        default=[],
        help="PEM public key of a plaintext node's Ed25519 signing key to accept with --ca",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run an audit command; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        conn = open_state_dir(args.state_dir)
        try:
            verification = _verify(conn, args, full=not getattr(args, "quick", False))
            if args.command == "verify":
                return _print_verification(conn, verification, args)
            return _report(conn, verification, args)
        finally:
            conn.close()
    except (ConfigError, ReceiptError, OSError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except sqlite3.DatabaseError as err:  # not a ledger, or one SQLite cannot read
        sys.stderr.write(f"error: cannot read the audit ledger in {args.state_dir}: {err}\n")
        return 2


def _verify(conn: sqlite3.Connection, args: argparse.Namespace, *, full: bool) -> Verification:
    ca_pem = args.ca.read_bytes() if args.ca else None
    if ca_pem is not None:
        try:  # a wrong file is the caller's mistake (exit 2), not a broken chain (exit 1)
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as err:
            raise ConfigError(f"--ca {args.ca} is not a PEM certificate: {err}") from err
    trusted = [VerificationKey.from_pem(p.read_bytes()).key_id for p in args.trust_key]
    head = _parse_head(args.expect_head) if getattr(args, "expect_head", None) else None
    return verify_chain(conn, full=full, ca_pem=ca_pem, trusted_keys=trusted, expect_head=head)


def _parse_head(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise ConfigError(f"--expect-head: expected SEQ:SHA256 (64 hex digits); got {text!r}")
    return int(seq), digest.lower()


def _print_verification(conn: sqlite3.Connection, v: Verification, args: argparse.Namespace) -> int:
    receipt_failures: list[str] = []
    node, checked = chain_node(conn), 0
    for path in args.receipts:
        try:
            found = find_receipt_records(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
            raise ConfigError(f"--receipts {path}: not a readable JSON file: {err}") from err
        records = [r for r in found if r.receipt.node_name == node]
        if not records:
            raise ConfigError(f"--receipts {path}: no receipts of node {node!r} in it")
        receipt_failures += check_receipts(conn, records)
        checked += len(records)
    ok = v.is_intact and not receipt_failures
    if args.json:
        print(json.dumps(_verification_json(v, receipt_failures), indent=2))
        return 0 if ok else 1
    anchor = "checked against the given CA" if v.anchored else "NOT anchored (pass --ca)"
    print(
        f"audit chain in {args.state_dir}: {v.entries} entries, head {v.head_sequence} "
        f"{v.head_hash}"
    )
    print(f"signing keys: {len(v.keys)}, {anchor}; signatures checked: {v.signatures_checked}")
    if v.is_intact:
        print("OK: every entry is intact and the budget agrees with the audit")
    elif v.unanchored_only:
        print(f"NOT ANCHORED: {_UNANCHORED}")
        print(f"  first: {v.problems[0]}")
    else:
        print(f"BROKEN: first broken {v.problems[0]}")
    if not v.is_intact:
        for problem in v.problems[1:_PROBLEMS_SHOWN]:
            print(f"  also: {problem}")
        if len(v.problems) > _PROBLEMS_SHOWN:
            print(f"  ... and {len(v.problems) - _PROBLEMS_SHOWN} more (--json lists all)")
    if checked:
        print(
            f"receipts of node {node!r} checked against the ledger: {checked}, "
            f"failed: {len(receipt_failures)}"
        )
    for failure in receipt_failures:
        print(f"RECEIPT: {failure}")
    return 0 if ok else 1


def _verification_json(v: Verification, receipt_failures: list[str]) -> dict[str, object]:
    return {
        "intact": v.is_intact,
        "entries": v.entries,
        "head_sequence": v.head_sequence,
        "head_hash": v.head_hash,
        "anchored": v.anchored,
        "unanchored_only": v.unanchored_only,
        "signatures_checked": v.signatures_checked,
        "first_broken_entry": v.problems[0].sequence if v.problems else None,
        "problems": [{"entry": p.sequence, "problem": p.message} for p in v.problems],
        "receipt_failures": receipt_failures,
    }


def _report(conn: sqlite3.Connection, v: Verification, args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    report = build_report(conn, v, since=since)
    text = render(report, args.format)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        sys.stderr.write(f"wrote {args.out}\n")
    if args.plot is not None:
        plot_spend(report, args.plot)
        sys.stderr.write(f"wrote {args.plot}\n")
    if v.unanchored_only:
        sys.stderr.write(f"warning: the audit chain is NOT ANCHORED: {_UNANCHORED}\n")
        return 1
    if not v.is_intact:
        sys.stderr.write(f"warning: the audit chain is BROKEN: {v.problems[0]}\n")
        return 1
    return 0
