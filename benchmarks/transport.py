"""Measure what moving bytes over mutual TLS costs: gRPC Python against a raw ``ssl`` socket.

The training benchmark shows a 100M-parameter round is CPU-bound. This asks whether a
transport other than gRPC would change that: it sends the same payload (400 MB by default)
from one process to another on 127.0.0.1 over mutual TLS 1.3, both ways,

- **grpc**: a client-streaming gRPC call of 2 MiB ``bytes`` messages (no protobuf, as the
  Train stream's chunks are sent), the server reading each message;
- **ssl**: Python's ``ssl`` socket, ``sendall`` from the array and ``recv_into`` a
  preallocated array (no copy in Python at all),

and prints the CPU seconds (user + system) each side used per GB, median of ``--repeats``.

Usage::

    .venv/bin/python benchmarks/transport.py                 # 400 MB, 3 repeats
    .venv/bin/python benchmarks/transport.py --mb 100 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation import pki  # noqa: E402 - after the path is set

CHUNK = 2 << 20
METHOD = "/bench.Sink/Take"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _identities(directory: Path) -> tuple[pki.Identity, pki.Identity]:
    pki.init_ca(directory / "ca")
    pki.issue(directory / "ca", name="node", role="node", hosts=["127.0.0.1"], out_dir=directory)
    pki.issue(directory / "ca", name="coordinator", role="consumer", out_dir=directory)
    ca = directory / "ca" / "ca.pem"
    node = pki.Identity.load(ca=ca, cert=directory / "node.pem", key=directory / "node.key")
    client = pki.Identity.load(
        ca=ca, cert=directory / "coordinator.pem", key=directory / "coordinator.key"
    )
    return node, client


def _report(pipe_w: int, value: float) -> None:
    os.write(pipe_w, f"{value}\n".encode())
    os.close(pipe_w)


def grpc_round(directory: Path, payload: np.ndarray) -> tuple[float, float]:
    """Send ``payload`` once over a gRPC stream; return (sender, receiver) CPU seconds."""
    node, client = _identities(directory)
    read_fd, write_fd = os.pipe()
    port_r, port_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # receiver
        os.close(read_fd)
        os.close(port_r)
        done = futures.Future[float]()

        def take(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            started = _cpu_s()
            total = 0
            for message in requests:
                total += len(message)
            if total > len(b"warm"):  # the warm-up call only opens the connection
                done.set_result(_cpu_s() - started)
            return b""

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            options=[("grpc.max_receive_message_length", 2 * CHUNK)],
        )
        handler = grpc.stream_unary_rpc_method_handler(take)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Sink", {"Take": handler}),)
        )
        port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(node))
        server.start()
        os.write(port_w, f"{port}\n".encode())
        _report(write_fd, done.result())
        server.stop(0)
        os._exit(0)
    os.close(write_fd)
    os.close(port_w)
    port = int(os.read(port_r, 64))
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        pki.channel_credentials(client),
        options=[("grpc.ssl_target_name_override", "node")],
    )
    call = channel.stream_unary(METHOD)
    raw = payload.view(np.uint8)

    def frames() -> Iterator[bytes]:
        for start in range(0, raw.size, CHUNK):
            yield raw[start : start + CHUNK].tobytes()

    call(iter([b"warm"]))  # handshake outside the measurement
    started = _cpu_s()
    call(frames())
    sender = _cpu_s() - started
    channel.close()
    receiver = float(os.read(read_fd, 64))
    os.waitpid(pid, 0)
    return sender, receiver


def ssl_round(directory: Path, payload: np.ndarray) -> tuple[float, float]:
    """Send ``payload`` once over a raw TLS socket; return (sender, receiver) CPU seconds."""
    node, client = _identities(directory)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=node.ca_pem.decode())
    server_ctx.load_cert_chain(directory / "node.pem", directory / "node.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_verify_locations(cadata=client.ca_pem.decode())
    client_ctx.load_cert_chain(directory / "coordinator.pem", directory / "coordinator.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    read_fd, write_fd = os.pipe()
    size = payload.nbytes
    pid = os.fork()
    if pid == 0:  # receiver
        os.close(read_fd)
        conn, _ = listener.accept()
        tls = server_ctx.wrap_socket(conn, server_side=True)
        into = np.ones(size, dtype=np.uint8)  # touched: page faults are not the transport's
        view = memoryview(into)
        tls.recv(4)  # the handshake and a first byte, outside the measurement
        started = _cpu_s()
        got = 0
        while got < size:
            got += tls.recv_into(view[got:], size - got)
        _report(write_fd, _cpu_s() - started)
        tls.close()
        os._exit(0)
    os.close(write_fd)
    tls = client_ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="node"
    )
    tls.sendall(b"warm")
    started = _cpu_s()
    tls.sendall(memoryview(payload.view(np.uint8)))
    sender = _cpu_s() - started
    receiver = float(os.read(read_fd, 64))
    tls.close()
    os.waitpid(pid, 0)
    listener.close()
    return sender, receiver


def main(argv: list[str] | None = None) -> int:
    """Run both transports and print CPU seconds per GB for each side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=400, help="payload in MiB (default 400)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    payload = np.random.default_rng(0).random(args.mb * (1 << 20) // 4, dtype=np.float32)
    gb = payload.nbytes / 1e9
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.mb} MiB, mutual TLS 1.3")
    print(f"{'transport':>10} {'sender CPU-s/GB':>16} {'receiver CPU-s/GB':>18}")
    for name, run in (("grpc", grpc_round), ("ssl", ssl_round)):
        senders, receivers = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                sender, receiver = run(Path(tmp), payload)
            senders.append(sender / gb)
            receivers.append(receiver / gb)
        print(
            f"{name:>10} {statistics.median(senders):>16.2f} {statistics.median(receivers):>18.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
