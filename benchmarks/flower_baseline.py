"""The Flower baseline of ``benchmarks/training.py``: the same round, measured on this machine.

Issue 4 compares a Federation round with a Flower 1.42 round on the same 2-core machine "with
the same trivial local step" (25-30 s at 100M parameters x 2 clients). This script measures
that Flower round here, so the ratio comes from one machine and one session rather than a
quoted figure. It runs in its own virtual environment (Flower pins its own gRPC and protobuf;
``make bench-flower`` creates ``.venv-flower`` with ``flwr==1.42.0`` and the same torch) and
imports nothing from Federation.

What runs: Flower's gRPC server (``flwr.server.start_server``, FedAvg, evaluation off) and N
clients (``flwr.client.start_client``), each a separate process on 127.0.0.1. The global
model is the benchmark's MLP (3 inputs, the given hidden widths, one logit; 4096 x 7 is 100.7M
parameters). Each client does what Flower's PyTorch tutorial does: load the parameters into
its torch model, take one SGD step on a batch of 4 random rows, return the parameters as
NumPy arrays. Without ``--tls`` the channels are plaintext (Flower's default); with it, the
server presents a certificate (Flower's TLS is server-side only: clients send none).

Reported (one JSON line on stdout, after the log): per round, the wall time from the server
configuring the round to FedAvg's result (``round_s``); CPU seconds per round of the server
and of all clients together (process CPU time between consecutive rounds' ends); and the
peak RSS (VmHWM) of the server and the largest client.

Usage::

    .venv-flower/bin/python benchmarks/flower_baseline.py --hidden 4096x7 --clients 2
    .venv-flower/bin/python benchmarks/flower_baseline.py --hidden 4096x7 --tls
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

INPUTS = 3
BATCH = 4


def _hidden(text: str) -> tuple[int, ...]:
    """``4096x7`` -> (4096,) * 7; ``64,64`` -> (64, 64)."""
    if "x" in text:
        width, depth = text.split("x")
        return (int(width),) * int(depth)
    return tuple(int(w) for w in text.split(","))


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _model(hidden: tuple[int, ...]) -> Any:
    import torch

    layers: list[torch.nn.Module] = []
    widths = (INPUTS, *hidden)
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(widths[-1], 1))
    return torch.nn.Sequential(*layers)


# ------------------------------------------------------------------ server


def _serve(args: argparse.Namespace) -> None:
    import flwr
    from flwr.server.strategy import FedAvg

    hidden = _hidden(args.hidden)
    rng = np.random.default_rng(0)
    widths = (INPUTS, *hidden, 1)
    initial: list[np.ndarray] = []
    for a, b in zip(widths, widths[1:], strict=False):
        bound = 1 / np.sqrt(a)
        initial.append(rng.uniform(-bound, bound, size=(b, a)).astype(np.float32))
        initial.append(rng.uniform(-bound, bound, size=b).astype(np.float32))
    rounds: list[dict[str, float]] = []

    class Timed(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            rounds.append({"started": time.perf_counter()})
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed")
            aggregated = super().aggregate_fit(server_round, results, failures)
            metrics = [fit.metrics for _, fit in results]
            rounds[-1].update(
                ended=time.perf_counter(),
                server_cpu=time.process_time(),
                clients_cpu=sum(float(m["cpu"]) for m in metrics),
                client_peak_gb=max(float(m["peak_gb"]) for m in metrics),
            )
            return aggregated

    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        initial_parameters=flwr.common.ndarrays_to_parameters(initial),
    )
    del initial
    certificates = None
    if args.tls:
        tls = Path(args.tls)
        certificates = tuple((tls / n).read_bytes() for n in ("ca.pem", "server.pem", "server.key"))
    flwr.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=flwr.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        certificates=certificates,
    )
    Path(args.result).write_text(json.dumps({"rounds": rounds, "server_peak_gb": _peak_rss_gb()}))


# ------------------------------------------------------------------ client


def _client(args: argparse.Namespace) -> None:
    import flwr
    import torch

    model = _model(_hidden(args.hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = torch.Generator().manual_seed(args.seed)

    class Tutorial(flwr.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return [val.cpu().numpy() for _, val in model.state_dict().items()]

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            keys = model.state_dict().keys()
            state = {k: torch.tensor(v) for k, v in zip(keys, parameters, strict=True)}
            model.load_state_dict(state, strict=True)
            x = torch.randn(BATCH, INPUTS, generator=rng)
            y = torch.randint(0, 2, (BATCH, 1), generator=rng).float()
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            optimizer.step()
            metrics = {"cpu": time.process_time(), "peak_gb": _peak_rss_gb()}
            return self.get_parameters(config={}), BATCH, metrics

    root = Path(args.tls, "ca.pem").read_bytes() if args.tls else None
    flwr.client.start_client(
        server_address=f"127.0.0.1:{args.port}",
        client=Tutorial().to_client(),
        insecure=not args.tls,
        root_certificates=root,
    )


# ------------------------------------------------------------------ driver


def _certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (what Flower's TLS needs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key: Any, issuer: x509.Name, signer: Any, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            import ipaddress

            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = cert("bench-ca", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("127.0.0.1", key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drive(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        work = Path(tmp)
        common = ["--hidden", args.hidden, "--port", str(_free_port())]
        if args.tls:
            _certificates(work)
            common += ["--tls", str(work)]
        me = [sys.executable, __file__]
        result = work / "result.json"
        # Flower's processes get the OpenMP wait policy our nodes run with (nodes/__main__.py),
        # so that setting is not part of the difference measured.
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        server = subprocess.Popen(
            [*me, "server", *common, "--clients", str(args.clients), "--rounds", str(args.rounds),
             "--result", str(result)],
            env=env,
        )  # fmt: skip
        time.sleep(2.0)  # the server binds before clients dial (they retry anyway)
        clients = [
            subprocess.Popen([*me, "client", *common, "--seed", str(i)], env=env)
            for i in range(args.clients)
        ]
        try:
            code = server.wait(timeout=args.timeout_s)
        finally:
            for process in (*clients, server):
                if process.poll() is None:
                    process.kill()
            for process in clients:
                process.wait()
        if code != 0 or not result.exists():
            print(f"# flower server failed (exit {code})", file=sys.stderr)
            return 1
        data = json.loads(result.read_text())
    rounds = data["rounds"]
    round_s = [r["ended"] - r["started"] for r in rounds]
    pairs = list(zip(rounds, rounds[1:], strict=False))
    server_cpu = [b["server_cpu"] - a["server_cpu"] for a, b in pairs]
    clients_cpu = [b["clients_cpu"] - a["clients_cpu"] for a, b in pairs]
    hidden = _hidden(args.hidden)
    params = sum(a * b + b for a, b in zip((INPUTS, *hidden), (*hidden, 1), strict=True))
    print(
        json.dumps(
            {
                "framework": "flwr 1.42",
                "params": params,
                "clients": args.clients,
                "tls": bool(args.tls),
                "round_s": round_s,
                "server_cpu_s": server_cpu,
                "clients_cpu_s": clients_cpu,
                "server_peak_gb": data["server_peak_gb"],
                "client_peak_gb": max(r["client_peak_gb"] for r in rounds),
            }
        ),
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="drive", choices=("drive", "server", "client"))
    parser.add_argument("--hidden", default="4096x7", help="hidden widths: 4096x7 or 64,64")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tls", nargs="?", const="yes", default="", help="server-side TLS")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.role == "server":
        _serve(args)
        return 0
    if args.role == "client":
        _client(args)
        return 0
    return _drive(args)


if __name__ == "__main__":
    sys.exit(main())
