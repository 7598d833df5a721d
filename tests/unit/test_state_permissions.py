"""A node's ledger is readable by its owner only, whatever the umask or the state dir."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from nodes.server import _private_ledger


def test_a_new_ledger_is_created_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    old = os.umask(0)
    try:
        _private_ledger(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(path)  # an empty file is a new database to SQLite
    try:
        old = os.umask(0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE t (x)")
            conn.commit()
        finally:
            os.umask(old)
        # SQLite gives its WAL and shared-memory files the database's own mode.
        assert (tmp_path / "ledger.sqlite-wal").stat().st_mode & 0o777 == 0o600
    finally:
        conn.close()


def test_an_existing_world_readable_ledger_is_tightened(tmp_path: Path) -> None:
    # Found by review: in a state dir that already existed (0755), SQLite created the
    # ledger with the umask (0644): every local user could read who asked what.
    path = tmp_path / "ledger.sqlite"
    for name in ("ledger.sqlite", "ledger.sqlite-wal"):
        (tmp_path / name).write_bytes(b"")
        (tmp_path / name).chmod(0o644)
    _private_ledger(path)
    for name in ("ledger.sqlite", "ledger.sqlite-wal"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
