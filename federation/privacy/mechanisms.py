"""Integer-valued noise mechanisms: the discrete Laplace and the discrete Gaussian.

Noise is always an integer. The caller maps its query onto an integer grid (multiplying by
a power-of-two granularity itself), so a release never exposes the low-order bits of a
floating-point sample (Mironov 2012, "On Significance of the Least Significant Bits for
Differential Privacy", CCS). Each mechanism is described by a ``Charge`` built first
(``laplace_charge`` / ``gaussian_charge``); ``add_noise`` then draws noise for that charge.

Sources:
    CKS 2020: Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy",
    arXiv:2004.00010.
    Balle & Wang 2018: "Improving the Gaussian Mechanism for Differential Privacy:
    Analytical Calibration and Optimal Denoising", arXiv:1805.06530.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import optimize, special

from federation.errors import InvalidRequestError
from federation.privacy.accounting import Charge, gaussian_rdp, pure_dp_rdp

__all__ = [
    "DISCRETE_GAUSSIAN",
    "DISCRETE_LAPLACE",
    "EXACT_SIGMA_MAX",
    "RandomSource",
    "add_noise",
    "analytic_gaussian_sigma",
    "discrete_gaussian_delta",
    "gaussian_charge",
    "laplace_charge",
    "noise_std",
    "sample_discrete_gaussian",
    "sample_discrete_laplace",
]


class RandomSource(Protocol):
    """The draws the samplers make: ``numpy.random.Generator`` has them, and so does a node's
    ``nodes.noise.CryptoRandom`` (AES-128-CTR), which is what nodes use."""

    def random(self, size: int) -> npt.NDArray[np.float64]:
        """``size`` uniform floats in [0, 1)."""
        ...

    def geometric(self, p: float, size: int) -> npt.NDArray[np.int64]:
        """``size`` trial counts up to the first success (support 1, 2, ...)."""
        ...

    def bytes(self, length: int) -> bytes:
        """``length`` uniform bytes."""
        ...


DISCRETE_LAPLACE = "discrete_laplace"
DISCRETE_GAUSSIAN = "discrete_gaussian"

EXACT_SIGMA_MAX = 2.0**16
"""Largest sigma for which the discrete Gaussian's exact delta is summed (O(sigma) terms)."""

# Summation window: terms past sqrt(c**2 + 2 * _WINDOW_NATS * sigma**2) are below e**-60 of
# the first one and are covered by a rigorous integral bound instead of being summed.
_WINDOW_NATS = 60.0
# Relative slack on every computed delta (and zCDP epsilon), far above float64 rounding
# error, so rounding can only overstate the privacy cost (fail closed).
_FLOAT_SLACK = 1e-10
# Below this sigma the normaliser is summed; above it sigma*sqrt(2 pi) is a lower bound
# that is tight to a relative 2*exp(-2 pi**2 sigma**2) < 1e-130 (Poisson summation).
_SUM_NORMALISER_BELOW = 4.0
_BISECTION_RELATIVE = 1e-9


def _check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, bool) or not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidRequestError(f"epsilon must be finite and > 0; got {epsilon!r}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not (math.isfinite(delta) and 0 < delta < 1):
        raise InvalidRequestError(f"delta must satisfy 0 < delta < 1; got {delta!r}")


def _check_sensitivity(sensitivity: int) -> None:
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, int) or sensitivity < 1:
        raise InvalidRequestError(
            f"sensitivity must be an integer >= 1 (in grid units); got {sensitivity!r}"
        )


def _check_scale(value: float, *, name: str) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise InvalidRequestError(f"{name} must be finite and > 0; got {value!r}")


# numpy's geometric sampler saturates at 2**63 - 1 for scales past about 1e17, and the
# difference of two saturated draws is 0: noise would vanish exactly when epsilon is tiny.
# Fail closed far below that (draws beyond 2**62 then have probability < exp(-2**22)).
MAX_NOISE_SCALE = 2.0**40
# And below 1/32 (epsilon above 32 per unit of sensitivity) refuse too: at a Laplace scale
# under 1/36.7, p = 1 - exp(-1/scale) rounds to 1 and the noise is exactly 0 (an exact
# release charged as epsilon-DP); a Gaussian's exp(-1/(2 sigma**2)) underflows near sigma
# = 0.026. At 1/32 the noise is still there, but float sampling truncates every scale's
# tail near 37 scales (here at |x| <= 1; P(beyond) ~ e**-37), as numpy's sampler does.
MIN_NOISE_SCALE = 1.0 / 32.0


