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
deadline as soon as the call's headers arrive, and only then reads the request, which must
arrive within the node's ``max_request_read_s`` (default :data:`REQUEST_READ_S`, at most
``max_request_s``) or the call is cancelled. A caller that withholds or trickles its request
therefore holds one of its own slots for at most ``max_request_read_s``. The health service
(``nodes.health``) is admitted and read the same way; Train is admitted the same way, and
its stream has the ``max_request_s`` deadline. Health calls need no policy entry, so they
have limits of their own: :data:`HEALTH_MAX_CONCURRENT` at once per certificate,
:func:`health_total_limit` at once on the whole node (every certificate together), and each
is cancelled after ``min(HEALTH_CALL_S, max_request_s)``.

The guarantee: one consumer's requests hold at most its ``max_concurrent_requests`` of the
node's ``max_workers`` threads, whatever it sends or withholds, and all health calls
together, from any number of certificates, hold at most ``health_total_limit(max_workers)``;
a caller refused at admission (no policy entry, over a limit) holds a thread only while it
is refused. So while ``max_workers`` exceeds the largest ``max_concurrent_requests`` plus
``health_total_limit(max_workers)``, no one consumer, even with every health call on its
side, can occupy every worker thread (the node warns at start when it does not). Several
consumers at their limits together still can: size ``max_workers`` for them. While the
node-wide health limit is full, health probes are refused (``RESOURCE_EXHAUSTED``): the
price of keeping them off the consumers' threads.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from federation.errors import NodeBusyError

__all__ = [
    "HEALTH_CALL_S",
    "HEALTH_MAX_CONCURRENT",
    "REQUEST_READ_S",
    "ConcurrencyLimiter",
    "Deadline",
    "Watchdog",
    "health_total_limit",
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
# Seconds a health call may run (Check answers at once; a Watch stream then ends and its
# client watches again), or max_request_s if that is shorter.
HEALTH_CALL_S = 10.0
# Default seconds between admission and the arrival of a unary call's request message
# (node.max_request_read_s, never above max_request_s): a withheld request is cut off then.
REQUEST_READ_S = 10.0


def health_total_limit(max_workers: int) -> int:
    """Return how many health calls a node runs at once, every caller together.

    A quarter of the worker threads, at least one: any certificate of the federation may
    check health, so no number of them may take more of the pool than that.

    >>> health_total_limit(8), health_total_limit(16), health_total_limit(3)
    (2, 4, 1)
    """
    return max(1, max_workers // 4)


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
        # gRPC sets SO_REUSEPORT by default: a second node process started on the same
        # address (with another state_dir, so another ledger) would bind too, and the
        # kernel would share connections between two budgets. Binding must fail instead.
        ("grpc.so_reuseport", 0),
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
    """Count running requests per consumer and on the node; refuse, never wait, beyond a limit."""

    def __init__(self, *, node: str, what: str = "requests") -> None:
        """Start with nothing running; ``node`` and ``what`` (plural) name both in refusals."""
        self._node = node
        self._what = what
        self._lock = threading.Lock()
        self._running: dict[str | None, int] = {}

    def running(self, consumer: str | None) -> int:
        """Return how many requests of ``consumer`` (None: node-wide slots) are running now."""
        with self._lock:
            return self._running.get(consumer, 0)

    def slot(self, consumer: str, *, limit: int) -> AbstractContextManager[None]:
        """Hold one of ``consumer``'s ``limit`` slots for the duration of the block.

        Raises:
            NodeBusyError: ``limit`` requests of ``consumer`` are already running
                (gRPC ``RESOURCE_EXHAUSTED``, trailer ``federation-refusal: busy``); nothing
                has been charged.
        """
        return self._hold(
            consumer,
            limit,
            f"too many concurrent {self._what} for consumer {consumer!r} on node "
            f"{self._node!r} (limit {limit}); nothing was charged: retry when one of "
            f"your {self._what} has finished",
        )

    def node_slot(self, *, limit: int) -> AbstractContextManager[None]:
        """Hold one of the ``limit`` slots that every caller shares, for the block.

        Counted apart from the per-consumer slots of :meth:`slot` (nest the two).

        Raises:
            NodeBusyError: ``limit`` of these are already running on the node
                (gRPC ``RESOURCE_EXHAUSTED``, trailer ``federation-refusal: busy``); nothing
                has been charged.
        """
        return self._hold(
            None,
            limit,
            f"too many concurrent {self._what} on node {self._node!r} (limit {limit}, all "
            "callers together); nothing was charged: retry in a few seconds",
        )

    @contextmanager
    def _hold(self, key: str | None, limit: int, refusal: str) -> Iterator[None]:
        with self._lock:
            running = self._running.get(key, 0)
            if running >= limit:
                raise NodeBusyError(refusal)
            self._running[key] = running + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._running[key] - 1
                if left:
                    self._running[key] = left
                else:
                    del self._running[key]


def _nothing() -> None:
    """The action of a finished deadline."""


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
    def fired(self) -> bool:
        """Whether the deadline fired (``on_expiry`` ran); final once :meth:`finish` returns."""
        with self._lock:
            return self._fired

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed (streaming handlers stop at the next chunk)."""
        return self._fired or self._clock() >= self.due

    def finish(self) -> None:
        """Mark the request done: the deadline will not fire any more.

        Its action is dropped at once: the watchdog keeps a finished deadline until it
        falls due, and the action holds its call's context (a Train stream starts one
        deadline per weights chunk: hundreds per round, each kept for the read limit).
        """
        with self._lock:
            self._finished = True
            self._on_expiry = _nothing

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
            if self._heap[0][2] is watch:  # due first: the thread must wait less
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
