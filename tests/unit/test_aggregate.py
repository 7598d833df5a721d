"""Streamed aggregation and server optimizers (federation.coordinator._aggregate)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.coordinator._aggregate import TAU, RunningSum, ServerOptimizer
from federation.errors import InvalidRequestError

Arrays = dict[str, npt.NDArray[np.float32]]
SHAPES = {"w": (3, 4), "b": (4,)}


def _update(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _stream(total: RunningSum, update: Arrays, weight: float, *, chunk: int = 5) -> None:
    """Add ``update`` chunk by chunk, as NodeClient.train does."""
    contribution = total.contribution(weight)
    for name, array in update.items():
        flat = array.reshape(-1)
        for start in range(0, flat.size, chunk):
            contribution(name, start, flat[start : start + chunk])
    contribution.complete()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=1.0, max_value=1e6), min_size=1, max_size=5))
def test_streamed_sum_is_the_weighted_average(weights: list[float]) -> None:
    updates = [_update(i) for i in range(len(weights))]
    total = RunningSum(SHAPES)
    for update, weight in zip(updates, weights, strict=True):
        _stream(total, update, weight)
    average = total.average(_update(99))
    for name in SHAPES:
        expected = sum(
            w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True)
        )
        expected /= sum(weights)
        np.testing.assert_allclose(average[name], expected, rtol=1e-5, atol=1e-6)


def test_a_broken_stream_counts_only_where_its_chunks_arrived() -> None:
    total = RunningSum({"w": (10,)})
    ones = np.ones(10, dtype=np.float32)
    contribution = total.contribution(1.0)
    contribution("w", 0, ones[:4] * 3)  # then the stream breaks
    contribution.abandon()
    _stream(total, {"w": ones}, 3.0, chunk=10)
    assert total.has_partial
    average = total.average({"w": np.zeros(10, dtype=np.float32)})["w"]
    # First 4 coordinates: (1*3 + 3*1) / 4; the rest: the complete update alone.
    np.testing.assert_allclose(average[:4], 1.5)
    np.testing.assert_allclose(average[4:], 1.0)


def test_coordinates_nobody_reached_keep_the_global_value() -> None:
    total = RunningSum({"w": (4,)})
    contribution = total.contribution(2.0)
    contribution("w", 0, np.full(2, 8.0, dtype=np.float32))
    contribution.abandon()
    average = total.average({"w": np.full(4, -1.0, dtype=np.float32)})["w"]
    np.testing.assert_array_equal(average, [8.0, 8.0, -1.0, -1.0])


def test_reset_reuses_the_memory_for_the_next_round() -> None:
    total = RunningSum(SHAPES)
    _stream(total, _update(1), 2.0)
    buffers = {n: a.ctypes.data for n, a in total.sums.items()}
    total.reset()
    assert total.complete_weight == 0.0
    assert all(not a.any() for a in total.sums.values())
    assert {n: a.ctypes.data for n, a in total.sums.items()} == buffers


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 0.0, -1.0, 1e300])
def test_bad_weights_are_refused(weight: float) -> None:
    # 1e300 is finite as a Python float but inf as the float32 the sums are kept in.
    with pytest.raises(InvalidRequestError, match="weight"):
        RunningSum(SHAPES).contribution(weight)


def test_finite_updates_that_overflow_when_combined_are_refused_not_averaged() -> None:
    total = RunningSum(SHAPES)
    big = {n: np.full(s, 3e38, dtype=np.float32) for n, s in SHAPES.items()}
    _stream(total, big, 1.0)
    _stream(total, big, 1.0)  # 3e38 + 3e38 = inf in float32
    with pytest.raises(InvalidRequestError, match="not finite"):
        total.average({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})


# ---------------------------------------------------------------- server optimizers


def test_fedavg_with_unit_rate_takes_the_average() -> None:
    weights, average = _update(1), _update(2)
    ServerOptimizer("fedavg", SHAPES, lr=1.0).step(weights, average)
    for name in SHAPES:
        np.testing.assert_allclose(weights[name], average[name], rtol=1e-6)


def test_fedavg_moves_the_weights_by_the_server_rate() -> None:
    weights, average = _update(1), _update(2)
    expected = {n: w.astype(np.float64) + 0.3 * (average[n] - w) for n, w in weights.items()}
    ServerOptimizer("fedavg", SHAPES, lr=0.3).step(weights, average)
    for name in SHAPES:
        np.testing.assert_allclose(weights[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_steps_follow_reddi_et_al(name: str) -> None:
    """Two steps against a float64 transcription of Algorithm 2 (arXiv:2003.00295)."""
    optimizer = ServerOptimizer(name, SHAPES, lr=0.1)  # type: ignore[arg-type]
    weights = _update(1)
    x = {n: a.astype(np.float64) for n, a in weights.items()}
    m = {n: np.zeros(s) for n, s in SHAPES.items()}
    v = {n: np.full(s, TAU**2) for n, s in SHAPES.items()}
    for seed in (2, 3):
        average = _update(seed)
        optimizer.step(weights, average)
        for n in SHAPES:
            delta = average[n] - x[n]
            m[n] = 0.9 * m[n] + 0.1 * delta
            if name == "fedadam":
                v[n] = 0.99 * v[n] + 0.01 * delta**2
            else:
                v[n] = v[n] - 0.01 * delta**2 * np.sign(v[n] - delta**2)
            x[n] = x[n] + 0.1 * m[n] / (np.sqrt(v[n]) + TAU)
    for n in SHAPES:
        np.testing.assert_allclose(weights[n], x[n], rtol=1e-4, atol=1e-5)
    assert set(optimizer.state) == {"m/w", "m/b", "v/w", "v/b"}


@pytest.mark.parametrize(
    ("name", "lr", "far"),
    [("fedadam", 0.1, 1e20), ("fedyogi", 0.1, 1e20), ("fedavg", 3.0, 2e38)],
)
def test_a_step_float32_cannot_hold_is_refused_and_changes_nothing(
    name: str, lr: float, far: float
) -> None:
    """A finite average far from the weights: delta**2 (or lr * delta) overflows float32.

    Applied, FedAdam's v would stay infinite (those coordinates never move again), FedYogi's
    would turn NaN the round after, and FedAvg at lr > 1 would step to inf.
    """
    optimizer = ServerOptimizer(name, SHAPES, lr=lr)  # type: ignore[arg-type]
    weights = _update(1)
    optimizer.step(weights, _update(2))  # a normal round first: the moments are non-trivial
    before = {n: a.copy() for n, a in weights.items()}
    state = {n: a.copy() for n, a in optimizer.state.items()}
    average = {n: a.copy() for n, a in weights.items()}
    average["b"][-1] = np.float32(far)  # the last block of the last tensor: after others
    with pytest.raises(InvalidRequestError, match="'b' is not finite"):
        optimizer.step(weights, average)
    for n in SHAPES:
        np.testing.assert_array_equal(weights[n], before[n])
    for n, a in state.items():
        np.testing.assert_array_equal(optimizer.state[n], a)
    optimizer.step(weights, _update(3))  # the job goes on from the unchanged state
    assert all(np.isfinite(a).all() for a in (*weights.values(), *optimizer.state.values()))


@pytest.mark.parametrize("lr", [1.0, 0.5, 0.1])
def test_fedavg_up_to_unit_rate_stays_finite_however_far_the_average_is(lr: float) -> None:
    # avg - x overflows float32 here, so x + lr (avg - x) (torch's lerp) gave NaN or inf;
    # (1 - lr) x + lr avg is a convex combination of finite values.
    weights = {"w": np.array([3e38, -3e38, 1.0], np.float32)}
    average = {"w": np.array([-3e38, 3e38, 2.0], np.float32)}
    ServerOptimizer("fedavg", {"w": (3,)}, lr=lr).step(weights, average)
    expected = (1 - lr) * np.array([3e38, -3e38, 1.0]) + lr * np.array([-3e38, 3e38, 2.0])
    np.testing.assert_allclose(weights["w"], expected, rtol=1e-6)


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="fedavg, fedadam or fedyogi"):
        ServerOptimizer("sgd", SHAPES, lr=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": 1e39}, "server_lr must be a number > 0 and <= 1e"),  # inf in float32
        ({"lr": 0.0}, "server_lr must be"),
        ({"lr": 0.01, "tau": 1e-46}, "tau in"),  # 0 in float32: the first step is 0 / 0
        ({"lr": 0.01, "tau": 1e10}, "tau in"),
    ],
)
def test_server_settings_float32_cannot_step_with_are_refused_before_any_round(
    settings: dict[str, float], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        ServerOptimizer("fedadam", SHAPES, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_the_largest_settings_allowed_still_step_finitely_or_refuse(name: str) -> None:
    # At lr 1e6 and tau 1e-12 the cheap bound does not hold, so the step is checked whole.
    optimizer = ServerOptimizer(name, SHAPES, lr=1e6, tau=1e-12)  # type: ignore[arg-type]
    weights = _update(1)
    try:
        optimizer.step(weights, _update(2))
    except InvalidRequestError:
        assert all(np.array_equal(weights[n], _update(1)[n]) for n in SHAPES)
    else:
        assert all(np.isfinite(a).all() for a in (*weights.values(), *optimizer.state.values()))