def _check_noise_scale(scale: float, *, what: str) -> None:
    if not scale <= MAX_NOISE_SCALE:
        raise InvalidRequestError(
            f"{what}: the noise scale would be {scale:.3g}, above the sampler's limit of "
            f"{MAX_NOISE_SCALE:.3g}; ask for a larger epsilon"
        )
    if not scale >= MIN_NOISE_SCALE:
        raise InvalidRequestError(
            f"{what}: the noise scale would be {scale:.3g}, below the sampler's limit of "
            f"{MIN_NOISE_SCALE:.3g} (the noise would round to exactly 0); ask for a smaller "
            "epsilon"
        )


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequestError(f"size must be an integer >= 0; got {size!r}")


# --- discrete Laplace -------------------------------------------------------------------


def laplace_charge(*, epsilon: float, sensitivity: int) -> Charge:
    """Describe a discrete Laplace release with scale t = sensitivity / epsilon.

    Guarantee: epsilon-DP (delta = 0) for an integer-valued query whose value changes by at
    most ``sensitivity`` when one record is added or removed. The noise has
    P(x) proportional to exp(-|x| / t) on the integers (the discrete Laplace of CKS 2020,
    arXiv:2004.00010, Def. 2 / Sec. 2.2); for any output k and shift |s| <= sensitivity,
    P(k) / P(k - s) <= exp(|s| / t) <= exp(epsilon) by the triangle inequality, which is
    epsilon-DP (Dwork & Roth 2014, Thm. 3.6, on the integer grid).
    The RDP curve is ``pure_dp_rdp(epsilon)``.

    Args:
        epsilon: Privacy parameter, finite and > 0.
        sensitivity: L1 sensitivity in integer grid units, >= 1.

    Raises:
        InvalidRequestError: An argument is out of range.

    >>> laplace_charge(epsilon=0.5, sensitivity=2).noise_scale
    4.0
    """
    _check_epsilon(epsilon)
    _check_sensitivity(sensitivity)
    _check_noise_scale(sensitivity / epsilon, what=f"epsilon {epsilon:g}")
    return Charge(
        mechanism=DISCRETE_LAPLACE,
        epsilon=epsilon,
        delta=0.0,
        rdp=pure_dp_rdp(epsilon=epsilon),
        sensitivity=float(sensitivity),
        noise_scale=sensitivity / epsilon,
    )


def sample_discrete_laplace(*, scale: float, size: int, rng: RandomSource) -> npt.NDArray[np.int64]:
    """Draw ``size`` samples with P(x) proportional to exp(-|x| / scale), x an integer.

    The difference of two iid geometric variables on {0, 1, ...} with ratio exp(-1/scale)
    (CKS 2020, arXiv:2004.00010, Sec. 5). The geometric is drawn in float64 (numpy's
    search or inversion; ``CryptoRandom``'s inversion), so the law is exact up to float
    rounding; the output is an integer.

    Raises:
        InvalidRequestError: ``scale`` is not finite and > 0 or ``size`` < 0.
    """
    _check_scale(scale, name="scale")
    _check_noise_scale(scale, what="discrete Laplace")
    _check_size(size)
    # p = 1 - exp(-1/scale), via expm1 so that p stays accurate for scale up to 2**24 and more.
    p = -math.expm1(-1.0 / scale)
    # Generator.geometric counts trials up to the first success (support 1, 2, ...): the
    # two offsets of 1 cancel in the difference.
    first = rng.geometric(p, size=size).astype(np.int64)
    second = rng.geometric(p, size=size).astype(np.int64)
    return first - second


def _laplace_variance(scale: float) -> float:
    q = math.exp(-1.0 / scale)
    return 2.0 * q / (-math.expm1(-1.0 / scale)) ** 2


