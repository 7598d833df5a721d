"""Start a node: load config and data once, open the ledger, serve gRPC until told to stop.

On start the node prints one JSON line to stdout, ``{"event": "serving", "node": ...,
"address": "host:port"}``, so that a launcher (``LocalFederation``, tests) learns the port it
bound when the config says port 0; it then waits on the standard health RPC.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2

from federation import pki, privacy
from federation.architectures import load_builder, registry_with
from federation.errors import ConfigError, InvalidRequestError
from federation.models import ModelBuilder
from nodes.analytics import DatasetEngine
from nodes.audit import LEDGER_FILE
from nodes.audit_verify import open_ledger
from nodes.config import NodeConfig, load_config
from nodes.data import load_table
from nodes.guard import Guard
from nodes.health import add_health_service
from nodes.ledger import Ledger
from nodes.limits import health_total_limit, server_options
from nodes.service import NodeService, add_node_service
from nodes.training import TrainingEngine

__all__ = ["RunningNode", "serve", "start_node"]

log = logging.getLogger(__name__)

SERVICE_NAME = "federation.v1.Node"


@dataclass
class RunningNode:
    """A started node: its gRPC server, bound address and parts."""

    server: grpc.Server
    address: str
    health: health.HealthServicer
    guard: Guard
    ledger: Ledger
    service: NodeService

    def stop(self, grace_s: float = 2.0) -> None:
        """Mark the node not serving and stop the server, letting calls finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.service.close()
        self.guard.close()
        self.ledger.close()


def _registry(config: NodeConfig) -> Mapping[str, ModelBuilder]:
    """The architectures this node builds: the built-ins and its operator's own."""
    builders: dict[str, ModelBuilder] = {}
    for name, target in config.architectures.items():
        try:
            builders[name] = load_builder(target)
        except ConfigError as err:
            raise ConfigError(f"architectures.{name}: {err}") from err
    try:
        registry = registry_with(builders)
    except InvalidRequestError as err:
        raise ConfigError(f"architectures: {err}") from err
    # Refuse an allowed_models entry this node cannot build (a typo would otherwise only
    # show as every training request for it being refused).
    for consumer, policy in config.consumers.items():
        for model in policy.allowed_models:
            if model not in registry:
                close = difflib.get_close_matches(model, list(registry), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"consumers.{consumer}.allowed_models: {model!r} is not an architecture "
                    f"this node builds{hint}; it builds: {', '.join(registry)}"
                )
    return registry


def start_node(
    config: NodeConfig, *, insecure: bool = False, allow_broken_audit: bool = False
) -> RunningNode:
    """Open the ledger (verifying its audit chain), load data and start serving ``config``.

    Raises:
        ConfigError: plaintext requested off loopback, TLS files unusable, data unreadable,
            the address cannot be bound, or the audit chain is broken (unless
            ``allow_broken_audit``, which serves anyway and records the override).
    """
    registry = _registry(config)
    use_tls = config.tls is not None
    if not use_tls and not (insecure and config.is_loopback):
        raise ConfigError(
            f"node {config.name!r} has no [tls] section: plaintext is only allowed on a "
            "loopback address with --insecure; add [tls] (see `federation certs`) to listen "
            f"on {config.listen}"
        )
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_ledger(config.state_dir / LEDGER_FILE)
    except OSError as err:  # a file in the way, no permission
        raise ConfigError(
            f"node.state_dir: cannot use {config.state_dir} as a directory: {err.strerror or err}"
        ) from err
    if config.state_dir.stat().st_mode & 0o077:
        # mkdir's mode applies only to a directory it creates (review: an existing 0755
        # state dir held a world-readable ledger). The files are 0600 regardless.
        log.warning(
            "node.state_dir %s can be read by group or others (mode %o); the ledger inside "
            "is 0600, but consider chmod 700",
            config.state_dir,
            config.state_dir.stat().st_mode & 0o777,
        )
    # Load the accountant while data loads, not inside the first charge's write lock.
    threading.Thread(target=privacy.preload, name="preload-accountant", daemon=True).start()
    ledger = open_ledger(config, allow_broken_audit=allow_broken_audit)
    engines = {
        ds.name: DatasetEngine(load_table(ds.source, schema=ds.schema, file_format=ds.format))
        for ds in config.datasets
    }
    # Training shares each dataset's in-memory columns; the engine builds features lazily.
    try:
        trainers = {
            name: TrainingEngine(engine.table, device=config.device, registry=registry)
            for name, engine in engines.items()
        }
    except ConfigError as err:
        raise ConfigError(f"node.device: {err}") from err
    if config.tls is not None and config.tls.revocation is not None:
        try:  # at start, a config error like any other (while serving, it fails closed)
            pki.read_revocation_file(config.tls.revocation)
        except ConfigError as err:
            raise ConfigError(f"tls.revocation: {err}") from err
    guard = Guard(config, use_tls=use_tls)
    service = NodeService(
        config,
        engines=engines,
        ledger=ledger,
        guard=guard,
        trainers=trainers,
        registry=registry,
    )
    # Message size, keepalive, idle and connection-age limits: see nodes.limits.
    options = server_options(
        max_message_bytes=config.max_message_bytes, max_request_s=config.max_request_s
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers), options=options
    )
    add_node_service(service, server)
    health_servicer = health.HealthServicer()
    add_health_service(health_servicer, server, guard=guard)
    _warn_if_one_consumer_can_fill_the_pool(config)
    port = _bind(server, config)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{config.listen_host}:{port}"
    log.info(
        "node %r serving on %s (%s); DP-SGD on device %s",
        config.name,
        address,
        "TLS" if use_tls else "plain",
        config.device,
    )
    return RunningNode(server, address, health_servicer, guard, ledger, service)


