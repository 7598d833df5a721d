"""Waiting helpers shared by the integration tests (bounded waits, never timing checks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from federation.coordinator import NodeClient
from federation.errors import NodeBusyError

Call = Any  # what stream_unary(...).future() returns: a grpc.Future that is also a grpc.Call


def hold_slots(
    open_call: Callable[[], Call],
    count: int,
    probe: NodeClient,
    *,
    within_s: float,
    problem: str,
) -> list[Call]:
    """Open ``count`` calls with ``open_call`` (each holds one of the caller's concurrency slots
    at the node while it withholds its request) and return once Describe through ``probe`` (a
    client without busy retries) is refused busy: the slots are all held.

    The probe's own Describe holds a slot for a moment, so a call that arrives then is refused;
    a call that has ended, refused or cut off, is replaced by a new one. Returns every call
    opened, ended or not, so the caller can check how each ended. Fails with ``problem``.
    """
    live = [open_call() for _ in range(count)]
    opened = list(live)
    deadline = time.monotonic() + within_s
    while True:
        try:
            probe.describe()
        except NodeBusyError:
            return opened
        assert time.monotonic() < deadline, problem
        for i, call in enumerate(live):
            if call.done():
                live[i] = open_call()
                opened.append(live[i])
        time.sleep(0.05)