# --- discrete Gaussian: calibration -----------------------------------------------------


def _continuous_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta(epsilon) of the continuous Gaussian mechanism (Balle & Wang 2018, Thm. 8)."""
    a = sensitivity / (2.0 * sigma) - epsilon * sigma / sensitivity
    b = -sensitivity / (2.0 * sigma) - epsilon * sigma / sensitivity
    # e**epsilon * Phi(b) in log space: e**epsilon alone overflows for large epsilon.
    return float(special.ndtr(a) - math.exp(epsilon + float(special.log_ndtr(b))))


def analytic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Return the smallest sigma for which the Gaussian mechanism is (epsilon, delta)-DP.

    Solves Balle & Wang 2018 (arXiv:1805.06530) Thm. 8, the exact privacy profile
    delta(epsilon) = Phi(D/(2s) - eps*s/D) - e**eps * Phi(-D/(2s) - eps*s/D), for s by
    Brent's method (their Alg. 1 solves the same equation), then rounds sigma up until the
    profile is <= delta. Valid for every epsilon > 0, unlike the classical
    sqrt(2 ln(1.25/delta)) * D / eps (Dwork & Roth 2014, Thm. A.1), which needs eps < 1.
    Neighbouring: any relation under which the query's L2 sensitivity is D.

    Args:
        epsilon: Finite and > 0.
        delta: ``0 < delta < 1``.
        sensitivity: L2 sensitivity D, finite and > 0.

    Raises:
        InvalidRequestError: An argument is out of range.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_scale(sensitivity, name="sensitivity")
    return _analytic_sigma(epsilon, delta, float(sensitivity))


# Doubling or halving sigma across the whole float range takes about 2,100 steps.
_MAX_BRACKET_STEPS = 2_200


def _uncalibratable(epsilon: float, delta: float) -> InvalidRequestError:
    return InvalidRequestError(
        f"epsilon {epsilon:g} with delta {delta:g} is too small to calibrate; ask for more"
    )


@functools.lru_cache(maxsize=1024)
def _analytic_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Raises InvalidRequestError where floats cannot bracket or solve for sigma (an
    epsilon or delta within a few powers of two of the smallest float)."""
    try:
        sigma = _solve_analytic_sigma(epsilon, delta, sensitivity)
    except (OverflowError, ZeroDivisionError, ValueError, RuntimeError) as err:
        # RuntimeError: brentq did not converge in 500 iterations.
        raise _uncalibratable(epsilon, delta) from err
    if sigma is None:
        raise _uncalibratable(epsilon, delta)
    return sigma


def _solve_analytic_sigma(epsilon: float, delta: float, sensitivity: float) -> float | None:
    """sigma, or None where a search runs out of steps (an infinite or NaN sigma)."""

    def excess(sigma: float) -> float:
        return _continuous_delta(sigma, epsilon, sensitivity) - delta

    high = sensitivity * max(1.0, math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon)
    if not math.isfinite(high):
        return None
    # Every loop is bounded: from an infinite or NaN sigma, doubling or halving never ends.
    for _ in range(_MAX_BRACKET_STEPS):
        if excess(high) <= 0:
            break
        high *= 2.0
    else:
        return None
    low = high / 2.0
    for _ in range(_MAX_BRACKET_STEPS):
        if excess(low) > 0:
            break
        low /= 2.0
    else:
        return None
    sigma = float(optimize.brentq(excess, low, high, xtol=1e-300, rtol=1e-15, maxiter=500))
    for _ in range(_MAX_BRACKET_STEPS):
        if excess(sigma) <= 0:  # brentq may land a hair on the wrong side of the root
            return sigma
        sigma = math.nextafter(sigma, math.inf)
    return None


