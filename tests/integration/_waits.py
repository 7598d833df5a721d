"""Waiting helpers shared by the integration tests (bounded waits, never timing checks)."""

from __future__ import annotations

import time

from federation.coordinator import NodeClient
from federation.errors import NodeBusyError


def wait_until_busy(probe: NodeClient, *, within_s: float, problem: str) -> None:
    """Describe through ``probe`` (a client without busy retries) until the node refuses it
    busy: the caller's concurrency slots there are all held. Fails with ``problem``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            probe.describe()
        except NodeBusyError:
            return
        assert time.monotonic() < deadline, problem
        time.sleep(0.05)
