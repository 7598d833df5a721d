"""Sample wire values shared by the unit tests (plain data, no fixtures)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

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


class NoNoise:
    """A ``federation.privacy.RandomSource`` whose draws make every integer noise 0.

    Geometric draws are all 1 (the discrete Laplace is their difference) and uniforms all
    0 (the discrete Gaussian accepts its zero proposal): exact execution, for tests that
    check what an engine computes. Nodes never use it.
    """

    def random(self, size: int) -> npt.NDArray[np.float64]:
        return np.zeros(size)

    def geometric(self, p: float, size: int) -> npt.NDArray[np.int64]:
        del p
        return np.ones(size, dtype=np.int64)

    def bytes(self, length: int) -> bytes:
        return bytes(length)
