"""Benchmark federated training rounds by model size: time and memory, coordinator and nodes.

For each model size (1M, 10M, 100M and 550M parameters by default) a child process starts
real node processes on 127.0.0.1 with mutual TLS (``LocalFederation``), runs
``Coordinator.train`` for a few rounds of one tiny DP-SGD step each (Poisson batches of about
4 records), and reports:

- **round s**: median wall time of the rounds after the first (the first also pays the
  node's noise-multiplier search and lazy imports; shown as ``first s``);
- **train s**: the slowest node's ledger charge and DP-SGD time inside the round (from its
  log: adopting the received weights as the model, the step with Gaussian noise on every
  parameter, hashing the update for its signed receipt);
- **transfer s**: round s minus train s: streaming the weights out and the update back
  (TLS, 2 MiB chunks), hashing the update on both sides for the signed receipt,
  accumulating, the server step;
- **bound s**: an in-process lower bound measured in the same child on the same tensors:
  per node, serialize the global weights (``tobytes``), copy them (what a receiver does),
  serialize the update, and add it into a running weighted sum; then average. Tensor by
  tensor, as the federation streams them.
- **floor cpu**: the CPU seconds of work no private, authenticated round can skip, measured in
  the same child on the same tensors: AES-128-GCM encryption and decryption of every byte
  sent each way (what TLS must do at least: the cheapest cipher TLS 1.3 may negotiate),
  the BLAKE3 digest of each update at the node and at the coordinator (the signed receipt;
  ``federation.training.tensor_digests``), and one
  Gaussian draw per parameter per node (the DP noise, from the node's own sampler,
  ``nodes.noise.GaussianStream``). On a machine with c cores the
  round cannot take less than floor / c seconds; **cpu/floor** compares it with what
  coordinator and nodes actually used.
- peak RSS (VmHWM) of the coordinator process and of the largest node, in GB and in
  model sizes;
- **coord cpu** / **nodes cpu**: CPU seconds (user + system) per round after the first, of
  the coordinator and of all node processes together. When their sum is about the round
  time times the machine's cores, the round is CPU-bound: only less work makes it faster.

Unless ``--no-sweep``, it then runs 8 nodes x 100M parameters (or fewer nodes, if the
memory the 2-node run measured says 8 would not fit) to show that coordinator memory does
not grow with the number of nodes as whole updates would (8 x the model).

Usage::

    .venv/bin/python benchmarks/training.py                       # 1M..550M x 2 nodes, 8 x 100M
    .venv/bin/python benchmarks/training.py --sizes 1M,10M --no-sweep
    .venv/bin/python benchmarks/training.py --quick               # 1M x 2 nodes, smoke test
    .venv/bin/python benchmarks/training.py --sizes 100M --nodes 8 --window-ab 3

The 550M model (2.2 GB of float32, past gRPC's 2 GB message cap) uses ``wide-mlp``, which
``LocalFederation(allowed_models=[...])`` allows for this benchmark only. Sizes whose
estimated memory exceeds what the machine has available are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

NODE_NAMES = (
    "hong-kong",
    "shenzhen",
    "macau",
    "guangzhou",
    "zhuhai",
    "foshan",
    "dongguan",
    "huizhou",
)
FEATURES = ("age", "income", "debt_ratio")
ROWS = 2000  # per node; 90% train, so a Poisson rate of 4 / 1800 gives batches of ~4
SAMPLE_RATE = 4 / 1800
TARGET_EPSILON = 1.0
# Architectures whose parameter counts hit the sizes (input width 3, one logit out).
SIZES: dict[str, tuple[str, tuple[int, ...]]] = {
    "1M": ("mlp", (1000, 1000)),
    "10M": ("mlp", (3162, 3162)),
    "100M": ("mlp", (4096,) * 7),
    "550M": ("wide-mlp", (8290,) * 9),
}
_TRAIN_LOG = re.compile(r"received ([\d.]+)s, trained ([\d.]+)s, released ([\d.]+)s")


def _vm_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- lower bound


def lower_bound_s(weights: dict[str, npt.NDArray[np.float32]], nodes: int) -> float:
    """Serialize, copy, serialize back and average ``weights`` for ``nodes`` nodes, in process."""
    started = time.perf_counter()
    sums = {n: np.zeros(a.size, dtype=np.float32) for n, a in weights.items()}
    for _ in range(nodes):
        for name, array in weights.items():
            sent = array.tobytes()  # coordinator serializes
            received = np.frombuffer(sent, dtype=np.float32).copy()  # node receives
            del sent
            update = received.tobytes()  # node serializes its update
            del received
            sums[name] += np.float32(1.0) * np.frombuffer(update, dtype=np.float32)
    for flat in sums.values():
        flat /= np.float32(nodes)
    return time.perf_counter() - started


CRYPTO_CHUNK = 2 << 20


def _seal_and_open(array: npt.NDArray[np.float32], sealed: bytearray, opened: bytearray) -> None:
    """AES-128-GCM encrypt ``array``'s bytes chunk by chunk, and decrypt as many bytes."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, nonce = os.urandom(16), os.urandom(12)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    raw = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    out, back = memoryview(sealed), memoryview(opened)
    for start in range(0, len(raw), CRYPTO_CHUNK):
        n = encryptor.update_into(raw[start : start + CRYPTO_CHUNK], out)
        decryptor.update_into(out[:n], back)  # in step with the sender, like a TLS peer
    encryptor.finalize()
    decryptor.finalize_with_tag(encryptor.tag)


