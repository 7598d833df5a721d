"""Start real node processes on loopback: the production code path in one line.

``LocalFederation`` writes node configs, generates throwaway certificates (a CA, one
certificate per node, one for the consumer), starts each node as a separate process with
``python -m nodes serve``, waits on the standard health RPC, and yields a connected
``Coordinator``. On exit it stops the processes and deletes what it created, also when the
with-block is interrupted (``KeyboardInterrupt``), when the object is garbage collected and
at interpreter exit. Each node watches its launcher's pid and stops when the launcher is
gone, so a killed kernel leaves no orphans; its temp dir, which a ``SIGKILL`` leaves behind, is
removed by the next ``LocalFederation`` (see ``federation._workdir``).

This is the one module of ``federation`` that knows nodes exist; it only launches them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation import pki
from federation._frames import frame_to_columns
from federation._workdir import make_workdir
from federation.architectures import WIDE_MLP, WIDE_MLP_MAX_PARAMETERS
from federation.coordinator import Coordinator, NodeClient
from federation.datasets import CREDIT_SCHEMA, synthetic_credit, write_dataset
from federation.errors import InvalidRequestError, NodeUnavailableError
from federation.schema import ColumnType, DatasetSchema

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LocalFederation", "NodeProcess", "node_config_toml"]

log = logging.getLogger(__name__)

CONSUMER = "local-researcher"
PARENT_PID_ENV = "FEDERATION_PARENT_PID"  # read by nodes/server.py
START_TIMEOUT_S = 60.0


@dataclass
class NodeProcess:
    """A node running in a child process."""

    name: str
    config_path: Path
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def terminate(self) -> None:
        """Ask the node to stop (SIGTERM) without waiting."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

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