def discrete_gaussian_delta(*, sigma: float, epsilon: float, sensitivity: int) -> float:
    """Return an upper bound on the exact delta(epsilon) of the discrete Gaussian mechanism.

    CKS 2020 (arXiv:2004.00010) Thm. 7: adding N_Z(0, sigma**2) to an integer query of
    sensitivity D is (epsilon, delta)-DP with delta = P[X > eps*s**2/D - D/2] -
    e**eps * P[X > eps*s**2/D + D/2], X ~ N_Z(0, s**2), and no smaller delta works.
    This is summed as the hockey-stick divergence sum over y > c = eps*s**2/D - D/2 of
    p(y) * (1 - exp(eps - (2yD + D**2) / (2 s**2))), a sum of positive terms (no
    cancellation). Terms far in the tail are replaced by the integral bound
    sum_{y > Y} exp(-y**2/(2 s**2)) <= s*sqrt(pi/2)*erfc(Y/(s*sqrt 2)), the normaliser by a
    lower bound, and a relative slack of 1e-10 is added, so the result never understates
    delta. Cost is O(sigma) terms, hence the limit ``EXACT_SIGMA_MAX``.

    Args:
        sigma: The discrete Gaussian's sigma parameter, ``0 < sigma <= EXACT_SIGMA_MAX``.
        epsilon: Finite and > 0.
        sensitivity: Integer sensitivity D >= 1.

    Raises:
        InvalidRequestError: An argument is out of range.
    """
    _check_scale(sigma, name="sigma")
    if sigma > EXACT_SIGMA_MAX:
        raise InvalidRequestError(
            f"sigma must be <= {EXACT_SIGMA_MAX} for exact delta sums; got {sigma!r}"
        )
    _check_epsilon(epsilon)
    _check_sensitivity(sensitivity)
    return _discrete_delta(sigma, epsilon, sensitivity)


def _discrete_normaliser_lower(sigma: float) -> float:
    """Return a lower bound on sum over all integers x of exp(-x**2 / (2 sigma**2))."""
    if sigma >= _SUM_NORMALISER_BELOW:
        # Poisson summation: the sum is sigma*sqrt(2 pi) * (1 + 2 sum_k exp(-2 pi^2 s^2 k^2)).
        return sigma * math.sqrt(2.0 * math.pi)
    half = math.ceil(40.0 * sigma) + 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    return float(np.sum(np.exp(-0.5 * (x / sigma) ** 2)))


def _discrete_delta(sigma: float, epsilon: float, sensitivity: int) -> float:
    d = float(sensitivity)
    c = epsilon * sigma**2 / d - d / 2.0
    start = math.floor(c) + 1
    stop = math.ceil(math.sqrt(max(c, 0.0) ** 2 + 2.0 * _WINDOW_NATS * sigma**2)) + 1
    # Every term is at most its weight exp(-y**2 / (2 sigma**2)), so terms outside
    # [-stop, stop] are bounded by the Gaussian integral beyond stop on each side.
    tail = sigma * math.sqrt(math.pi / 2.0) * math.erfc(stop / (sigma * math.sqrt(2.0)))
    tails = tail
    if start < -stop:
        start = -stop
        tails += tail
    y = np.arange(start, max(start, stop) + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (y / sigma) ** 2)
    factors = -np.expm1(epsilon - (2.0 * y * d + d * d) / (2.0 * sigma**2))
    head = float(np.sum(weights * np.maximum(factors, 0.0)))
    return min(1.0, (head + tails) / _discrete_normaliser_lower(sigma) * (1.0 + _FLOAT_SLACK))


def _zcdp_epsilon(rho: float, delta: float) -> float:
    """Return an epsilon bound at delta for rho-zCDP, optimising the order continuously.

    CKS 2020 (arXiv:2004.00010) Cor. 13 (the same conversion as Balle et al. 2020,
    arXiv:1905.09982, Thm. 21): for every alpha > 1, rho-zCDP implies (eps, delta)-DP with
    eps = alpha*rho + log(1/delta)/(alpha-1) + log(1 - 1/alpha) - log(alpha)/(alpha-1).
    Any alpha gives a valid bound, so an approximate optimiser is safe.
    """

    def bound(log_m: float) -> float:
        m = math.exp(log_m)  # m = alpha - 1
        alpha = 1.0 + m
        return alpha * rho + math.log(1.0 / delta) / m + math.log(m / alpha) - math.log(alpha) / m

    best = optimize.minimize_scalar(bound, bounds=(-20.0, 40.0), method="bounded")
    return float(bound(float(best.x)))