def private_floor_cpu_s(weights: dict[str, npt.NDArray[np.float32]], nodes: int) -> float:
    """CPU seconds of the work a private, authenticated round cannot skip (see the docstring)."""
    import torch

    from federation.training import tensor_digests
    from nodes.noise import GaussianStream

    # One thread: process_time would also count the spin-waits of torch's worker threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sealed = bytearray(CRYPTO_CHUNK + 16)
    opened = bytearray(CRYPTO_CHUNK + 16)
    noise = torch.empty(CRYPTO_CHUNK // 4)
    stream = GaussianStream(secrets.token_bytes(16))  # the node's noise source
    started = time.process_time()
    for _ in range(nodes):
        for array in weights.values():
            _seal_and_open(array, sealed, opened)  # weights out to the node
            for start in range(0, array.size, noise.numel()):  # the node's DP noise
                stream.fill(noise[: min(noise.numel(), array.size - start)])
            tensor_digests({"update": array})  # the node's receipt
            _seal_and_open(array, sealed, opened)  # the update back
            tensor_digests({"update": array})  # the coordinator checks the receipt
    used = time.process_time() - started
    torch.set_num_threads(threads)
    return used


# ---------------------------------------------------------------- one configuration (child)


def run_child(size: str, nodes: int, rounds: int, *, adaptive: bool = False) -> dict[str, Any]:
    """Run one configuration in this process; return its measurements.

    ``adaptive``: the coordinator's channels use gRPC's adaptive receive window instead
    of the fixed one (``RECEIVE_WINDOW_BYTES``), for ``--window-ab``.
    """
    from federation.architectures import parameter_count
    from federation.coordinator import NodeClient
    from federation.local import LocalFederation
    from federation.models import ModelSpec

    architecture, hidden = SIZES[size]
    spec = ModelSpec(architecture, "credit", FEATURES, "defaulted", hidden=hidden)
    params = parameter_count(spec, input_dim=len(FEATURES))
    local = LocalFederation.synthetic(
        nodes=NODE_NAMES[:nodes],
        rows=ROWS,
        epsilon=1000.0,
        max_epsilon_per_release=100.0,
        allowed_models=["logistic", "mlp", "wide-mlp"],
    )
    fed = local.start()
    if adaptive:
        for name, old in list(fed.clients.items()):
            fed.clients[name] = NodeClient(
                name, old.address, identity=local.identity, receive_window_bytes=None
            )
            old.close()
    try:
        pids: list[int | str] = ["self", *(p.process.pid for p in local.processes.values())]
        started = time.perf_counter()
        cpu_before: list[float] = []
        result = fed.train(
            spec,
            rounds=rounds,
            target_epsilon=TARGET_EPSILON,
            sample_rate=SAMPLE_RATE,
            local_steps=1,
            learning_rate=0.1,
            progress=False,
            round_timeout_s=1800.0,
            # CPU of the rounds after the first, like round_s: snapshot when round 0 ends.
            on_round=lambda record: (
                cpu_before.extend(_cpu_s(pid) for pid in pids) if record.round == 0 else None
            ),
        )
        total_s = time.perf_counter() - started
        cpu_after = [_cpu_s(pid) for pid in pids]
        coordinator_peak = _vm_hwm_bytes()
        node_peaks = {n: _vm_hwm_bytes(p.process.pid) for n, p in local.processes.items()}
        node_logs = {n: p.log_path.read_text(errors="replace") for n, p in local.processes.items()}
    finally:
        local.stop()
    trained: list[list[float]] = [[] for _ in range(rounds)]
    for text in node_logs.values():
        for index, match in enumerate(_TRAIN_LOG.finditer(text)):
            if index < rounds:
                trained[index].append(float(match.group(2)))
    durations = [r.duration_s for r in result.history]
    later = durations[1:] or durations
    train_later = [max(t) for t in trained[1:] if t] or [0.0]
    weights = {n: v.detach().numpy() for n, v in result.model.state_dict().items()}
    bound = statistics.median(lower_bound_s(weights, nodes) for _ in range(2))
    floor = min(private_floor_cpu_s(weights, nodes) for _ in range(2))
    return {
        "size": size,
        "params": params,
        "nodes": nodes,
        "answered": [len(r.nodes) for r in result.history],
        "first_s": durations[0],
        "round_s": statistics.median(later),
        "node_train_s": statistics.median(train_later),
        "bound_s": bound,
        "floor_cpu_s": floor,
        "total_s": total_s,
        "coordinator_peak": coordinator_peak,
        "node_peak": max(node_peaks.values()),
        # CPU seconds per round (rounds after the first): coordinator, and all nodes together.
        "coordinator_cpu_s": (cpu_after[0] - cpu_before[0]) / max(rounds - 1, 1),
        "nodes_cpu_s": sum(b - a for a, b in zip(cpu_before[1:], cpu_after[1:], strict=True))
        / max(rounds - 1, 1),
        "model_bytes": params * 4,
    }


# ---------------------------------------------------------------- driver (parent)


BASE_BYTES = 0.7e9  # a node or coordinator process before any model (torch, data, gRPC)


def _estimate_bytes(
    params: int, nodes: int, node_factor: float, coordinator_factor: float
) -> float:
    model = params * 4
    return nodes * (node_factor * model + BASE_BYTES) + coordinator_factor * model + BASE_BYTES


def _run(size: str, nodes: int, rounds: int, *, adaptive: bool = False) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--child", size, "--nodes", str(nodes)]
    command += ["--rounds", str(rounds)] + (["--adaptive-window"] if adaptive else [])
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    sys.stderr.write(f"{size} x {nodes} nodes failed (exit {proc.returncode}):\n")
    sys.stderr.write(proc.stderr[-3000:] + "\n")
    return None


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def _row(r: dict[str, Any]) -> str:
    transfer = max(r["round_s"] - r["node_train_s"], 0.0)
    model = r["model_bytes"]
    return (
        f"{r['params'] / 1e6:>8.1f}M {r['nodes']:>5} {r['round_s']:>8.2f} {r['first_s']:>8.2f} "
        f"{r['node_train_s']:>8.2f} {transfer:>9.2f} {r['bound_s']:>8.2f} "
        f"{transfer / r['bound_s']:>8.2f}x {r['round_s'] / r['bound_s']:>8.2f}x "
        f"{_gb(r['coordinator_peak']):>7} ({r['coordinator_peak'] / model:>4.1f}x) "
        f"{_gb(r['node_peak']):>7} ({r['node_peak'] / model:>4.1f}x) "
        f"{r['coordinator_cpu_s']:>8.2f} {r['nodes_cpu_s']:>8.2f} {r['floor_cpu_s']:>9.2f} "
        f"{(r['coordinator_cpu_s'] + r['nodes_cpu_s']) / r['floor_cpu_s']:>8.2f}x"
    )


HEADER = (
    f"{'params':>9} {'nodes':>5} {'round s':>8} {'first s':>8} {'train s':>8} "
    f"{'transfer s':>9} {'bound s':>8} {'xfer/bnd':>9} {'rnd/bnd':>9} "
    f"{'coord GB':>7} {'(xmodel)':>7} {'node GB':>7} {'(xmodel)':>7} "
    f"{'coord cpu':>8} {'nodes cpu':>8} {'floor cpu':>9} {'cpu/floor':>9}"
)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M,10M,100M,550M")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-sweep", action="store_true", help="skip 8 nodes x 100M")
    parser.add_argument("--quick", action="store_true", help="1M x 2 nodes only")
    parser.add_argument(
        "--flower",
        metavar="PYTHON",
        help="also measure Flower 1.42 at 100M parameters with this interpreter (one with "
        "flwr==1.42.0 and torch: `make bench-flower` makes .venv-flower) and print the ratios",
    )
    parser.add_argument(
        "--window-ab",
        type=int,
        metavar="PAIRS",
        help="instead of the table: run the first of --sizes with --nodes nodes PAIRS times "
        "with gRPC's adaptive receive window at the coordinator and PAIRS times with the "
        "fixed one, interleaved, and print the means",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--adaptive-window", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measured = run_child(args.child, args.nodes, args.rounds, adaptive=args.adaptive_window)
        print(json.dumps(measured), flush=True)
        return 0
    if args.window_ab is not None:
        if args.window_ab < 1:
            parser.error("--window-ab needs at least 1 pair")
        architecture, hidden = SIZES[args.sizes.split(",")[0]]
        params = sum(a * b + b for a, b in zip((3, *hidden), (*hidden, 1), strict=False))
        need = _estimate_bytes(params, args.nodes, 4.0, 3.0)
        if need > 0.85 * _mem_available_bytes():
            parser.error(f"--window-ab: this configuration needs about {_gb(need)} GB")
        window_ab(args.sizes.split(",")[0], args.nodes, args.rounds, args.window_ab)
        return 0
    sizes = ["1M"] if args.quick else args.sizes.split(",")
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, "
        f"{_gb(_mem_available_bytes())} GB available, load {os.getloadavg()[0]:.1f}; "
        f"{ROWS} rows per node, 1 DP-SGD step per round (Poisson batch ~4), TLS, chunks of 2 MiB"
    )
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    factors = (4.0, 3.0)  # node, coordinator bytes per model byte (past the base), until measured
    for size in sizes:
        architecture, hidden = SIZES[size]
        params = sum(a * b + b for a, b in zip((3, *hidden), (*hidden, 1), strict=False))
        # Fewer nodes if two would not fit: the point of the largest size is that it goes
        # through at all (2.2 GB, past gRPC's message cap), measured with what fits.
        nodes = next(
            (
                n
                for n in range(args.nodes, 0, -1)
                if _estimate_bytes(params, n, *factors) < 0.85 * _mem_available_bytes()
            ),
            0,
        )
        if nodes == 0:
            need = _estimate_bytes(params, 1, *factors)
            print(f"# {size}: skipped, one node alone needs about {_gb(need)} GB", flush=True)
            continue
        if nodes < args.nodes:
            need = _estimate_bytes(params, args.nodes, *factors)
            print(f"# {size}: {nodes} node(s); {args.nodes} would need {_gb(need)} GB", flush=True)
        result = _run(size, nodes, 2 if size == "550M" else args.rounds)
        if result is None:
            continue
        results.append(result)
        if result["model_bytes"] >= 100e6:  # large enough for the base to be negligible
            factors = (
                max(2.0, (result["node_peak"] - BASE_BYTES) / result["model_bytes"]),
                max(1.5, (result["coordinator_peak"] - BASE_BYTES) / result["model_bytes"]),
            )
        print(_row(result), flush=True)
    if args.flower:
        flower(args.flower, results, args.nodes)
    if not (args.quick or args.no_sweep):
        sweep(results)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


