"""Request limits: per-consumer concurrency, server-side deadlines, transport options.

Three layers keep one consumer from starving the others or holding a node's resources:

1. **Transport** (:func:`server_options`): gRPC's own limits on message size, keepalive,
   idle connections and connection age. Connection age is the hard backstop: every RPC on a
   connection is cut off at most ``max_connection_age + grace`` after the connection opened,
   whoever the caller is and whatever stage the call is in (a client that trickles its
   request bytes, or never half-closes a stream, included).
2. **Concurrency** (:class:`ConcurrencyLimiter`): at most ``max_concurrent_requests``
   requests per consumer run at once. The check never blocks: a request over the limit is
   refused at once with ``RESOURCE_EXHAUSTED`` before anything is validated or charged, so a
   burst from one consumer costs the others nothing but the microseconds of that refusal.
3. **Deadline** (:class:`Watchdog`): a request that runs longer than the node's
   ``max_request_s`` (whatever deadline its client asked for) is cancelled by the server;
   a Train stream included (:meth:`nodes.guard.Guard.admit` takes another limit, but the
   node passes none), so ``max_request_s`` must cover a whole training round.

Admission comes before reading: unary methods are served as client streams
(``nodes._unary``), so a handler identifies the caller, takes its slot and starts its
deadline as soon as the call's headers arrive, and only then reads the request. A caller that
withholds or trickles its request therefore holds one of its own slots, and is cut off at
``max_request_s`` like any other request; Train and the health service (``nodes.health``,
at most :data:`HEALTH_MAX_CONCURRENT` calls per certificate) are admitted the same way.

The guarantee: one consumer holds at most ``max_concurrent_requests`` +
:data:`HEALTH_MAX_CONCURRENT` of the node's ``max_workers`` threads, each for at most
``max_request_s``, whatever it sends or withholds; other consumers are unharmed while
``max_workers`` exceeds that (the node warns at start when it does not). A refusal over the
limit holds a thread only for the microseconds it takes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from federation.errors import BudgetExhaustedError

__all__ = [
    "HEALTH_MAX_CONCURRENT",
    "ConcurrencyLimiter",
    "Deadline",
    "Watchdog",
    "server_options",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Keepalive: the server pings a connection that carries calls every 60 s and drops it when a
# ping goes unanswered for 20 s, so a vanished peer (half-open TCP) frees its calls in ~80 s.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Clients may ping at most once a minute without data; two violations close the connection
# (GOAWAY "too_many_pings"), so a ping flood cannot keep a node busy.
MIN_CLIENT_PING_INTERVAL_MS = 60_000
MAX_PING_STRIKES = 2
# A connection with no call for 5 minutes is closed (abandoned clients hold no sockets).
MAX_CONNECTION_IDLE_MS = 300_000
# Deliberately no grpc.max_concurrent_streams: with gRPC's overload protection (on by
# default) it counts streams not yet freed, finished ones included, and answers a well-behaved
# client's next call with REFUSED_STREAM under load. A per-connection cap would not stop a
# consumer anyway (it can open more connections); the per-consumer limit below does.

# Health calls (Check, Watch) one certificate may have running at once, over and above its
# max_concurrent_requests: enough for a prober and a watcher, never a pool's worth of threads.
HEALTH_MAX_CONCURRENT = 2


def server_options(
    *, max_message_bytes: int, max_request_s: float, longest_rpc_s: float | None = None
) -> list[tuple[str, int]]:
    """Return the gRPC server options that bound message sizes and connection lifetimes.

    Args:
        max_message_bytes: largest message a node receives or sends (bytes).
        max_request_s: the node's server-side deadline for one request (seconds).
        longest_rpc_s: the longest any RPC may legitimately run (e.g. a streaming training
            round); defaults to ``max_request_s``. It becomes the grace period that calls
            in flight get once their connection reaches its maximum age.

    Returns:
        ``(name, value)`` pairs for ``grpc.server(options=...)``.
    """
    longest = max_request_s if longest_rpc_s is None else max(longest_rpc_s, max_request_s)
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # 0 = unlimited: keep probing a connection whose call has stalled (no data), which
        # is exactly the connection a slow-loris client or a dead peer leaves behind.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        # After max_request_s a connection is told to go away (clients reconnect for new
        # calls); calls still running get `longest` more, then the connection is closed.
        # No call can therefore outlive its connection's age + grace, whatever it does.
        ("grpc.max_connection_age_ms", _ms(max_request_s)),
        ("grpc.max_connection_age_grace_ms", _ms(longest)),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class ConcurrencyLimiter:
    """Count running requests per consumer; refuse, never wait, beyond a limit."""

    def __init__(self, *, node: str, what: str = "requests") -> None:
        """Start with nothing running; ``node`` and ``what`` (plural) name both in refusals."""
        self._node = node
        self._what = what
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}

    def running(self, consumer: str) -> int:
        """Return how many requests of ``consumer`` are running now."""
        with self._lock:
            return self._running.get(consumer, 0)

    @contextmanager
    def slot(self, consumer: str, *, limit: int) -> Iterator[None]:
        """Hold one of ``consumer``'s ``limit`` slots for the duration of the block.

        Raises:
            BudgetExhaustedError: ``limit`` requests of ``consumer`` are already running
                (gRPC ``RESOURCE_EXHAUSTED``); nothing has been charged.
        """
        with self._lock:
            running = self._running.get(consumer, 0)
            if running >= limit:
                raise BudgetExhaustedError(
                    f"too many concurrent {self._what} for consumer {consumer!r} on node "
                    f"{self._node!r} (limit {limit}); nothing was charged: retry when one of "
                    f"your {self._what} has finished"
                )
            self._running[consumer] = running + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._running[consumer] - 1
                if left:
                    self._running[consumer] = left
                else:
                    del self._running[consumer]


class Deadline:
    """A request's server-side deadline; the :class:`Watchdog` fires it when due."""

    def __init__(self, due: float, on_expiry: Callable[[], None], *, clock: Clock) -> None:
        """Fire ``on_expiry`` at ``due`` (on ``clock``) unless finished first."""
        self.due = due
        self._on_expiry = on_expiry
        self._clock = clock
        self._lock = threading.Lock()
        self._finished = False
        self._fired = False

    @property
    def remaining_s(self) -> float:
        """Seconds left before the deadline (0 once passed)."""
        return max(0.0, self.due - self._clock())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed (streaming handlers stop at the next chunk)."""
        return self._fired or self._clock() >= self.due

    def finish(self) -> None:
        """Mark the request done: the deadline will not fire any more."""
        with self._lock:
            self._finished = True

    def fire(self) -> bool:
        """Run ``on_expiry`` once unless finished; return whether it ran."""
        with self._lock:
            if self._finished or self._fired:
                return False
            self._fired = True
        self._on_expiry()
        return True


class Watchdog:
    """One daemon thread that fires request deadlines when they fall due.

    The thread starts with the first deadline and stops on :meth:`close`; finished deadlines
    are dropped lazily when they come up, so :meth:`Deadline.finish` is O(1).
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        """Create an idle watchdog (no thread until the first deadline)."""
        self._clock = clock
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def deadline(self, on_expiry: Callable[[], None], *, timeout_s: float) -> Iterator[Deadline]:
        """Fire ``on_expiry`` if the block is still running after ``timeout_s`` seconds."""
        watch = self.start(on_expiry, timeout_s=timeout_s)
        try:
            yield watch
        finally:
            watch.finish()

    def start(self, on_expiry: Callable[[], None], *, timeout_s: float) -> Deadline:
        """Schedule ``on_expiry`` in ``timeout_s`` seconds; call ``finish()`` to cancel."""
        watch = Deadline(self._clock() + timeout_s, on_expiry, clock=self._clock)
        with self._condition:
            if self._closed:
                raise RuntimeError("watchdog is closed")
            heapq.heappush(self._heap, (watch.due, next(self._sequence), watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="request-watchdog", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        return watch

    def close(self) -> None:
        """Stop the thread; pending deadlines no longer fire."""
        with self._condition:
            self._closed = True
            self._heap.clear()
            self._condition.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (not self._heap or self._heap[0][0] > self._clock()):
                    wait = self._heap[0][0] - self._clock() if self._heap else None
                    self._condition.wait(wait)
                if self._closed:
                    return
                _, _, watch = heapq.heappop(self._heap)
            try:
                watch.fire()
            except Exception:  # an expiry action must never kill the watchdog thread
                log.exception("request deadline action failed")
