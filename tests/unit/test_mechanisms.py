"""Calibration, validation and dispatch tests for federation.privacy.mechanisms."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from federation.errors import InvalidRequestError
from federation.privacy import (
    EXACT_SIGMA_MAX,
    ORDERS,
    Charge,
    add_noise,
    analytic_gaussian_sigma,
    discrete_gaussian_delta,
    gaussian_charge,
    gaussian_rdp,
    laplace_charge,
    noise_std,
    pure_dp_rdp,
    sample_discrete_gaussian,
    sample_discrete_laplace,
)


def _balle_wang_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Balle & Wang 2018 (arXiv:1805.06530) Thm. 8, written independently with scipy.stats."""
    a = sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    b = -sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    return float(stats.norm.cdf(a) - math.exp(epsilon) * stats.norm.cdf(b))


def _brute_force_discrete_delta(sigma: float, epsilon: float, sensitivity: int) -> float:
    """CKS 2020 (arXiv:2004.00010) Thm. 7 by direct summation of the normalised pmf."""
    half = int(60 * sigma) + 10 * sensitivity + 10
    x = np.arange(-half, half + 1)
    pmf = np.exp(-(x.astype(np.float64) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    threshold = epsilon * sigma**2 / sensitivity
    upper = pmf[x > threshold - sensitivity / 2].sum()
    lower = pmf[x > threshold + sensitivity / 2].sum()
    return float(upper - math.exp(epsilon) * lower)


def _zcdp_delta_epsilon(sigma: float, sensitivity: int, delta: float) -> float:
    """Best epsilon at delta from rho-zCDP over a dense grid of orders (CKS 2020, Cor. 13)."""
    rho = sensitivity**2 / (2 * sigma**2)
    alpha = 1 + np.logspace(-6, 9, 200_000)
    m = alpha - 1
    eps = alpha * rho + np.log(1 / delta) / m + np.log(m / alpha) - np.log(alpha) / m
    return float(eps.min())


@pytest.mark.parametrize(
    ("epsilon", "delta", "sensitivity"),
    [(0.1, 1e-5, 1.0), (0.5, 1e-8, 3.0), (1.0, 1e-6, 1.0), (4.0, 1e-3, 10.0), (20.0, 1e-9, 1.0)],
)
def test_analytic_sigma_hits_the_target_delta(
    epsilon: float, delta: float, sensitivity: float
) -> None:
    sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    achieved = _balle_wang_delta(sigma, epsilon, sensitivity)
    assert achieved == pytest.approx(delta, rel=1e-9)
    # A slightly smaller sigma must miss the target: sigma is (nearly) the smallest.
    assert _balle_wang_delta(sigma * (1 - 1e-6), epsilon, sensitivity) > delta


@pytest.mark.parametrize(("epsilon", "delta"), [(0.05, 1e-5), (0.5, 1e-6), (0.99, 1e-10)])
def test_analytic_sigma_beats_the_classical_bound(epsilon: float, delta: float) -> None:
    classical = math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    assert analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=1.0) < classical


@pytest.mark.parametrize(
    ("sigma", "epsilon", "sensitivity"),
    [(0.5, 1.0, 1), (0.8, 2.0, 1), (2.0, 0.5, 1), (5.0, 1.0, 3), (13.7, 0.2, 2), (40.0, 0.1, 7)],
)
def test_discrete_delta_matches_brute_force(sigma: float, epsilon: float, sensitivity: int) -> None:
    brute = _brute_force_discrete_delta(sigma, epsilon, sensitivity)
    ours = discrete_gaussian_delta(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity)
    assert ours >= brute * (1 - 1e-12)  # an upper bound, up to float error in the brute force
    assert ours == pytest.approx(brute, rel=1e-8)


def test_discrete_delta_approaches_continuous_for_large_sigma() -> None:
    sigma = analytic_gaussian_sigma(epsilon=0.5, delta=1e-6, sensitivity=100.0)
    discrete = discrete_gaussian_delta(sigma=sigma, epsilon=0.5, sensitivity=100)
    assert discrete == pytest.approx(1e-6, rel=1e-4)


@pytest.mark.parametrize(
    ("epsilon", "delta", "sensitivity"),
    [(1.0, 1e-5, 1), (0.1, 1e-10, 1), (5.0, 1e-5, 1), (0.5, 1e-6, 64), (2.0, 1e-3, 1)],
)
def test_gaussian_charge_exact_path_meets_delta(
    epsilon: float, delta: float, sensitivity: int
) -> None:
    charge = gaussian_charge(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    sigma = charge.noise_scale
    assert sigma <= EXACT_SIGMA_MAX
    assert discrete_gaussian_delta(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity) <= delta
    assert _brute_force_discrete_delta(sigma, epsilon, sensitivity) <= delta
    # Calibration is tight: a sigma 1e-6 smaller either misses the target or is below the
    # continuous Gaussian's sigma (which the discrete path never undercuts).
    sigma0 = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    smaller = sigma * (1 - 1e-6)
    assert smaller < sigma0 or _brute_force_discrete_delta(smaller, epsilon, sensitivity) > delta
    assert charge.mechanism == "discrete_gaussian"
    assert (charge.epsilon, charge.delta, charge.sensitivity) == (epsilon, delta, sensitivity)
    assert charge.rdp == gaussian_rdp(sigma=sigma, sensitivity=float(sensitivity))


@pytest.mark.parametrize(
    ("epsilon", "delta", "sensitivity"), [(1.0, 1e-5, 30_000), (0.01, 1e-6, 1_000)]
)
def test_gaussian_charge_zcdp_path_for_large_sigma(
    epsilon: float, delta: float, sensitivity: int
) -> None:
    charge = gaussian_charge(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    sigma = charge.noise_scale
    assert sigma > EXACT_SIGMA_MAX
    # The grid minimum sits a hair above the true minimum over orders (grid resolution).
    assert _zcdp_delta_epsilon(sigma, sensitivity, delta) <= epsilon * (1 + 1e-8)
    assert _zcdp_delta_epsilon(sigma * (1 - 1e-6), sensitivity, delta) > epsilon
    sigma0 = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    assert sigma0 < sigma < 1.3 * sigma0


def test_gaussian_calibration_is_cached() -> None:
    first = gaussian_charge(epsilon=0.77, delta=1e-7, sensitivity=5)
    assert gaussian_charge(epsilon=0.77, delta=1e-7, sensitivity=5) == first


def test_laplace_charge_describes_pure_dp() -> None:
    charge = laplace_charge(epsilon=0.5, sensitivity=3)
    assert charge.mechanism == "discrete_laplace"
    assert (charge.epsilon, charge.delta) == (0.5, 0.0)
    assert charge.noise_scale == 6.0
    assert charge.sensitivity == 3.0
    assert charge.rdp == pure_dp_rdp(epsilon=0.5)


def test_noise_std_known_values() -> None:
    q = math.exp(-1 / 4.0)
    laplace = laplace_charge(epsilon=0.25, sensitivity=1)
    assert noise_std(laplace) == pytest.approx(math.sqrt(2 * q) / (1 - q), rel=1e-12)
    assert noise_std(laplace) < math.sqrt(2) * 4.0  # a bit below the continuous sqrt(2) t
    gauss = gaussian_charge(epsilon=1.0, delta=1e-5, sensitivity=1)
    assert noise_std(gauss) == gauss.noise_scale


def test_samplers_are_reproducible_and_integer() -> None:
    for sampler in (sample_discrete_laplace, sample_discrete_gaussian):
        kwargs = {"size": 1000}
        first = _draw(sampler, 7, **kwargs)
        again = _draw(sampler, 7, **kwargs)
        assert first.dtype == np.int64
        assert first.shape == (1000,)
        np.testing.assert_array_equal(first, again)
        assert _draw(sampler, 7, size=0).shape == (0,)


def _draw(sampler: Callable[..., np.ndarray], seed: int, *, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if sampler is sample_discrete_laplace:
        return sample_discrete_laplace(scale=2.5, size=size, rng=rng)
    return sample_discrete_gaussian(sigma=2.5, size=size, rng=rng)


def test_add_noise_keeps_shape_and_shifts_values() -> None:
    values = np.arange(12, dtype=np.int64).reshape(3, 4)
    charge = laplace_charge(epsilon=30.0, sensitivity=1)  # P(noise != 0) = 2e-13
    noisy = add_noise(values, charge, rng=np.random.default_rng(0))
    assert noisy.dtype == np.int64
    np.testing.assert_array_equal(noisy, values)
    gauss = gaussian_charge(epsilon=1.0, delta=1e-6, sensitivity=1)
    noisy = add_noise(values, gauss, rng=np.random.default_rng(0))
    assert noisy.shape == values.shape
    assert not np.array_equal(noisy, values)


def test_add_noise_rejects_unknown_mechanism_and_float_values() -> None:
    charge = Charge(mechanism="dp_sgd", epsilon=1.0, delta=1e-5, rdp=(0.0,) * len(ORDERS))
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidRequestError, match="dp_sgd"):
        add_noise(np.zeros(3, dtype=np.int64), charge, rng=rng)
    with pytest.raises(InvalidRequestError, match="dp_sgd"):
        noise_std(charge)
    with pytest.raises(InvalidRequestError, match="dtype"):
        add_noise(
            np.zeros(3, dtype=np.float64),
            laplace_charge(epsilon=1.0, sensitivity=1),
            rng=rng,
        )


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: laplace_charge(epsilon=0.0, sensitivity=1), "epsilon must be .* got 0.0"),
        (lambda: laplace_charge(epsilon=math.inf, sensitivity=1), "epsilon .* got inf"),
        (lambda: laplace_charge(epsilon=1.0, sensitivity=0), "sensitivity .* got 0"),
        (lambda: laplace_charge(epsilon=1.0, sensitivity=1.5), "sensitivity .* 1.5"),  # type: ignore[arg-type]
        (lambda: laplace_charge(epsilon=1.0, sensitivity=True), "sensitivity .* got True"),
        (lambda: gaussian_charge(epsilon=1.0, delta=0.0, sensitivity=1), "delta .* got 0.0"),
        (lambda: gaussian_charge(epsilon=1.0, delta=1.0, sensitivity=1), "delta .* got 1.0"),
        (lambda: gaussian_charge(epsilon=-1.0, delta=1e-5, sensitivity=1), "epsilon .* -1.0"),
        (lambda: gaussian_charge(epsilon=1.0, delta=1e-5, sensitivity=-2), "sensitivity .* -2"),
        (
            lambda: analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=0.0),
            "sensitivity .* 0.0",
        ),
        (
            lambda: discrete_gaussian_delta(sigma=0.0, epsilon=1.0, sensitivity=1),
            "sigma .* 0.0",
        ),
        (
            lambda: discrete_gaussian_delta(sigma=2.0**17, epsilon=1.0, sensitivity=1),
            "sigma must be <=",
        ),
        (lambda: sample_discrete_laplace(scale=-1.0, size=3, rng=_RNG), "scale .* -1.0"),
        (lambda: sample_discrete_laplace(scale=1.0, size=-3, rng=_RNG), "size .* -3"),
        (lambda: sample_discrete_gaussian(sigma=math.nan, size=3, rng=_RNG), "sigma .* nan"),
    ],
)
def test_invalid_mechanism_inputs_raise(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        call()


# ------------------------------------------------------------------ review regressions


@pytest.mark.parametrize("epsilon", [1e-20, 1e-200])
def test_an_epsilon_so_small_the_sampler_would_saturate_is_refused(epsilon: float) -> None:
    # numpy's geometric draw saturates at 2**63 - 1 past a scale of about 1e17, so two
    # saturated draws cancel and the "noisy" value came back exact.
    with pytest.raises(InvalidRequestError, match="noise scale would be"):
        laplace_charge(epsilon=epsilon, sensitivity=2**20)
    with pytest.raises(InvalidRequestError):
        sample_discrete_laplace(scale=1e19, size=4, rng=np.random.default_rng(0))


@pytest.mark.parametrize(("epsilon", "delta"), [(1e-300, 1e-20), (1e-30, 1e-30)])
def test_gaussian_too_small_to_calibrate_is_invalid_not_internal(
    epsilon: float, delta: float
) -> None:
    with pytest.raises(InvalidRequestError, match="too small"):
        gaussian_charge(epsilon=epsilon, delta=delta, sensitivity=1)


@pytest.mark.parametrize(
    ("epsilon", "delta"),
    [(0.5, 1e-310), (1.0, 5e-324), (1e-310, 1e-6), (5e-324, 0.5), (1e-306, 1e-7)],
)
def test_calibration_near_the_smallest_floats_is_refused_not_endless(
    epsilon: float, delta: float
) -> None:
    # The search for sigma looped forever (1.25 / delta or 1 / epsilon overflowed to inf,
    # and inf / 2 == inf), holding a node's worker thread, or brentq gave up (RuntimeError).
    with pytest.raises(InvalidRequestError, match="too small to calibrate"):
        gaussian_charge(epsilon=epsilon, delta=delta, sensitivity=1)
    with pytest.raises(InvalidRequestError, match="too small to calibrate"):
        analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=1.0)


def test_smallest_accepted_laplace_still_adds_noise() -> None:
    charge = laplace_charge(epsilon=1e-6, sensitivity=2**20)
    noisy = add_noise(np.full(64, 5, dtype=np.int64), charge, rng=np.random.default_rng(1))
    assert np.count_nonzero(noisy != 5) == 64


def test_an_epsilon_so_large_the_noise_rounds_to_zero_is_refused() -> None:
    # Past epsilon / sensitivity ~ 36.7, 1 - exp(-1/scale) is 1.0 in float64: every
    # geometric draw is 1 and the "DP" release is exact. Refused before any charge.
    assert laplace_charge(epsilon=32.0, sensitivity=1).noise_scale == 1 / 32
    with pytest.raises(InvalidRequestError, match="would round to exactly 0"):
        laplace_charge(epsilon=40.0, sensitivity=1)
    with pytest.raises(InvalidRequestError, match="would round to exactly 0"):
        gaussian_charge(epsilon=2000.0, delta=1e-6, sensitivity=1)
