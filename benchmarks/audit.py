"""How long does verifying a node's audit chain take? (node start vs ``audit verify``).

Builds a ledger of N charge + release pairs signed with an EC P-256 key (a TLS node's),
then times the node-start check (every hash and link, key entries and the newest
signatures) and the full check (every signature, the budget recomposed). Prints seconds
per 100k entries. Writes use ``synchronous=OFF`` only to build the ledger quickly.

    .venv/bin/python benchmarks/audit.py --pairs 50000
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from federation.privacy import laplace_charge
from nodes.audit import Signer
from nodes.audit_verify import verify_chain
from nodes.config import ConsumerPolicy
from nodes.ledger import Ledger


def build(path: Path, pairs: int) -> None:
    signer = Signer.from_private_key(ec.generate_private_key(ec.SECP256R1()))
    ledger = Ledger(path, node_name="bench", signer=signer)
    ledger.connection().execute("PRAGMA synchronous=OFF")
    policy = ConsumerPolicy(name="acme", epsilon=1e9, delta=0.0, max_epsilon_per_release=1.0)
    charge = laplace_charge(epsilon=0.01, sensitivity=1)
    for i in range(pairs):
        record = ledger.charge(charge, policy=policy, operation="analyze", details={"i": i})
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        ledger.record_release(record, payload_sha256=digest)
    ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.sqlite"
        start = time.perf_counter()
        build(path, args.pairs)
        print(f"built {2 * args.pairs + 1} entries in {time.perf_counter() - start:.1f} s")
        conn = sqlite3.connect(path, isolation_level=None)
        for full in (False, True):
            start = time.perf_counter()
            result = verify_chain(conn, full=full)
            elapsed = time.perf_counter() - start
            per_100k = elapsed / result.entries * 100_000
            label = "full (audit verify)" if full else "quick (node start)"
            print(
                f"{label:<20} {elapsed:6.2f} s for {result.entries} entries = "
                f"{per_100k:5.2f} s per 100k; intact={result.is_intact}, "
                f"signatures={result.signatures_checked}"
            )
        conn.close()


if __name__ == "__main__":
    main()
