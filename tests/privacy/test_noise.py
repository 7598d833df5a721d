"""Statistical checks of the integer noise samplers against their exact laws.

Every check uses a fixed seed, so a run is deterministic; the false-alarm rates below are
what a correct sampler would fail with over a random seed:

- chi-square goodness of fit: alpha = 1e-3 per distribution (6 distributions);
- mean and variance: |z| <= 4.5 standard errors, two-sided alpha = 6.8e-6 each;
- empirical privacy ratio: one-sided 4.5 standard errors per outcome k (alpha = 3.4e-6),
  at most about 60 outcomes per mechanism, so below 3e-4 per mechanism.

Each check runs with numpy's generator and with the node's AES-128-CTR ``CryptoRandom``
(what nodes draw from). Power checks feed the same tests a sampler whose scale is a few
per cent off, or a mechanism whose epsilon is 1.5 times the claimed one, and assert that
they are caught.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from federation.privacy import (
    RandomSource,
    add_noise,
    laplace_charge,
    sample_discrete_gaussian,
    sample_discrete_laplace,
)
from nodes.noise import CryptoRandom

RNGS = [
    pytest.param(np.random.default_rng, id="numpy"),
    pytest.param(lambda seed: CryptoRandom(seed.to_bytes(16, "little")), id="aes-ctr"),
]
MakeRng = Callable[[int], RandomSource]

SAMPLES = 200_000
CHI_SQUARE_ALPHA = 1e-3
Z_LIMIT = 4.5
MIN_BIN_EXPECTED = SAMPLES / 200  # at most ~200 bins keeps the test powerful

Pmf = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]


def _laplace_pmf(scale: float) -> Pmf:
    """Exact pmf (1 - q) / (1 + q) * q**|x|, q = exp(-1/scale), on a window holding all but
    about 1e-15 of the mass."""
    q = math.exp(-1.0 / scale)
    half = math.ceil(36.0 * scale * math.log(10.0) / 1.0) + 5
    x = np.arange(-half, half + 1, dtype=np.int64)
    pmf = (1 - q) / (1 + q) * np.exp(-np.abs(x) / scale)
    return x, pmf


def _gaussian_pmf(sigma: float) -> Pmf:
    """Exact pmf exp(-x**2 / (2 sigma**2)) / Z, Z summed over a window of +-40 sigma."""
    half = math.ceil(40.0 * sigma) + 5
    x = np.arange(-half, half + 1, dtype=np.int64)
    weights = np.exp(-(x.astype(np.float64) ** 2) / (2 * sigma**2))
    return x, weights / weights.sum()


def _chi_square_pvalue(samples: npt.NDArray[np.int64], pmf: Pmf) -> float:
    """Chi-square p-value of samples against pmf.

    Neighbours are merged until each bin expects at least MIN_BIN_EXPECTED; the two
    outermost bins absorb everything beyond them.
    """
    x, p = pmf
    expected = p * samples.size
    edges: list[int] = []  # index where each bin starts
    running, is_open = 0.0, False
    for i, e in enumerate(expected):
        if not is_open:
            edges.append(i)
            running, is_open = 0.0, True
        running += e
        if running >= MIN_BIN_EXPECTED:
            is_open = False
    if is_open and len(edges) > 1:
        edges.pop()  # fold an underfull last bin into its neighbour
    starts = np.array(edges)
    bin_expected = np.add.reduceat(expected, starts)
    # Bin j holds values in [x[starts[j]], x[starts[j+1]]); outer bins are open-ended.
    bin_of = np.searchsorted(x[starts], samples, side="right") - 1
    observed = np.bincount(np.clip(bin_of, 0, len(starts) - 1), minlength=len(starts))
    bin_expected *= observed.sum() / bin_expected.sum()
    return float(stats.chisquare(observed, bin_expected).pvalue)


def _moments(pmf: Pmf) -> tuple[float, float, float]:
    """Exact mean, variance and fourth central moment."""
    x, p = pmf
    xf = x.astype(np.float64)
    mean = float(np.sum(p * xf))
    var = float(np.sum(p * (xf - mean) ** 2))
    fourth = float(np.sum(p * (xf - mean) ** 4))
    return mean, var, fourth


def _check_moments(samples: npt.NDArray[np.int64], pmf: Pmf) -> None:
    mean, var, fourth = _moments(pmf)
    n = samples.size
    sample_mean = float(samples.mean())
    sample_var = float(samples.astype(np.float64).var(ddof=1))
    assert abs(sample_mean - mean) <= Z_LIMIT * math.sqrt(var / n), (sample_mean, mean)
    var_se = math.sqrt((fourth - var**2) / n)
    assert abs(sample_var - var) <= Z_LIMIT * var_se, (sample_var, var, var_se)


Sampler = Callable[[float, RandomSource], npt.NDArray[np.int64]]


def _laplace(scale: float, rng: RandomSource) -> npt.NDArray[np.int64]:
    return sample_discrete_laplace(scale=scale, size=SAMPLES, rng=rng)


def _gaussian(sigma: float, rng: RandomSource) -> npt.NDArray[np.int64]:
    return sample_discrete_gaussian(sigma=sigma, size=SAMPLES, rng=rng)


CASES = [
    pytest.param(_laplace, _laplace_pmf, 0.5, id="laplace-0.5"),
    pytest.param(_laplace, _laplace_pmf, 3.0, id="laplace-3"),
    pytest.param(_laplace, _laplace_pmf, 1000.0, id="laplace-1000"),
    pytest.param(_gaussian, _gaussian_pmf, 0.8, id="gaussian-0.8"),
    pytest.param(_gaussian, _gaussian_pmf, 5.0, id="gaussian-5"),
    pytest.param(_gaussian, _gaussian_pmf, 2000.0, id="gaussian-2000"),
]


@pytest.mark.parametrize("make_rng", RNGS)
@pytest.mark.parametrize(("sampler", "exact", "scale"), CASES)
def test_sampler_matches_exact_law(
    sampler: Sampler, exact: Callable[[float], Pmf], scale: float, make_rng: MakeRng
) -> None:
    samples = sampler(scale, make_rng(20240601))
    assert samples.dtype == np.int64
    assert samples.shape == (SAMPLES,)
    pmf = exact(scale)
    assert _chi_square_pvalue(samples, pmf) >= CHI_SQUARE_ALPHA
    _check_moments(samples, pmf)


@pytest.mark.parametrize("make_rng", RNGS)
@pytest.mark.parametrize(("sampler", "exact", "scale"), CASES)
def test_checks_catch_a_three_percent_scale_error(
    sampler: Sampler, exact: Callable[[float], Pmf], scale: float, make_rng: MakeRng
) -> None:
    samples = sampler(scale * 1.03, make_rng(20240601))
    pmf = exact(scale)
    assert _chi_square_pvalue(samples, pmf) < CHI_SQUARE_ALPHA
    with pytest.raises(AssertionError):
        _check_moments(samples, pmf)


@pytest.mark.parametrize("make_rng", RNGS)
@pytest.mark.parametrize("scale", [0.1, 2.0**24])
def test_laplace_sampler_extreme_scales(scale: float, make_rng: MakeRng) -> None:
    samples = sample_discrete_laplace(scale=scale, size=SAMPLES, rng=make_rng(5))
    q = math.exp(-1.0 / scale)
    var = 2 * q / (-math.expm1(-1.0 / scale)) ** 2
    if scale < 1:
        # P(x != 0) = 2q / (1 + q), about 9e-5 here: a binomial count.
        expected = SAMPLES * 2 * q / (1 + q)
        assert abs(np.count_nonzero(samples) - expected) <= Z_LIMIT * math.sqrt(expected)
    else:
        # Var of the sample variance for a Laplace law is about (mu4 - var**2) / n = 5 var**2/n.
        sample_var = float(samples.astype(np.float64).var(ddof=1))
        assert abs(sample_var / var - 1) <= Z_LIMIT * math.sqrt(5.0 / SAMPLES)


def _privacy_log_ratios(
    epsilon: float,
    sensitivity: int,
    *,
    claimed_epsilon: float,
    seed: int,
    make_rng: MakeRng = np.random.default_rng,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Empirical log P[M(D) = k] / P[M(D') = k] and its standard error, on well-populated k.

    D and D' differ in one record; the query's true values are 0 and ``sensitivity``. The
    mechanism runs at ``epsilon``; ``claimed_epsilon`` only documents what is being tested.
    """
    del claimed_epsilon
    charge = laplace_charge(epsilon=epsilon, sensitivity=sensitivity)
    rng = make_rng(seed)
    on_d = add_noise(np.zeros(SAMPLES, dtype=np.int64), charge, rng=rng)
    on_d_prime = add_noise(np.full(SAMPLES, sensitivity, dtype=np.int64), charge, rng=rng)
    low = int(min(on_d.min(), on_d_prime.min()))
    count_d = np.bincount(on_d - low)
    count_d_prime = np.bincount(on_d_prime - low, minlength=count_d.size)
    count_d = np.pad(count_d, (0, count_d_prime.size - count_d.size))
    populated = (count_d >= 1000) & (count_d_prime >= 1000)
    n_d = count_d[populated].astype(np.float64)
    n_d_prime = count_d_prime[populated].astype(np.float64)
    return np.log(n_d / n_d_prime), np.sqrt(1 / n_d + 1 / n_d_prime)


@pytest.mark.parametrize("make_rng", RNGS)
@pytest.mark.parametrize(("epsilon", "sensitivity"), [(1.0, 1), (0.5, 3), (0.1, 1)])
def test_laplace_empirical_privacy_ratio_within_e_to_epsilon(
    epsilon: float, sensitivity: int, make_rng: MakeRng
) -> None:
    log_ratio, se = _privacy_log_ratios(
        epsilon, sensitivity, claimed_epsilon=epsilon, seed=11, make_rng=make_rng
    )
    assert log_ratio.size >= 6
    assert np.all(np.abs(log_ratio) <= epsilon + Z_LIMIT * se), np.max(np.abs(log_ratio) - se)
    # The bound is attained: away from the two means, the ratio is e**+-epsilon.
    assert np.max(np.abs(log_ratio)) >= epsilon - Z_LIMIT * float(np.max(se))


def test_privacy_ratio_check_catches_an_understated_epsilon() -> None:
    # The mechanism really runs at epsilon 1.5 but claims 1.0: the check must flag it.
    log_ratio, se = _privacy_log_ratios(1.5, 1, claimed_epsilon=1.0, seed=11)
    assert np.any(np.abs(log_ratio) > 1.0 + Z_LIMIT * se)
