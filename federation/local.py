"""Start real node processes on loopback: the production code path in one line.

``LocalFederation`` writes node configs, generates throwaway certificates (a CA, one
certificate per node, one for the consumer), starts each node as a separate process with
``python -m nodes serve``, waits on the standard health RPC, and yields a connected
``Coordinator``. On exit it stops the processes and deletes what it created. Node processes
also die with their parent (Linux ``PR_SET_PDEATHSIG``), so a killed kernel leaves no orphans.

This is the one module of ``federation`` that knows nodes exist; it only launches them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation import pki
from federation.coordinator import Coordinator
from federation.datasets import CREDIT_SCHEMA, synthetic_credit, write_dataset
from federation.errors import NodeUnavailableError
from federation.schema import ColumnType, DatasetSchema

__all__ = ["LocalFederation", "NodeProcess", "node_config_toml"]

log = logging.getLogger(__name__)

CONSUMER = "local-researcher"
START_TIMEOUT_S = 60.0


@dataclass
class NodeProcess:
    """A node running in a child process."""

    name: str
    config_path: Path
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the node to stop (SIGTERM), then kill it if it does not."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def kill(self) -> None:
        """Kill the node abruptly (SIGKILL), as a crash would."""
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _toml(value: object) -> str:
    """Render a scalar or list as TOML (strings via JSON escaping, which TOML accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def node_config_toml(
    *,
    name: str,
    jurisdiction: str,
    data_path: Path,
    schema: DatasetSchema,
    state_dir: Path,
    consumers: Mapping[str, Mapping[str, object]],
    tls: Mapping[str, Path] | None,
    listen: str = "127.0.0.1:0",
) -> str:
    """Render a node config (the same format an operator writes by hand)."""
    lines = [
        "[node]",
        f"name = {_toml(name)}",
        f"jurisdiction = {_toml(jurisdiction)}",
        f"listen = {_toml(listen)}",
        f"state_dir = {_toml(state_dir)}",
        "",
        "[[datasets]]",
        f"name = {_toml(schema.name)}",
        f"source = {_toml(data_path)}",
        f"description = {_toml(schema.description)}",
    ]
    for col in schema.columns:
        lines += ["", "  [[datasets.columns]]", f"  name = {_toml(col.name)}"]
        lines.append(f"  type = {_toml(col.type.value)}")
        if col.description:
            lines.append(f"  description = {_toml(col.description)}")
        if col.has_bounds:
            lines += [f"  lower = {_toml(col.lower)}", f"  upper = {_toml(col.upper)}"]
        if col.type is ColumnType.CATEGORY:
            lines.append(f"  domain = {_toml(list(col.domain))}")
    for consumer, policy in consumers.items():
        lines += ["", f"[consumers.{_toml(consumer)}]"]
        lines += [f"{key} = {_toml(value)}" for key, value in policy.items()]
    if tls is not None:
        lines += ["", "[tls]"] + [f"{key} = {_toml(path)}" for key, path in tls.items()]
    return "\n".join(lines) + "\n"


class LocalFederation:
    """Nodes in real processes on 127.0.0.1, with a connected coordinator.

    Example::

        with LocalFederation.synthetic(nodes=["hong-kong", "shenzhen"], rows=50_000) as fed:
            print(fed.analyze(Mean("credit", "income"), epsilon=0.5).value)
    """

    def __init__(
        self,
        workdir: Path,
        node_configs: Mapping[str, Path],
        *,
        identity: pki.Identity | None,
        consumer: str = CONSUMER,
        owns_workdir: bool = True,
    ) -> None:
        """Prepare to run nodes from existing configs (``synthetic`` builds them for you)."""
        self.workdir = workdir
        self.node_configs = dict(node_configs)
        self.identity = identity
        self.consumer = consumer
        self.owns_workdir = owns_workdir
        self.processes: dict[str, NodeProcess] = {}
        self.coordinator: Coordinator | None = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def synthetic(
        cls,
        nodes: Sequence[str] = ("hong-kong", "shenzhen"),
        *,
        rows: int = 50_000,
        epsilon: float = 10.0,
        delta: float = 1e-6,
        max_epsilon_per_release: float | None = None,
        seed: int = 0,
        tls: bool = True,
        workdir: Path | None = None,
    ) -> LocalFederation:
        """Synthetic cross-border credit data for each node, ``rows`` rows each.

        Args:
            nodes: node names; "hong-kong" and "shenzhen" get their distinct (non-IID) data.
            rows: rows per node.
            epsilon: the consumer's total budget at each node.
            delta: the consumer's total delta at each node.
            max_epsilon_per_release: per-release cap (default: min(epsilon, 2.0)).
            seed: data seed.
            tls: mutual TLS with throwaway certificates (plaintext loopback if False).
            workdir: where to put data, state and certificates (default: a temp dir).
        """
        frames = {
            name: synthetic_credit(jurisdiction=name, rows=rows, seed=seed + i)
            for i, name in enumerate(nodes)
        }
        return cls.from_arrays(
            frames,
            schema=CREDIT_SCHEMA,
            epsilon=epsilon,
            delta=delta,
            max_epsilon_per_release=max_epsilon_per_release,
            tls=tls,
            workdir=workdir,
        )

    @classmethod
    def from_arrays(
        cls,
        data: Mapping[str, Mapping[str, npt.NDArray[np.generic]]],
        *,
        schema: DatasetSchema,
        epsilon: float = 10.0,
        delta: float = 1e-6,
        max_epsilon_per_release: float | None = None,
        tls: bool = True,
        workdir: Path | None = None,
    ) -> LocalFederation:
        """Write each node's columns to Parquet and build node configs for them."""
        owns = workdir is None
        root = Path(tempfile.mkdtemp(prefix="federation-")) if workdir is None else workdir
        root.mkdir(parents=True, exist_ok=True)
        identity, tls_files = _make_pki(root, list(data)) if tls else (None, {})
        policy: dict[str, object] = {
            "epsilon": epsilon,
            "delta": delta,
            "max_epsilon_per_release": max_epsilon_per_release or min(epsilon, 2.0),
            "operations": ["describe", "analyze", "train"],
        }
        configs = {}
        for name, columns in data.items():
            node_dir = root / name
            node_dir.mkdir(exist_ok=True)
            data_path = write_dataset(columns, node_dir / f"{schema.name}.parquet", schema=schema)
            text = node_config_toml(
                name=name,
                jurisdiction=name.upper()[:2],
                data_path=data_path,
                schema=schema,
                state_dir=node_dir / "state",
                consumers={CONSUMER: policy},
                tls=tls_files.get(name),
            )
            configs[name] = node_dir / "node.toml"
            configs[name].write_text(text)
        return cls(root, configs, identity=identity, owns_workdir=owns)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Coordinator:
        """Start every node, wait until each is healthy, and connect a coordinator."""
        try:
            for name, path in self.node_configs.items():
                self.processes[name] = self._spawn(name, path)
            for proc in self.processes.values():
                self._wait_healthy(proc)
        except BaseException:
            self.stop()
            raise
        self.coordinator = Coordinator.from_addresses(
            {n: p.address for n, p in self.processes.items()},
            identity=self.identity,
            consumer=None if self.identity else self.consumer,
        )
        return self.coordinator

    def restart(self, name: str) -> None:
        """Stop node ``name`` and start it again from the same config and state."""
        self.processes[name].stop()
        proc = self._spawn(name, self.node_configs[name])
        self._wait_healthy(proc)
        self.processes[name] = proc
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = Coordinator.from_addresses(
                {n: p.address for n, p in self.processes.items()},
                identity=self.identity,
                consumer=None if self.identity else self.consumer,
            )

    def stop(self) -> None:
        """Stop nodes, close the coordinator and remove the work dir if we made it."""
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None
        for proc in self.processes.values():
            proc.stop()
        self.processes.clear()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Coordinator:
        """Start and return the coordinator."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop everything."""
        self.stop()

    def _spawn(self, name: str, config_path: Path) -> NodeProcess:
        log_path = config_path.parent / "node.log"
        args = [sys.executable, "-m", "nodes", "serve", "--config", str(config_path)]
        if self.identity is None:
            args.append("--insecure")
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=log_file,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        address = _read_address(process, name, log_path)
        return NodeProcess(name, config_path, process, address, log_path)

    def _wait_healthy(self, proc: NodeProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        if self.identity is not None:
            channel = grpc.secure_channel(
                proc.address,
                pki.channel_credentials(self.identity),
                options=[("grpc.ssl_target_name_override", proc.name)],
            )
        else:
            channel = grpc.insecure_channel(proc.address)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.process.poll() is not None:
                    raise NodeUnavailableError(
                        f"node {proc.name!r} did not become healthy; see {proc.log_path}"
                    )
                time.sleep(0.05)


def _read_address(process: subprocess.Popen[bytes], name: str, log_path: Path) -> str:
    """Read the node's ``{"event": "serving", ...}`` line (it binds port 0)."""
    assert process.stdout is not None
    result: dict[str, str] = {}

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "serving":
                result["address"] = str(event["address"])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if "address" not in result:
        process.kill()
        process.wait()
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise NodeUnavailableError(f"node {name!r} failed to start; its log ends:\n{tail}")
    return result["address"]


def _make_pki(root: Path, nodes: Sequence[str]) -> tuple[pki.Identity, dict[str, dict[str, Path]]]:
    """A throwaway CA, a certificate per node and one for the consumer."""
    pki_dir = root / "pki"
    pki_dir.mkdir(exist_ok=True)
    ca = pki.init_ca(pki_dir, name="local-federation-ca")
    files = {}
    for name in nodes:
        cert, key = pki.issue(pki_dir, name=name, role="node", hosts=["127.0.0.1", "localhost"])
        files[name] = {"ca": ca, "cert": cert, "key": key}
    cert, key = pki.issue(pki_dir, name=CONSUMER, role="consumer")
    return pki.Identity.load(ca=ca, cert=cert, key=key), files
