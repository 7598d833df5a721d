"""Who is calling, and may they do this? The one place a consumer identity comes from.

With TLS (production), the identity is the common name of the client certificate that the
TLS handshake verified against the federation CA; certificates listed in the operator's
revocation file are refused. Without TLS (allowed only on loopback with ``--insecure``, for
development), the caller names itself in the ``x-federation-consumer`` metadata header.
Every refusal is logged with the reason; nothing is charged for a refused request.

The revocation file is re-read on SIGHUP and whenever its modification time changes. If it
cannot be read or parsed, the node fails closed: it refuses every certificate until the
operator fixes the file (and logs why), since keeping an old list could let through the
very certificate the operator just tried to revoke.

:meth:`Guard.admit` runs the whole admission of one request: identify, authorize, take one
of the consumer's concurrency slots, and start the server-side deadline (``nodes.limits``).
:meth:`Guard.admit_health` does the same for the health service, without the policy check
but with a node-wide limit too. :meth:`Guard.read_deadline` then bounds the wait for the
request message of an admitted call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from federation import pki
from federation.errors import ConfigError, PolicyError, UnauthenticatedError
from nodes.config import ConsumerPolicy, NodeConfig
from nodes.limits import (
    HEALTH_CALL_S,
    HEALTH_MAX_CONCURRENT,
    ConcurrencyLimiter,
    Deadline,
    Watchdog,
    health_total_limit,
)

__all__ = ["ANONYMOUS", "CONSUMER_HEADER", "Admission", "Guard", "HealthAdmission"]

log = logging.getLogger(__name__)

CONSUMER_HEADER = "x-federation-consumer"
# Who a plaintext health call without the consumer header counts as (loopback only).
ANONYMOUS = "<anonymous>"


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: who is calling, under which policy, and until when."""

    consumer: str
    policy: ConsumerPolicy
    deadline: Deadline


@dataclass(frozen=True, slots=True)
class HealthAdmission:
    """An admitted health call: who is calling (maybe anonymous) and until when."""

    caller: str
    deadline: Deadline