def _zcdp_sigma(epsilon: float, delta: float, sensitivity: int) -> float:
    """Smallest sigma (to 1e-9 relative) whose zCDP curve converts to <= epsilon at delta."""

    def epsilon_at(sigma: float) -> float:
        # Slack so float error in the bound's evaluation can only add noise.
        return _zcdp_epsilon(sensitivity**2 / (2.0 * sigma**2), delta) * (1.0 + _FLOAT_SLACK)

    low = _analytic_sigma(epsilon, delta, float(sensitivity))  # zCDP is never tighter
    high = low * 2.0
    while epsilon_at(high) > epsilon:
        low, high = high, high * 2.0
    while high - low > _BISECTION_RELATIVE * high:
        mid = 0.5 * (low + high)
        if epsilon_at(mid) <= epsilon:
            high = mid
        else:
            low = mid
    return high


@functools.lru_cache(maxsize=1024)
def _gaussian_sigma(epsilon: float, delta: float, sensitivity: int) -> float:
    """Calibrate the discrete Gaussian's sigma; see ``gaussian_charge`` for the two paths."""
    sigma0 = _analytic_sigma(epsilon, delta, float(sensitivity))
    if sigma0 > EXACT_SIGMA_MAX:
        return _zcdp_sigma(epsilon, delta, sensitivity)
    if _discrete_delta(sigma0, epsilon, sensitivity) <= delta:
        return sigma0
    low, gap = sigma0, sigma0 * 2.0**-20
    high = sigma0 + gap
    while _discrete_delta(high, epsilon, sensitivity) > delta:
        low, gap = high, gap * 2.0
        high = low + gap
        if high > EXACT_SIGMA_MAX:
            return _zcdp_sigma(epsilon, delta, sensitivity)
    while high - low > _BISECTION_RELATIVE * high:
        mid = 0.5 * (low + high)
        if _discrete_delta(mid, epsilon, sensitivity) <= delta:
            high = mid
        else:
            low = mid
    return high