# ISO 3166 codes for the built-in synthetic nodes; other names get their first letters.
_KNOWN_JURISDICTIONS = {"hong-kong": "HK", "shenzhen": "CN"}


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
    device: str = "cpu",
    architectures: Mapping[str, str] | None = None,
) -> str:
    """Render a node config (the same format an operator writes by hand)."""
    lines = [
        "[node]",
        f"name = {_toml(name)}",
        f"jurisdiction = {_toml(jurisdiction)}",
        f"listen = {_toml(listen)}",
        f"state_dir = {_toml(state_dir)}",
        f"device = {_toml(device)}",
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
    if architectures:
        lines += ["", "[architectures]"]
        lines += [f"{_toml(name)} = {_toml(target)}" for name, target in architectures.items()]
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
        # Stops the nodes and removes an owned workdir when this object is garbage collected
        # or the interpreter exits without stop() (a notebook never closing its federation).
        # It holds the process dict, never self, so it does not keep self alive.
        self._owned_dir = workdir if owns_workdir else None
        self._finalizer = weakref.finalize(
            self, _release, self.processes, self._owned_dir, os.getpid()
        )

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
        allowed_models: Sequence[str] | None = None,
        device: str = "cpu",
        architectures: Mapping[str, str] | None = None,
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
            allowed_models: architectures the consumer may train (default: the node's,
                ``logistic`` and ``mlp``); ``"wide-mlp"`` allows layers past 4096 units,
                i.e. models of hundreds of millions of parameters (gigabytes per node),
                and lifts the nodes' ``max_model_parameters`` to ``wide-mlp``'s own cap.
            device: where the nodes run DP-SGD ("cpu", "cuda", "cuda:N"; the node config's
                ``device``); a node refuses to start if it is not available.
            architectures: operator-registered architectures every node builds (its
                config's ``[architectures]``): name -> ``"package.module:function"`` or
                ``"/path/file.py:function"``; list their names in ``allowed_models`` too,
                and pass the same builders to ``train(architectures=...)``.
        """
        if isinstance(nodes, str) or len(set(nodes)) != len(nodes) or not nodes:
            # A string is a sequence of one-letter names ("hong-kong": 9 nodes).
            raise InvalidRequestError(f"nodes must be a list of distinct node names; got {nodes!r}")
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
            allowed_models=allowed_models,
            device=device,
            architectures=architectures,
        )

    @classmethod
    def from_frames(
        cls,
        frames: Mapping[str, pd.DataFrame],
        *,
        schema: DatasetSchema,
        epsilon: float = 10.0,
        delta: float = 1e-6,
        max_epsilon_per_release: float | None = None,
        tls: bool = True,
        workdir: Path | None = None,
    ) -> LocalFederation:
        """One node per pandas DataFrame, serving the columns ``schema`` declares.

        Example::

            schema = DatasetSchema("loans", columns=(Column("age", ColumnType.INT, 18, 90),))
            with LocalFederation.from_frames({"hong-kong": df_hk, "shenzhen": df_sz},
                                             schema=schema) as fed:
                fed.analyze(Mean("loans", "age"), epsilon=0.5)

        Args:
            frames: node name -> that node's records. Frame columns the schema does not
                declare are not served; the index is ignored.
            schema: the public schema every node declares (bounds and domains are public:
                choose them from domain knowledge, not from the data).
            epsilon: the consumer's total budget at each node.
            delta: the consumer's total delta at each node.
            max_epsilon_per_release: per-release cap (default: min(epsilon, 2.0)).
            tls: mutual TLS with throwaway certificates (plaintext loopback if False).
            workdir: where to put data, state and certificates (default: a temp dir).

        Raises:
            InvalidRequestError: a frame lacks a schema column, holds missing values, has a
                dtype that does not fit its column, or a value outside its public bounds.
        """
        data = {
            name: frame_to_columns(frame, schema=schema, node=name)
            for name, frame in frames.items()
        }
        return cls.from_arrays(
            data,
            schema=schema,
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
        allowed_models: Sequence[str] | None = None,
        device: str = "cpu",
        architectures: Mapping[str, str] | None = None,
    ) -> LocalFederation:
        """Write each node's columns to Parquet and build node configs for them.

        ``allowed_models``, ``device``, ``architectures``: see ``synthetic``.
        """
        owns = workdir is None
        root = make_workdir() if workdir is None else workdir
        root.mkdir(parents=True, exist_ok=True)
        try:
            return cls._build(
                root,
                data,
                schema=schema,
                epsilon=epsilon,
                delta=delta,
                max_epsilon_per_release=max_epsilon_per_release,
                tls=tls,
                owns=owns,
                allowed_models=allowed_models,
                device=device,
                architectures=architectures,
            )
        except BaseException:
            if owns:
                shutil.rmtree(root, ignore_errors=True)
            raise

    @classmethod
    def _build(
        cls,
        root: Path,
        data: Mapping[str, Mapping[str, npt.NDArray[np.generic]]],
        *,
        schema: DatasetSchema,
        epsilon: float,
        delta: float,
        max_epsilon_per_release: float | None,
        tls: bool,
        owns: bool,
        allowed_models: Sequence[str] | None = None,
        device: str = "cpu",
        architectures: Mapping[str, str] | None = None,
    ) -> LocalFederation:
        identity, tls_files = _make_pki(root, list(data)) if tls else (None, {})
        policy: dict[str, object] = {
            "epsilon": epsilon,
            "delta": delta,
            "max_epsilon_per_release": max_epsilon_per_release or min(epsilon, 2.0),
            "operations": ["describe", "analyze", "train"],
        }
        if allowed_models is not None:
            policy["allowed_models"] = list(allowed_models)
            if WIDE_MLP in allowed_models:  # what it is for: models past the default cap
                policy["max_model_parameters"] = WIDE_MLP_MAX_PARAMETERS
        configs = {}
        for name, columns in data.items():
            node_dir = root / name
            node_dir.mkdir(exist_ok=True)
            data_path = write_dataset(columns, node_dir / f"{schema.name}.parquet", schema=schema)
            text = node_config_toml(
                name=name,
                jurisdiction=_KNOWN_JURISDICTIONS.get(name, name.upper()[:2]),
                data_path=data_path,
                schema=schema,
                state_dir=node_dir / "state",
                consumers={CONSUMER: policy},
                tls=tls_files.get(name),
                device=device,
                architectures=architectures,
            )
            configs[name] = node_dir / "node.toml"
            configs[name].write_text(text)
        return cls(root, configs, identity=identity, owns_workdir=owns)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Coordinator:
        """Start every node, wait until each is healthy, and connect a coordinator.

        Started already: the same coordinator (a notebook cell run twice starts nothing).

        Raises:
            InvalidRequestError: stopped, and its work dir (configs, data) removed.
            NodeUnavailableError: a node did not become healthy (every node is stopped).
        """
        if self.coordinator is not None:
            return self.coordinator
        if not all(path.exists() for path in self.node_configs.values()):
            raise InvalidRequestError(
                "this LocalFederation was stopped and its work dir removed; make a new one "
                "(LocalFederation.synthetic(...), from_arrays(...) or from_frames(...))"
            )
        try:
            self._spawn_all()
            for proc in self.processes.values():
                self._wait_healthy(proc)
        except BaseException:
            self.stop()
            raise
        self.coordinator = self._connect()
        return self.coordinator

    def state_dir(self, name: str) -> Path:
        """Node ``name``'s state dir (ledger, audit log), e.g. for ``federation audit report``.

        As written by ``synthetic``, ``from_arrays`` and ``from_frames``: ``<node dir>/state``.
        """
        return self.node_configs[name].parent / "state"

    def restart(self, name: str) -> None:
        """Stop node ``name`` and start it again from the same config and state.

        The coordinator ``start`` returned stays the one to use: its client for ``name``
        is reconnected to the node's new address, and the node described again on its
        next request (its config, say its schema, may have changed).
        """
        self.processes[name].stop()
        proc = self._spawn(name, self.node_configs[name])
        self.processes[name] = proc  # recorded first: stopped with the rest if it fails
        self._wait_healthy(proc)
        if self.coordinator is not None and not self.coordinator._closed:
            self.coordinator._replace_client(
                NodeClient(
                    name,
                    proc.address,
                    identity=self.identity,
                    consumer=None if self.identity else self.consumer,
                )
            )

    def stop(self) -> None:
        """Stop nodes, close the coordinator and remove the work dir if we made it.

        Safe to call twice. If it is itself interrupted, whatever is left is released when
        this object is garbage collected or at interpreter exit.
        """
        try:
            if self.coordinator is not None:
                coordinator, self.coordinator = self.coordinator, None
                coordinator.close()
        finally:
            _release(self.processes, self._owned_dir, os.getpid())

    def _connect(self) -> Coordinator:
        coordinator = Coordinator.from_addresses(
            {n: p.address for n, p in self.processes.items()},
            identity=self.identity,
            consumer=None if self.identity else self.consumer,
        )
        # The coordinator keeps us (and so the nodes) alive: `fed = local.start()` may drop
        # `local`, and the finalizer must not stop nodes a live coordinator still uses.
        coordinator._keep_alive.append(self)
        return coordinator

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
        process, log_path = self._launch(config_path)
        address = _read_address(process, name, log_path)
        return NodeProcess(name, config_path, process, address, log_path)

    def _spawn_all(self) -> None:
        """Launch every node at once (each takes seconds to import), then read addresses."""
        launched: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        try:
            for name, path in self.node_configs.items():
                launched[name] = self._launch(path)
            for name, (process, log_path) in launched.items():
                address = _read_address(process, name, log_path)
                path = self.node_configs[name]
                self.processes[name] = NodeProcess(name, path, process, address, log_path)
        except BaseException:
            for name, (process, _) in launched.items():
                if name not in self.processes:
                    process.kill()
                    process.wait()
                    if process.stdout is not None:
                        process.stdout.close()
            raise

    def _launch(self, config_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = config_path.parent / "node.log"
        args = [sys.executable, "-m", "nodes", "serve", "--config", str(config_path)]
        if self.identity is None:
            args.append("--insecure")
        # The node watches this pid and stops when it is gone (a killed kernel leaves no
        # orphans). No preexec_fn: running Python in a fork of a process with live gRPC
        # threads can abort the child; without it, Python spawns with posix_spawn.
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        with log_path.open("ab") as log_file:
            # A process group of its own: Jupyter's "interrupt kernel" and a terminal's
            # Ctrl-C signal the whole group, and a node stops on SIGINT (found by review:
            # an interrupted cell killed every node). The user's code gets the
            # KeyboardInterrupt; the nodes keep serving until stop() or the parent is gone.
            # Not a session of its own: Linux schedules each session as one group
            # (autogroup), which cost a 100M round about 7% (benchmarks/training.py).
            process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                process_group=0,
            )
        return process, log_path

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
                    # The tail goes in the message: stopping removes a temp workdir, log too.
                    tail = _log_tail(proc.log_path)
                    raise NodeUnavailableError(
                        f"node {proc.name!r} did not become healthy; its log ends:\n{tail}"
                    )
                time.sleep(0.05)


def _release(processes: dict[str, NodeProcess], workdir: Path | None, owner_pid: int) -> None:
    """Stop every node (all asked at once, then awaited) and remove ``workdir`` if given.

    Idempotent: ``stop()`` calls it, and so does the finalizer at garbage collection or exit.
    """
    if os.getpid() != owner_pid:
        return  # a forked child (multiprocessing) must not stop its parent's nodes
    for proc in processes.values():
        proc.terminate()
    for name in list(processes):
        processes[name].stop()
        del processes[name]
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


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
        process.stdout.close()
        tail = _log_tail(log_path)
        raise NodeUnavailableError(f"node {name!r} failed to start; its log ends:\n{tail}")
    return result["address"]


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""


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
