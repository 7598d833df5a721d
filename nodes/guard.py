"""Who is calling, and may they do this? The one place a consumer identity comes from.

With TLS (production), the identity is the common name of the client certificate that the
TLS handshake verified against the federation CA; certificates listed in the operator's
revocation file are refused. Without TLS (allowed only on loopback with ``--insecure``, for
development), the caller names itself in the ``x-federation-consumer`` metadata header.
Every refusal is logged with the reason; nothing is charged for a refused request.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from federation import pki
from federation.errors import PolicyError, UnauthenticatedError
from nodes.config import ConsumerPolicy, NodeConfig

__all__ = ["CONSUMER_HEADER", "Guard"]

log = logging.getLogger(__name__)

CONSUMER_HEADER = "x-federation-consumer"


class Guard:
    """Identify callers and check them against the node's per-consumer policy."""

    def __init__(self, config: NodeConfig, *, use_tls: bool) -> None:
        """Build the guard; loads the revocation file if the config names one."""
        self.config = config
        self.use_tls = use_tls
        self._lock = threading.Lock()
        self._revoked: frozenset[str] = frozenset()
        self._revocation_mtime: float | None = None
        self.reload_revocations()

    @property
    def _revocation_path(self) -> Path | None:
        return self.config.tls.revocation if self.config.tls else None

    def reload_revocations(self) -> None:
        """Re-read the revocation file (on SIGHUP, or when its modification time changes)."""
        path = self._revocation_path
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        revoked = pki.read_revocation_file(path) if mtime is not None else frozenset()
        with self._lock:
            self._revoked, self._revocation_mtime = revoked, mtime
        log.info("revocation list loaded: %d entries", len(revoked))

    def _revocations(self) -> frozenset[str]:
        path = self._revocation_path
        if path is not None:
            try:
                mtime: float | None = path.stat().st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime != self._revocation_mtime:
                self.reload_revocations()
        with self._lock:
            return self._revoked

    def identify(self, context: grpc.ServicerContext) -> str:
        """Return the caller's consumer name.

        Raises:
            UnauthenticatedError: no verified certificate, a revoked one, or (insecure
                mode) no consumer header.
        """
        if not self.use_tls:
            for key, value in context.invocation_metadata():
                if key == CONSUMER_HEADER and isinstance(value, str) and value:
                    return value
            raise UnauthenticatedError(
                f"insecure node: name yourself in the {CONSUMER_HEADER!r} metadata header"
            )
        cert = pki.peer_certificate(context)
        name = pki.peer_common_name(context)
        if cert is None or not name:
            raise UnauthenticatedError("no verified client certificate on this connection")
        if pki.is_revoked(cert, self._revocations()):
            raise UnauthenticatedError(
                f"client certificate for {name!r} (serial {pki.serial_hex(cert)}) is revoked"
            )
        return name

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