def _warn_if_one_consumer_can_fill_the_pool(config: NodeConfig) -> None:
    """Warn when one consumer, with every health call, may hold every worker thread.

    A hint, not a config error: see the guarantee in ``nodes.limits``.
    """
    if not config.consumers:
        return
    greediest = max(config.consumers.values(), key=lambda p: p.max_concurrent_requests)
    requests = greediest.max_concurrent_requests
    health_calls = health_total_limit(config.max_workers)
    if config.max_workers <= requests + health_calls:
        # The health limit grows with the pool: find the smallest pool that leaves a thread.
        needed = next(w for w in itertools.count(1) if w > requests + health_total_limit(w))
        log.warning(
            "node.max_workers = %d: consumer %r may hold %d worker threads at once "
            "(max_concurrent_requests) and health calls %d more (the node-wide health "
            "limit), leaving no thread for other consumers; set node.max_workers to at "
            "least %d",
            config.max_workers,
            greediest.name,
            requests,
            health_calls,
            needed,
        )


def _bind(server: grpc.Server, config: NodeConfig) -> int:
    try:
        if config.tls is not None:
            identity = pki.Identity.load(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
            pki.check_node_certificate(identity.cert_pem, config.name)
            pki.check_trust_anchor(identity)
            port = server.add_secure_port(config.listen, pki.server_credentials(identity))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as err:
        raise ConfigError(f"node.listen: cannot bind {config.listen}: {err}") from err
    if port == 0:
        raise ConfigError(f"node.listen: cannot bind {config.listen} (address in use?)")
    return port


def _private_ledger(path: Path) -> None:
    """Make the ledger database, and the WAL files SQLite gives its mode, 0600 (owner
    only): create it so if new (whatever the umask), tighten it if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            existing = path.with_name(name)
            if existing.exists() and existing.stat().st_mode & 0o077:
                existing.chmod(0o600)
    else:
        os.close(fd)


def serve(config_path: Path, *, insecure: bool = False, allow_broken_audit: bool = False) -> int:
    """Run a node until SIGTERM or SIGINT; SIGHUP re-reads the revocation file."""
    config = load_config(config_path)
    node = start_node(config, insecure=insecure, allow_broken_audit=allow_broken_audit)
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    def reload(signum: int, frame: FrameType | None) -> None:
        node.guard.reload_revocations()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)
    _watch_parent(done)
    event = {"event": "serving", "node": config.name, "address": node.address}
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()
    done.wait()
    node.stop()
    return 0


PARENT_PID_ENV = "FEDERATION_PARENT_PID"
_PARENT_POLL_S = 0.5


def _watch_parent(done: threading.Event) -> None:
    """Stop when the launcher named in ``FEDERATION_PARENT_PID`` is gone.

    ``LocalFederation`` sets it, so a notebook kernel that dies (even by SIGKILL) leaves no
    node running. Polling the parent pid works whichever thread started the node, unlike
    ``PR_SET_PDEATHSIG``, which fires when the *thread* that forked exits.
    """
    raw = os.environ.get(PARENT_PID_ENV)
    if not raw or not raw.isdigit():
        return
    parent = int(raw)

    def watch() -> None:
        while not done.wait(_PARENT_POLL_S):
            if os.getppid() != parent:
                log.warning("launcher process %d is gone: shutting down", parent)
                done.set()

    if os.getppid() != parent:
        done.set()
        return
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