def gaussian_charge(*, epsilon: float, delta: float, sensitivity: int) -> Charge:
    """Describe a discrete Gaussian release N_Z(0, sigma**2) calibrated to (epsilon, delta).

    Guarantee: (epsilon, delta)-DP for an integer-valued query whose value changes by at
    most ``sensitivity`` when one record is added or removed. sigma is calibrated as follows:

    1. sigma0 = ``analytic_gaussian_sigma`` (Balle & Wang 2018, arXiv:1805.06530, Thm. 8).
    2. If sigma0 <= ``EXACT_SIGMA_MAX`` (2**16): the discrete Gaussian's own exact delta
       (CKS 2020, arXiv:2004.00010, Thm. 7, ``discrete_gaussian_delta``) is checked at
       sigma0 and, if above target, sigma is raised by bisection (to 1e-9 relative, keeping
       the side that satisfies the target) until it is <= ``delta``.
    3. Otherwise (or if step 2 would pass the limit): the discrete Gaussian is
       (D**2 / (2 sigma**2))-zCDP (CKS 2020, Thm. 4), and sigma is the smallest (to 1e-9
       relative) whose zCDP curve converts to <= epsilon at delta (CKS 2020, Cor. 13, with
       the order optimised continuously). Rigorous, a few per cent more noise than step 2.

    Results are cached. The charge's epsilon and delta are the requested ones; its RDP
    curve is ``gaussian_rdp(sigma, sensitivity)``.

    Args:
        epsilon: Finite and > 0.
        delta: ``0 < delta < 1``.
        sensitivity: L2 (= L1 for a scalar) sensitivity in integer grid units, >= 1.

    Raises:
        InvalidRequestError: An argument is out of range.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_sensitivity(sensitivity)
    try:
        sigma = _gaussian_sigma(float(epsilon), float(delta), sensitivity)
    except (OverflowError, ZeroDivisionError, ValueError) as err:
        raise _uncalibratable(epsilon, delta) from err
    _check_noise_scale(sigma, what=f"epsilon {epsilon:g}, delta {delta:g}")
    return Charge(
        mechanism=DISCRETE_GAUSSIAN,
        epsilon=epsilon,
        delta=delta,
        rdp=gaussian_rdp(sigma=sigma, sensitivity=float(sensitivity)),
        sensitivity=float(sensitivity),
        noise_scale=sigma,
    )


# --- discrete Gaussian: sampling --------------------------------------------------------


def sample_discrete_gaussian(
    *, sigma: float, size: int, rng: RandomSource
) -> npt.NDArray[np.int64]:
    """Draw ``size`` samples with P(x) proportional to exp(-x**2 / (2 sigma**2)), x an integer.

    CKS 2020 (arXiv:2004.00010) Alg. 3, vectorised: propose Y from the discrete Laplace
    with t = floor(sigma) + 1 and accept with probability
    exp(-(|Y| - sigma**2/t)**2 / (2 sigma**2)); batches are drawn until ``size`` are
    accepted. Accept/reject decisions use float64 uniforms, so the law is exact up to
    float rounding; the output is an integer.

    Raises:
        InvalidRequestError: ``sigma`` is not finite and > 0 or ``size`` < 0.
    """
    _check_scale(sigma, name="sigma")
    _check_noise_scale(sigma, what="discrete Gaussian")
    _check_size(size)
    t = math.floor(sigma) + 1
    shift = sigma**2 / t
    accepted: list[npt.NDArray[np.int64]] = []
    remaining = size
    while remaining > 0:
        # Acceptance is at least about 1/2 for every sigma; oversample to finish in one pass.
        batch = 2 * remaining + 64
        proposal = sample_discrete_laplace(scale=float(t), size=batch, rng=rng)
        gap = np.abs(proposal).astype(np.float64) - shift
        keep = rng.random(batch) < np.exp(-(gap**2) / (2.0 * sigma**2))
        chosen = proposal[keep][:remaining]
        accepted.append(chosen)
        remaining -= chosen.size
    if not accepted:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(accepted)


# --- dispatch ---------------------------------------------------------------------------


def add_noise(
    values: npt.NDArray[np.int64], charge: Charge, *, rng: RandomSource
) -> npt.NDArray[np.int64]:
    """Return ``values`` plus independent integer noise as ``charge`` describes.

    Each entry gets its own draw at ``charge.noise_scale``; the charge must already account
    for how many entries one record can change (its ``sensitivity``).

    Raises:
        InvalidRequestError: The charge's mechanism has no sampler here, or ``values`` is
            not an integer array.
    """
    if not np.issubdtype(values.dtype, np.integer):
        raise InvalidRequestError(f"values must be an integer array; got dtype {values.dtype}")
    size = int(values.size)
    if charge.mechanism == DISCRETE_LAPLACE:
        noise = sample_discrete_laplace(scale=charge.noise_scale, size=size, rng=rng)
    elif charge.mechanism == DISCRETE_GAUSSIAN:
        noise = sample_discrete_gaussian(sigma=charge.noise_scale, size=size, rng=rng)
    else:
        raise InvalidRequestError(
            f"mechanism {charge.mechanism!r} has no integer noise sampler; expected "
            f"{DISCRETE_LAPLACE!r} or {DISCRETE_GAUSSIAN!r}"
        )
    return values.astype(np.int64) + noise.reshape(values.shape)


def noise_std(charge: Charge) -> float:
    """Return the standard deviation of the integer noise ``charge`` describes.

    Discrete Laplace with scale t: exactly sqrt(2 q) / (1 - q), q = exp(-1/t). Discrete
    Gaussian: sigma, an upper bound (CKS 2020, arXiv:2004.00010, Prop. 19: Var <= sigma**2).

    Raises:
        InvalidRequestError: The charge's mechanism is not one of this module's.

    >>> round(noise_std(laplace_charge(epsilon=1.0, sensitivity=1)), 6)
    1.356962
    """
    if charge.mechanism == DISCRETE_LAPLACE:
        return math.sqrt(_laplace_variance(charge.noise_scale))
    if charge.mechanism == DISCRETE_GAUSSIAN:
        return charge.noise_scale
    raise InvalidRequestError(
        f"mechanism {charge.mechanism!r} has no integer noise here; expected "
        f"{DISCRETE_LAPLACE!r} or {DISCRETE_GAUSSIAN!r}"
    )
