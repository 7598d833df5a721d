"""Sample wire values shared by the unit tests (plain data, no fixtures)."""

from __future__ import annotations

import dataclasses
from typing import Any

from federation.queries import Mechanism
from federation.releases import BudgetStatus, NoiseInfo, Receipt
from federation.training import TrainResult

GAUSSIAN_NOISE = NoiseInfo(
    mechanism=Mechanism.GAUSSIAN, scale=3.0, sensitivity=1.0, granularity=0.0
)


def train_result(**changes: Any) -> TrainResult:
    """A node's TrainResult with plausible values; ``changes`` replace fields."""
    result = TrainResult(
        noisy_examples=1234.0,
        examples_noise=GAUSSIAN_NOISE,
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=5,
        cost_epsilon=0.3,
        cost_delta=1e-7,
        budget=BudgetStatus(10.0, 1e-6, 0.3, 9.7, 1, 2.0),
        receipt=Receipt(id="r1", node_name="hong-kong", consumer="c", issued_at=1.5),
        metrics=(),
        job_epsilon=0.3,
    )
    return dataclasses.replace(result, **changes)