def flower(python: str, results: list[dict[str, Any]], clients: int) -> None:
    """Flower 1.42 on the same 100M model, clients and machine (benchmarks/flower_baseline.py).

    Server-side TLS, the closest Flower comes to mutual TLS. Four rounds; the first, which
    also waits for the clients to connect, is left out like Federation's first round.
    """
    ours = next((r for r in results if r["size"] == "100M" and r["nodes"] == clients), None)
    if ours is None:
        print(f"# flower: skipped (no Federation result at 100M x {clients} nodes)", flush=True)
        return
    hidden = ",".join(map(str, SIZES["100M"][1]))
    script = Path(__file__).with_name("flower_baseline.py")
    command = [python, str(script), "--hidden", hidden, "--clients", str(clients)]
    command += ["--rounds", "4", "--tls"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        print(f"# flower: failed (exit {proc.returncode})", flush=True)
        sys.stderr.write(proc.stderr[-3000:] + "\n")
        return
    theirs = json.loads(line)
    if theirs["params"] != ours["params"]:
        print(f"# flower: trained {theirs['params']} parameters, not {ours['params']}", flush=True)
        return
    later = theirs["round_s"][1:]
    round_s = statistics.median(later)  # like Federation's round s
    # CPU per round after the first: the mean, like Federation's coord + nodes cpu.
    cpu_s = statistics.fmean(
        a + b for a, b in zip(theirs["server_cpu_s"], theirs["clients_cpu_s"], strict=True)
    )
    our_cpu = ours["coordinator_cpu_s"] + ours["nodes_cpu_s"]
    model = ours["model_bytes"]
    rounds = ", ".join(f"{x:.2f}" for x in later)
    print(
        f"# flower 1.42, {theirs['params'] / 1e6:.1f}M x {clients} clients, server TLS: "
        f"round {round_s:.2f} s (median of {rounds}), CPU {cpu_s:.1f} s per round, peak "
        f"server {_gb(theirs['server_peak_gb'] * 1e9)} GB "
        f"({theirs['server_peak_gb'] * 1e9 / model:.1f}x model), "
        f"client {_gb(theirs['client_peak_gb'] * 1e9)} GB",
        flush=True,
    )
    print(
        f"# federation vs flower at 100M x {clients}: round {ours['round_s']:.2f} vs "
        f"{round_s:.2f} s ({round_s / ours['round_s']:.1f}x faster), CPU {our_cpu:.1f} vs "
        f"{cpu_s:.1f} s per round ({cpu_s / our_cpu:.1f}x less), coordinator peak "
        f"{_gb(ours['coordinator_peak'])} vs {_gb(theirs['server_peak_gb'] * 1e9)} GB; "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def window_ab(size: str, nodes: int, rounds: int, pairs: int) -> None:
    """The coordinator's fixed receive window against gRPC's adaptive one, interleaved.

    Pairs alternate their order (ABBA...), so drift in the machine's speed cancels out.
    """
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# {size} x {nodes} nodes, {pairs} pairs, load {os.getloadavg()[0]:.1f}")
    print(f"{'window':>8} {'round s':>8} {'coord cpu':>9} {'coord GB':>8} {'(xmodel)':>8}")
    runs: dict[str, list[dict[str, Any]]] = {"adaptive": [], "fixed": []}
    for pair in range(pairs):
        order = ["adaptive", "fixed"] if pair % 2 == 0 else ["fixed", "adaptive"]
        for name in order:
            result = _run(size, nodes, rounds, adaptive=name == "adaptive")
            if result is None:
                print(f"{name:>8} failed (see stderr)", flush=True)
                continue
            runs[name].append(result)
            peak = result["coordinator_peak"]
            print(
                f"{name:>8} {result['round_s']:>8.2f} {result['coordinator_cpu_s']:>9.2f} "
                f"{_gb(peak):>8} {peak / result['model_bytes']:>7.1f}x",
                flush=True,
            )
    for name, results in runs.items():
        if not results:
            continue
        peaks = [r["coordinator_peak"] / r["model_bytes"] for r in results]
        round_s = statistics.fmean(r["round_s"] for r in results)
        cpu_s = statistics.fmean(r["coordinator_cpu_s"] for r in results)
        print(
            f"# {name}: {len(results)} runs, round {round_s:.2f} s and coordinator CPU "
            f"{cpu_s:.2f} s (means), coordinator peak {min(peaks):.1f}-{max(peaks):.1f} "
            "model sizes",
            flush=True,
        )
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


def sweep(results: list[dict[str, Any]]) -> None:
    """8 nodes x 100M parameters, or as many nodes as the measured memory allows."""
    base = next((r for r in results if r["size"] == "100M"), None)
    if base is None:
        return
    model = base["model_bytes"]
    node_bytes = base["node_peak"] + 0.2e9
    available = 0.9 * _mem_available_bytes() - base["coordinator_peak"]
    nodes = min(8, int(available // node_bytes))
    if nodes < 3:
        print("# sweep skipped: not enough memory for 3 nodes at 100M", flush=True)
        return
    note = "" if nodes == 8 else f" (8 would need {_gb(8 * node_bytes)} GB)"
    print(f"# {nodes} nodes x 100M{note}", flush=True)
    result = _run("100M", nodes, 3)
    if result is not None:
        print(_row(result), flush=True)
        print(
            f"# coordinator peak with {nodes} nodes: {result['coordinator_peak'] / model:.1f} "
            f"model sizes; with 2 nodes: {base['coordinator_peak'] / model:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
