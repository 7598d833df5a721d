"""DP-SGD accounting and noise at the node, checked against Opacus and against statistics.

Accounting checks are deterministic known-answer comparisons with Opacus' RDPAccountant.
Statistical checks use fixed seeds; their false-alarm rates over a random seed are:

- Poisson sampling, batch size: |z| <= 4.5 against Binomial(n, q), alpha = 6.8e-6;
- Poisson sampling, per-record inclusion: chi-square over 200 records, alpha = 1e-4;
- gradient noise: sample standard deviation over ~1,200 coordinates x 4 seeds within
  4.5 standard errors of sigma * clip_norm (plus the bounded clipped-gradient term),
  alpha < 1e-5.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy import stats

from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.models import ModelSpec, initial_arrays
from federation.privacy import Spend
from nodes.config import ConsumerPolicy
from nodes.data import table_from_arrays
from nodes.ledger import Ledger
from nodes.training import (
    EXAMPLES_EPSILON_SHARE,
    TrainingEngine,
    TrainPlan,
    job_epsilon,
    plan_training,
    poisson_sample,
)

FEATURES = tuple(c.name for c in CREDIT_SCHEMA.columns if c.name != "defaulted")
POLICY = ConsumerPolicy(
    name="lab",
    epsilon=50.0,
    delta=1e-5,
    max_epsilon_per_release=10.0,
    max_delta_per_release=1e-5,
    operations=frozenset({"describe", "train"}),
    noise_multiplier_floor=0.1,
    max_rounds=100,
)

# (target_epsilon, delta, sample_rate, total_rounds, local_steps)
JOBS = [
    (1.0, 1e-5, 0.01, 10, 50),
    (3.0, 1e-6, 0.05, 5, 20),
    (8.0, 1e-5, 0.002, 20, 100),
]


def _plan(job: tuple[float, float, float, int, int], **overrides: Any) -> TrainPlan:
    target, delta, rate, rounds, steps = job
    request: dict[str, Any] = {
        "spec": ModelSpec("logistic", "credit", FEATURES, "defaulted"),
        "round": 0,
        "total_rounds": rounds,
        "target_epsilon": target,
        "delta": delta,
        "sample_rate": rate,
        "local_steps": steps,
        "learning_rate": 0.5,
        "clip_norm": 1.0,
        "metrics_epsilon": 0.0,
        "job_id": "job",
        "schema": CREDIT_SCHEMA,
        "policy": POLICY,
    }
    request.update(overrides)
    return plan_training(**request)


def _opacus_epsilon(plan: TrainPlan, steps: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": Opacus' bound stays valid, just maybe loose.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(accountant.get_epsilon(delta=plan.delta))


@pytest.mark.parametrize("job", JOBS)
def test_job_epsilon_matches_opacus_within_one_percent(
    job: tuple[float, float, float, int, int],
) -> None:
    plan = _plan(job)
    reported = job_epsilon(plan, rounds=plan.total_rounds)
    opacus = _opacus_epsilon(plan, plan.total_rounds * plan.local_steps)
    assert reported == pytest.approx(opacus, rel=0.01)


@pytest.mark.parametrize("job", JOBS)
def test_dp_sgd_part_is_opacus_exactly(job: tuple[float, float, float, int, int]) -> None:
    plan = _plan(job)
    spend = Spend()
    for _ in range(plan.total_rounds):
        spend = spend.plus(plan.update_charge)
    opacus = _opacus_epsilon(plan, plan.total_rounds * plan.local_steps)
    assert spend.epsilon_at(plan.delta) == pytest.approx(opacus, rel=1e-9)


@pytest.mark.parametrize("job", JOBS)
def test_the_whole_job_ends_at_or_below_its_target(
    job: tuple[float, float, float, int, int],
) -> None:
    plan = _plan(job)
    reported = job_epsilon(plan, rounds=plan.total_rounds)
    assert reported <= plan.target_epsilon
    # The noise multiplier is tight: DP-SGD gets (1 - share) of the target, to 0.5 %.
    assert reported >= plan.target_epsilon * (1 - EXAMPLES_EPSILON_SHARE) * 0.995


def test_the_ledger_composes_rounds_to_the_reported_job_epsilon(tmp_path: Path) -> None:
    plan = _plan(JOBS[1])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    policy = dataclasses.replace(POLICY, delta=plan.delta, max_delta_per_release=plan.delta)
    try:
        for r in range(plan.total_rounds):
            round_plan = dataclasses.replace(plan, round=r)
            ledger.charge(round_plan.charge, policy=policy, operation="train", details={})
        spent = ledger.status(policy).spent_epsilon
    finally:
        ledger.close()
    assert spent == pytest.approx(job_epsilon(plan, rounds=plan.total_rounds), rel=1e-9)
    assert spent == pytest.approx(
        _opacus_epsilon(plan, plan.total_rounds * plan.local_steps), rel=0.01
    )


def test_metrics_are_charged_on_top_of_the_job() -> None:
    base = _plan(JOBS[1])
    with_metrics = _plan(JOBS[1], metrics_epsilon=0.3)
    assert with_metrics.charge.epsilon == pytest.approx(base.charge.epsilon + 0.3)
    assert job_epsilon(with_metrics, rounds=5) > job_epsilon(base, rounds=5)


# ------------------------------------------------------------------ statistics


def test_poisson_batch_sizes_are_binomial() -> None:
    rng = np.random.default_rng(2024)
    n, rate, trials = 5_000, 0.03, 4_000
    sizes = np.array([poisson_sample(n, rate, rng).size for _ in range(trials)])
    mean, var = n * rate, n * rate * (1 - rate)
    z = (sizes.mean() - mean) / math.sqrt(var / trials)
    assert abs(z) <= 4.5
    # Variance: the sample variance of a binomial is close to normal at this size.
    var_se = math.sqrt(2 * var**2 / (trials - 1))
    assert abs(sizes.var(ddof=1) - var) <= 4.5 * var_se


def test_poisson_sampling_includes_each_record_with_probability_q() -> None:
    rng = np.random.default_rng(7)
    n, rate, trials = 200, 0.1, 5_000
    counts = np.zeros(n)
    for _ in range(trials):
        counts[poisson_sample(n, rate, rng)] += 1
    expected = trials * rate
    chi2 = float((((counts - expected) ** 2) / (expected * (1 - rate))).sum())
    assert stats.chi2.sf(chi2, df=n) > 1e-4


def test_gradient_noise_has_the_planned_scale() -> None:
    """With huge noise the update is noise: its spread must be sigma * C * lr / (q n_dp)."""
    data = synthetic_credit(jurisdiction="shenzhen", rows=4_000, seed=3)
    table = table_from_arrays(data, schema=CREDIT_SCHEMA)
    engine = TrainingEngine(table)
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", (64,))
    plan = dataclasses.replace(
        _plan(JOBS[1], spec=spec), local_steps=1, noise_multiplier=1e4, learning_rate=1.0
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0)
    deltas = []
    for seed in range(4):
        update = engine.train(plan, weights, rng=np.random.default_rng(seed))
        # The divisor is the round's released DP count, never the true n.
        step = plan.learning_rate / max(plan.sample_rate * update.noisy_examples, 1.0)
        for name, value in update.weights.items():
            deltas.append(((value - weights[name]) / step).astype(np.float64).ravel())
    noise = np.concatenate(deltas)
    sigma = plan.noise_multiplier * plan.clip_norm
    # The clipped gradient sum adds at most |batch| * C per coordinate; |batch| ~ q n = 180.
    signal = 400 * plan.clip_norm
    se = sigma / math.sqrt(2 * (noise.size - 1))
    assert abs(noise.std(ddof=1) - sigma) <= 4.5 * se + signal
    assert abs(noise.mean()) <= 4.5 * sigma / math.sqrt(noise.size) + signal
