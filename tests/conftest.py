"""Shared fixtures: real node processes on loopback (never a mocked transport)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from federation.coordinator import Coordinator
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.local import LocalFederation

ROWS = 20_000
NODES = ("hong-kong", "shenzhen")


@pytest.fixture(scope="session")
def frames() -> dict[str, dict[str, np.ndarray]]:
    """The synthetic data each node of the shared federation holds (for true values)."""
    return {
        name: synthetic_credit(jurisdiction=name, rows=ROWS, seed=100 + i)
        for i, name in enumerate(NODES)
    }


@pytest.fixture(scope="session")
def local_fed(frames: dict[str, dict[str, np.ndarray]]) -> Iterator[LocalFederation]:
    """Two TLS nodes with a large budget, shared by tests that do not exhaust it."""
    local = LocalFederation.from_arrays(
        frames, schema=CREDIT_SCHEMA, epsilon=1000.0, max_epsilon_per_release=5.0
    )
    local.start()
    yield local
    local.stop()


@pytest.fixture
def fed(local_fed: LocalFederation) -> Coordinator:
    """The connected coordinator of the shared federation."""
    assert local_fed.coordinator is not None
    return local_fed.coordinator
