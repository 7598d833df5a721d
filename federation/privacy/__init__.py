"""Differential-privacy mechanisms and accounting (math only, never data)."""

from federation.privacy.accounting import (
    ORDERS,
    Charge,
    Spend,
    compose,
    gaussian_rdp,
    preload,
    pure_dp_rdp,
    rdp_to_epsilon,
    subsampled_gaussian_charge,
)
from federation.privacy.mechanisms import (
    DISCRETE_GAUSSIAN,
    DISCRETE_LAPLACE,
    EXACT_SIGMA_MAX,
    add_noise,
    analytic_gaussian_sigma,
    discrete_gaussian_delta,
    gaussian_charge,
    laplace_charge,
    noise_std,
    sample_discrete_gaussian,
    sample_discrete_laplace,
)

__all__ = [
    "Charge",
    "DISCRETE_GAUSSIAN",
    "DISCRETE_LAPLACE",
    "EXACT_SIGMA_MAX",
    "ORDERS",
    "Spend",
    "add_noise",
    "analytic_gaussian_sigma",
    "compose",
    "discrete_gaussian_delta",
    "gaussian_charge",
    "gaussian_rdp",
    "laplace_charge",
    "noise_std",
    "preload",
    "pure_dp_rdp",
    "rdp_to_epsilon",
    "sample_discrete_gaussian",
    "sample_discrete_laplace",
    "subsampled_gaussian_charge",
]