class Guard:
    """Identify callers and check them against the node's per-consumer policy."""

    def __init__(self, config: NodeConfig, *, use_tls: bool) -> None:
        """Build the guard; loads the revocation file if the config names one."""
        self.config = config
        self.use_tls = use_tls
        self.limiter = ConcurrencyLimiter(node=config.name)
        self.health_limiter = ConcurrencyLimiter(node=config.name, what="health calls")
        self.health_total = health_total_limit(config.max_workers)
        self.watchdog = Watchdog()
        self._lock = threading.Lock()
        self._revoked: frozenset[str] = frozenset()
        self._revocation_mtime: float | None = None
        self._revocation_error: str | None = None
        self.reload_revocations()

    @property
    def _revocation_path(self) -> Path | None:
        return self.config.tls.revocation if self.config.tls else None

    def reload_revocations(self) -> None:
        """Re-read the revocation file (on SIGHUP, or when its modification time changes).

        Never raises (it runs in a signal handler): a missing, unreadable or malformed file
        is logged and makes :meth:`identify` refuse every certificate until it is fixed.
        """
        path = self._revocation_path
        if path is None:
            return
        try:
            mtime: float | None = path.stat().st_mtime
            revoked = pki.read_revocation_file(path)
            error = None
        except (OSError, ConfigError) as err:
            mtime = self._stat_mtime(path)
            revoked, error = frozenset(), str(err)
        with self._lock:
            self._revoked, self._revocation_mtime = revoked, mtime
            self._revocation_error = error
        if error is None:
            log.info("revocation list loaded: %d entries", len(revoked))
        else:
            log.error("revocation file unusable, refusing every certificate: %s", error)

    @staticmethod
    def _stat_mtime(path: Path) -> float | None:
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    def _revocations(self) -> frozenset[str]:
        path = self._revocation_path
        if path is not None and self._stat_mtime(path) != self._revocation_mtime:
            self.reload_revocations()
        with self._lock:
            if self._revocation_error is not None:
                raise UnauthenticatedError(
                    f"node {self.config.name!r} cannot read its certificate revocation file, "
                    "so it refuses every certificate until its operator fixes the file"
                )
            return self._revoked

    def identify(self, context: grpc.ServicerContext) -> str:
        """Return the caller's consumer name.

        Raises:
            UnauthenticatedError: no verified certificate, a revoked one, an unusable
                revocation file, or (insecure mode) no consumer header.
        """
        if not self.use_tls:
            for key, value in context.invocation_metadata():
                if key == CONSUMER_HEADER and isinstance(value, str) and value:
                    return value
            raise UnauthenticatedError(
                f"insecure node: name yourself in the {CONSUMER_HEADER!r} metadata header "
                '(`consumer = "..."` under [coordinator] in federation.toml, or '
                "Coordinator.from_addresses(..., consumer=...))"
            )
        cert = pki.peer_certificate(context)
        name = pki.peer_common_name(context)
        if cert is None or not name:
            raise UnauthenticatedError("no verified client certificate on this connection")
        if pki.is_revoked(cert, self._revocations()):
            raise UnauthenticatedError(
                f"client certificate for {name!r} (serial {pki.serial_hex(cert)}) is revoked "
                f"on node {self.config.name!r}; ask its operator"
            )
        return name

    def _refuse_node_certificate(self, context: grpc.ServicerContext, name: str) -> None:
        """A certificate that may serve TLS (a node's, or one with no extended key usage,
        valid for any use) never acts as a consumer, even one of the same name: consumers
        hold their own, clientAuth only, and a node's key on another machine must not
        spend a consumer's budget. Health checks, which any federation certificate may
        make, do not come here.

        Raises:
            PolicyError: the caller's certificate may serve TLS (PERMISSION_DENIED).
        """
        if not self.use_tls:
            return
        cert = pki.peer_certificate(context)
        if cert is not None and pki.is_server_certificate(cert):
            raise PolicyError(
                f"the caller's certificate for {name!r} may serve TLS (a node's, or one "
                "without an extended key usage limiting it to clients); a consumer needs "
                f"its own (`federation certs issue --role consumer --name {name}`)"
            )

    def authorize(self, consumer: str, operation: str) -> ConsumerPolicy:
        """Return the consumer's policy if it allows ``operation``.

        Raises:
            PolicyError: unknown consumer (fail closed) or operation not allowed.
        """
        policy = self.config.consumers.get(consumer)
        if policy is None:
            raise PolicyError(
                f"consumer {consumer!r} is not in node {self.config.name!r}'s policy; "
                "ask the node operator to add it"
            )
        if operation not in policy.operations:
            allowed = ", ".join(sorted(policy.operations))
            raise PolicyError(
                f"consumer {consumer!r} may not {operation} on node {self.config.name!r}; "
                f"allowed: {allowed}"
            )
        return policy

    @contextmanager
    def admit(
        self, context: grpc.ServicerContext, operation: str, *, limit_s: float | None = None
    ) -> Iterator[Admission]:
        """Admit one request for the duration of the block.

        Identifies and authorizes the caller, takes one of its concurrency slots (never
        waiting) and cancels the call if it is still running after ``limit_s`` seconds
        (default: the node's ``max_request_s``; a streaming handler passes its own).

        Raises:
            UnauthenticatedError, PolicyError: as :meth:`identify` and :meth:`authorize`.
            NodeBusyError: the consumer already runs its ``max_concurrent_requests``
                (``RESOURCE_EXHAUSTED``; nothing charged).
        """
        consumer = self.identify(context)
        self._refuse_node_certificate(context, consumer)
        policy = self.authorize(consumer, operation)
        timeout_s = self.config.max_request_s if limit_s is None else limit_s
        with (
            self.limiter.slot(consumer, limit=policy.max_concurrent_requests),
            self._cancel_after(
                context,
                operation,
                consumer,
                timeout_s=timeout_s,
                reason=f"still running after {timeout_s:g}s (max_request_s)",
            ) as deadline,
        ):
            yield Admission(consumer=consumer, policy=policy, deadline=deadline)

    @contextmanager
    def admit_health(self, context: grpc.ServicerContext) -> Iterator[HealthAdmission]:
        """Admit one health call (Check, Watch) for the duration of the block.

        Any valid, non-revoked certificate of the federation may check health, with no
        policy entry, but only :data:`~nodes.limits.HEALTH_MAX_CONCURRENT` calls at once per
        certificate, :func:`~nodes.limits.health_total_limit` at once on the node (every
        caller together), and each for at most ``min(HEALTH_CALL_S, max_request_s)`` (a
        Watch stream then ends; clients re-watch). Without TLS (loopback only) a caller
        without the consumer header is anonymous.

        Raises:
            UnauthenticatedError: as :meth:`identify` (TLS only).
            NodeBusyError: the certificate already runs its health calls, or the node
                runs its node-wide limit of them (``RESOURCE_EXHAUSTED``).
        """
        try:
            name = self.identify(context)
        except UnauthenticatedError:
            if self.use_tls:
                raise
            name = ANONYMOUS  # a plaintext prober on loopback (LocalFederation's, say)
        timeout_s = min(HEALTH_CALL_S, self.config.max_request_s)
        with (
            self.health_limiter.slot(name, limit=HEALTH_MAX_CONCURRENT),
            self.health_limiter.node_slot(limit=self.health_total),
            self._cancel_after(
                context,
                "health",
                name,
                timeout_s=timeout_s,
                reason=f"still running after {timeout_s:g}s (health call limit)",
            ) as deadline,
        ):
            yield HealthAdmission(caller=name, deadline=deadline)

    def read_deadline(
        self, context: grpc.ServicerContext, operation: str, caller: str
    ) -> AbstractContextManager[Deadline]:
        """Cancel the call unless the block (reading its request) ends within the read limit.

        Use it inside an admission, around reading the request message: a caller that
        withholds or trickles its request loses the call (and its slot) after the node's
        ``max_request_read_s``, not ``max_request_s``. The deadline's ``fired`` says whether
        it cut the call off (then drop whatever the read returned).
        """
        timeout_s = self.config.max_request_read_s
        return self._cancel_after(
            context,
            operation,
            caller,
            timeout_s=timeout_s,
            reason=f"request not received within {timeout_s:g}s",
        )

    def _cancel_after(
        self,
        context: grpc.ServicerContext,
        operation: str,
        caller: str,
        *,
        timeout_s: float,
        reason: str,
    ) -> AbstractContextManager[Deadline]:
        """Cancel the call (logging why) if the block still runs after ``timeout_s`` seconds."""

        def expire() -> None:
            log.warning("cancelled %s by %r: %s", operation, caller, reason)
            context.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

        return self.watchdog.deadline(expire, timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the deadline watchdog (the node is shutting down)."""
        self.watchdog.close()
