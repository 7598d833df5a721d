"""Benchmark the node's DP-SGD engine: throughput against non-private training, and utility.

(b) Throughput, samples per second with sampling included, for an MLP (hidden 64, 64) and
logistic regression on ``rows`` synthetic credit records (hong-kong) at one node, same
process, same data, same model, same expected batch size:

- ``non-private``: in-memory tensors, a fresh permutation per epoch sliced into batches,
  ``zero_grad / forward / BCE mean / backward / SGD step`` (the plain PyTorch loop);
- ``federation DP-SGD``: ``TrainingEngine.train`` end to end for one round of ``steps``
  steps (exact Poisson sampling, per-sample clipping, Gaussian noise, SGD; plus building
  the model, loading the weights and the DP example count). Samples = q * n * steps, the
  expected number of sampled records;
- ``opacus default``: ``PrivacyEngine.make_private`` (hooks mode) with its Poisson
  ``DPDataLoader`` over a ``TensorDataset`` of the same tensors, same q, sigma and clip.

Timings are interleaved over ``--repeats`` rounds and the median is reported, because the
machine may be shared. Target: DP-SGD >= 0.5x non-private.

(c) Utility: ROC-AUC on a fresh test set (both jurisdictions) of a DP model trained at
epsilon = 1, 3, 8 per node, against centralized non-private training on the pooled data.
The DP model is trained *federated in process*: one ``TrainingEngine`` per node (hong-kong,
shenzhen), each running ``plan_training`` + ``train`` from the global weights every round,
and FedAvg weighted by the nodes' DP example counts; no gRPC (the engine, planning and
accounting are the production code). Mean and spread over ``--seeds`` seeds.

Usage::

    .venv/bin/python benchmarks/training_dpsgd.py              # 100k rows per node
    .venv/bin/python benchmarks/training_dpsgd.py --quick      # 20k rows, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from federation.datasets import CREDIT_SCHEMA, JURISDICTIONS, synthetic_credit
from federation.metrics import roc_auc
from federation.models import ModelSpec, build_model, initial_arrays
from nodes.config import ConsumerPolicy
from nodes.data import Table, table_from_arrays
from nodes.noise import CryptoRandom
from nodes.training import (
    TrainingEngine,
    TrainPlan,
    _feature_matrix,
    holdout_mask,
    job_epsilon,
    plan_training,
)

FEATURES = tuple(c.name for c in CREDIT_SCHEMA.columns if c.name != "defaulted")
TARGET = "defaulted"
BATCH = 256  # expected batch size q * n
CLIP_NORM = 1.0
DELTA = 1e-6
TARGET_RATIO = 0.5
POLICY = ConsumerPolicy(
    name="bench",
    epsilon=1e6,
    delta=1e-5,
    max_epsilon_per_release=1e3,
    max_delta_per_release=1e-5,
    operations=frozenset({"describe", "train"}),
    noise_multiplier_floor=0.0,
    max_rounds=1000,
)
MODELS: dict[str, ModelSpec] = {
    "mlp 64,64": ModelSpec("mlp", "credit", FEATURES, TARGET, (64, 64)),
    "logistic": ModelSpec("logistic", "credit", FEATURES, TARGET),
}
# (c): rounds x local steps per node, learning rates tuned once by hand on seed 0.
UTILITY_ROUNDS = 10
UTILITY_STEPS = 50
UTILITY_LR = {"mlp 64,64": 2.0, "logistic": 4.0}
EPSILONS = (1.0, 3.0, 8.0)


def _plan(spec: ModelSpec, **overrides: Any) -> TrainPlan:
    request: dict[str, Any] = {
        "spec": spec,
        "round": 0,
        "total_rounds": 1,
        "target_epsilon": 3.0,
        "delta": DELTA,
        "sample_rate": 0.01,
        "local_steps": 100,
        "learning_rate": 0.5,
        "clip_norm": CLIP_NORM,
        "metrics_epsilon": 0.0,
        "job_id": "bench",
        "schema": CREDIT_SCHEMA,
        "policy": POLICY,
    }
    request.update(overrides)
    return plan_training(**request)


def _table(jurisdiction: str, rows: int, seed: int) -> Table:
    data = synthetic_credit(jurisdiction=jurisdiction, rows=rows, seed=seed)
    return table_from_arrays(data, schema=CREDIT_SCHEMA)


def _tensors(table: Table) -> tuple[torch.Tensor, torch.Tensor]:
    """The training part of a table, as the engine sees it."""
    keep = ~holdout_mask(table)
    x = torch.from_numpy(_feature_matrix(table, FEATURES)[keep])
    y = torch.from_numpy(np.asarray(table.column(TARGET), dtype=np.float32)[keep])
    return x, y


# ------------------------------------------------------------------ (b) throughput


@dataclass(frozen=True, slots=True)
class Throughput:
    """Samples per second of each set-up for one model, one entry per repeat."""

    model: str
    non_private: list[float]
    federation: list[float]
    opacus: list[float]


def _time_non_private(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    model = build_model(spec, input_dim=x.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    n = x.shape[0]
    done = 0
    start = time.perf_counter()
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for begin in range(0, n - BATCH + 1, BATCH):
            index = order[begin : begin + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]).squeeze(-1), y[index]).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return steps * BATCH / (time.perf_counter() - start)


def _time_federation(
    spec: ModelSpec, engine: TrainingEngine, n: int, steps: int, seed: int
) -> float:
    rate = BATCH / n
    plan = _plan(spec, sample_rate=rate, local_steps=steps, target_epsilon=3.0)
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0)
    start = time.perf_counter()
    # A node's own draws: Poisson sampling and the DP count from CryptoRandom (AES-CTR).
    engine.train(plan, weights, rng=CryptoRandom(seed.to_bytes(16, "little")))
    return rate * n * steps / (time.perf_counter() - start)


def _time_opacus(
    spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, steps: int, sigma: float
) -> float:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(spec, input_dim=x.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and hook notices: not what we measure
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=CLIP_NORM,
            poisson_sampling=True,
        )
        loss_fn = nn.BCEWithLogitsLoss()
        samples = 0
        done = 0
        start = time.perf_counter()
        while done < steps:
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(xb):
                    loss_fn(model(xb).squeeze(-1), yb).backward()
                optimizer.step()
                samples += len(xb)
                done += 1
                if done == steps:
                    break
        took = time.perf_counter() - start
    return samples / took


def measure_throughput(
    rows: int, *, steps: int, opacus_steps: int, repeats: int, seed: int
) -> list[Throughput]:
    """Interleave the three set-ups ``repeats`` times per model; return every timing."""
    table = _table("hong-kong", rows, seed)
    engine = TrainingEngine(table)
    x, y = _tensors(table)
    n = x.shape[0]
    results = []
    for label, spec in MODELS.items():
        sigma = _plan(spec, sample_rate=BATCH / n, local_steps=steps).noise_multiplier
        _time_non_private(spec, x, y, 20)  # warm-up: allocator, kernels, caches
        _time_federation(spec, engine, n, 20, seed)
        _time_opacus(spec, x, y, 5, sigma)
        runs: dict[str, list[float]] = {"non": [], "fed": [], "opacus": []}
        for r in range(repeats):
            runs["non"].append(_time_non_private(spec, x, y, steps))
            runs["fed"].append(_time_federation(spec, engine, n, steps, seed + r))
            runs["opacus"].append(_time_opacus(spec, x, y, opacus_steps, sigma))
            print(
                f"  {label} repeat {r + 1}/{repeats}: non-private {runs['non'][-1]:,.0f}/s, "
                f"DP-SGD {runs['fed'][-1]:,.0f}/s, opacus {runs['opacus'][-1]:,.0f}/s",
                flush=True,
            )
        results.append(Throughput(label, runs["non"], runs["fed"], runs["opacus"]))
    return results


def _print_throughput(results: list[Throughput], rows: int, n: int, steps: int) -> None:
    print(
        f"\n(b) Throughput, samples/s (sampling included), {rows:,} rows at one node "
        f"({n:,} training records after the 10% hold-out), expected batch {BATCH}, "
        f"{steps} steps per timing, torch threads {torch.get_num_threads()}. Headline: best "
        "of the interleaved repeats (least disturbed by other load on the machine); the "
        "ratio of medians is shown too."
    )
    header = (
        f"{'model':<10} | {'non-private':>11} | {'fed DP-SGD':>10} | {'opacus default':>14} | "
        f"{'DP/non-priv':>11} | {'(medians)':>9} | {'target':>6} | {'verdict':<7} | "
        f"{'opacus/non-priv':>15} | {'DP/opacus':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        best_non, best_fed, best_opacus = max(r.non_private), max(r.federation), max(r.opacus)
        ratio = best_fed / best_non
        median_ratio = statistics.median(r.federation) / statistics.median(r.non_private)
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print(
            f"{r.model:<10} | {best_non:>11,.0f} | {best_fed:>10,.0f} | {best_opacus:>14,.0f} | "
            f"{ratio:>10.2f}x | {median_ratio:>8.2f}x | {'>=0.5x':>6} | {verdict:<7} | "
            f"{best_opacus / best_non:>14.3f}x | {best_fed / best_opacus:>8.1f}x"
        )
    print(
        "non-private: plain PyTorch loop over shuffled in-memory batches. fed DP-SGD: "
        "nodes.training.TrainingEngine.train (exact Poisson sampling, exact per-sample "
        "clipping, Gaussian noise). opacus default: PrivacyEngine.make_private, hooks mode, "
        "its Poisson DPDataLoader over a TensorDataset of the same tensors."
    )


# ------------------------------------------------------------------ (c) utility


def _scorer(
    spec: ModelSpec, x_test: torch.Tensor, labels: npt.NDArray[np.bool_]
) -> Callable[[dict[str, npt.NDArray[np.float32]]], float]:
    model = build_model(spec, input_dim=x_test.shape[1])

    def score(weights: dict[str, npt.NDArray[np.float32]]) -> float:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        with torch.no_grad():
            return roc_auc(model(x_test).reshape(-1).double().numpy(), labels)

    return score


def _federated_dp(
    spec: ModelSpec, engines: list[TrainingEngine], epsilon: float, lr: float, seed: int
) -> tuple[dict[str, npt.NDArray[np.float32]], float, float]:
    """FedAvg over in-process node engines; returns weights, sigma and the job's epsilon."""
    n = min(e.table.rows for e in engines) * 0.9
    rate = BATCH / n
    rng = np.random.default_rng(seed)
    weights = initial_arrays(spec, input_dim=_plan(spec).input_dim, seed=seed)
    plan = _plan(spec)
    for r in range(UTILITY_ROUNDS):
        plan = _plan(
            spec,
            round=r,
            total_rounds=UTILITY_ROUNDS,
            target_epsilon=epsilon,
            sample_rate=rate,
            local_steps=UTILITY_STEPS,
            learning_rate=lr,
        )
        updates = [engine.train(plan, weights, rng=rng) for engine in engines]
        counts = np.array([max(u.noisy_examples, 1.0) for u in updates])
        shares = counts / counts.sum()
        weights = {
            name: sum(
                (s * u.weights[name] for s, u in zip(shares, updates, strict=True)),
                start=np.zeros_like(weights[name]),
            ).astype(np.float32)
            for name in weights
        }
    return weights, plan.noise_multiplier, job_epsilon(plan, rounds=UTILITY_ROUNDS)


def _centralized(
    spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int
) -> dict[str, npt.NDArray[np.float32]]:
    """Non-private training on pooled data: logistic by full-batch L-BFGS to convergence
    (the maximum-likelihood fit), the MLP by Adam, batch 256, ``epochs`` epochs."""
    weights = initial_arrays(spec, input_dim=x.shape[1], seed=seed)
    model = build_model(spec, input_dim=x.shape[1])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    loss_fn = nn.BCEWithLogitsLoss()
    if spec.architecture == "logistic":
        lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss: torch.Tensor = loss_fn(model(x).squeeze(-1), y)
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        lbfgs.step(closure)  # type: ignore[no-untyped-call]
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for begin in range(0, x.shape[0], BATCH):
                index = order[begin : begin + BATCH]
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x[index]).squeeze(-1), y[index]).backward()
                optimizer.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def measure_utility(rows: int, *, seeds: int, epochs: int, seed: int) -> None:
    """Print the ROC-AUC table for (c)."""
    tables = [_table(j, rows, seed + i) for i, j in enumerate(JURISDICTIONS)]
    engines = [TrainingEngine(t) for t in tables]
    pooled = [_tensors(t) for t in tables]
    x_all = torch.cat([p[0] for p in pooled])
    y_all = torch.cat([p[1] for p in pooled])
    tests = [_table(j, 20_000, seed + 1000 + i) for i, j in enumerate(JURISDICTIONS)]
    x_test = torch.cat([torch.from_numpy(_feature_matrix(t, FEATURES)) for t in tests])
    labels = np.concatenate([np.asarray(t.column(TARGET), dtype=np.bool_) for t in tests])
    print(
        f"\n(c) ROC-AUC on a fresh test set ({len(labels):,} records, both jurisdictions); "
        f"{rows:,} records per node (90% train). DP: federated in process (2 TrainingEngines "
        f"+ FedAvg weighted by DP counts, no gRPC), {UTILITY_ROUNDS} rounds x {UTILITY_STEPS} "
        f"steps, expected batch {BATCH}, clip {CLIP_NORM}, delta {DELTA:g}; epsilon is per "
        f"node. Centralized, non-private, pooled data: logistic by full-batch L-BFGS, MLP by "
        f"Adam for {epochs} epochs. "
        f"Mean +- sd over {seeds} seeds."
    )
    header = (
        f"{'model':<10} | {'initial':>7} | {'central non-private':>19} | "
        + " | ".join(f"{f'DP eps={e:g}':>13}" for e in EPSILONS)
        + f" | {'sigma @1/3/8':>18} | {'job eps @1/3/8':>18}"
    )
    print(header)
    print("-" * len(header))
    for label, spec in MODELS.items():
        score = _scorer(spec, x_test, labels)
        initial = [
            score(initial_arrays(spec, input_dim=x_all.shape[1], seed=s)) for s in range(seeds)
        ]
        central = [score(_centralized(spec, x_all, y_all, s, epochs)) for s in range(seeds)]
        dp: dict[float, list[float]] = {}
        sigmas, spent = [], []
        for epsilon in EPSILONS:
            dp[epsilon] = []
            for s in range(seeds):
                weights, sigma, job = _federated_dp(spec, engines, epsilon, UTILITY_LR[label], s)
                dp[epsilon].append(score(weights))
            sigmas.append(f"{sigma:.2f}")
            spent.append(f"{job:.2f}")
        cells = " | ".join(f"{_fmt(dp[e]):>13}" for e in EPSILONS)
        print(
            f"{label:<10} | {statistics.mean(initial):>7.3f} | {_fmt(central):>19} | {cells} | "
            f"{'/'.join(sigmas):>18} | {'/'.join(spent):>18}"
        )
    print(f"learning rates (DP): {UTILITY_LR}; 'job eps' = the node's composed ledger spend.")


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}+-{sd:.3f}"


# ------------------------------------------------------------------ main


def _environment() -> list[str]:
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}",
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}",
    ]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="records per node")
    parser.add_argument("--steps", type=int, default=300, help="steps per throughput timing")
    parser.add_argument("--opacus-steps", type=int, default=30, help="steps per opacus timing")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the utility table")
    parser.add_argument("--epochs", type=int, default=5, help="centralized training epochs")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (all set-ups)")
    parser.add_argument("--quick", action="store_true", help="20k rows, 2 repeats, 1 seed")
    parser.add_argument("--skip-utility", action="store_true", help="only the throughput table")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.steps, args.opacus_steps, args.repeats, args.seeds = 20_000, 100, 10, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Run (b) and (c) and print their tables."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    print("\n".join(_environment()), flush=True)
    results = measure_throughput(
        args.rows,
        steps=args.steps,
        opacus_steps=args.opacus_steps,
        repeats=args.repeats,
        seed=args.seed,
    )
    n = int((~holdout_mask(_table("hong-kong", args.rows, args.seed))).sum())
    _print_throughput(results, args.rows, n, args.steps)
    if not args.skip_utility:
        measure_utility(args.rows, seeds=args.seeds, epochs=args.epochs, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
