"""What a DP-SGD training job costs at a node, from its public settings alone.

A node charges every round of a job the same: the DP-SGD steps (Poisson-subsampled
Gaussian, the noise multiplier chosen so the job's updates and counts end at
``target_epsilon``), one DP example count, and, when asked, three DP validation metrics.
The node plans each round with these functions (``nodes.training.plan_training``) and a
coordinator uses the same ones to know what a job will cost before any node is asked, so
the two can never disagree. Everything here is arithmetic on public parameters.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from federation.errors import InvalidRequestError
from federation.privacy.accounting import (
    Charge,
    Spend,
    compose,
    opacus_noise_multiplier,
    subsampled_gaussian_charge,
)
from federation.privacy.mechanisms import laplace_charge

__all__ = [
    "EXAMPLES_EPSILON_SHARE",
    "RoundCharges",
    "job_spend",
    "noise_multiplier",
    "round_charges",
]

EXAMPLES_EPSILON_SHARE = 0.01
"""Share of ``target_epsilon`` spent, over the job, on the DP example counts (one per round,
``target_epsilon * share / total_rounds`` each, discrete Laplace). DP-SGD gets the rest, so
the job's composed spend (updates + counts) stays at or below ``target_epsilon``."""


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' RDP ``get_noise_multiplier`` for the whole job (cached: about a second).

    Raises:
        InvalidRequestError: no noise multiplier up to 1e6 reaches ``epsilon``, or a
            setting out of its range (Opacus' search would never end at a sample rate of
            0 or 0 steps: their epsilon is 0 whatever the noise).
    """
    if not (steps >= 1 and 0 < sample_rate <= 1 and 0 < delta < 1 and epsilon > 0):
        raise InvalidRequestError(
            f"no noise multiplier for epsilon {epsilon!r}, delta {delta!r}, sample_rate "
            f"{sample_rate!r}, steps {steps!r}: need epsilon > 0, delta in (0, 1), "
            "sample_rate in (0, 1] and steps >= 1"
        )
    get_noise_multiplier = opacus_noise_multiplier()
    try:
        with warnings.catch_warnings():
            # "Optimal order is the largest/smallest alpha": the bound is valid, perhaps loose.
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            sigma = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=min(0.01, 0.005 * epsilon),
            )
    except ValueError as err:  # "The privacy budget is too low."
        raise InvalidRequestError(
            f"target_epsilon {epsilon:g} is too small for {steps} steps at sample_rate "
            f"{sample_rate:g} (the noise multiplier would exceed 1e6)"
        ) from err
    return float(sigma)


@dataclass(frozen=True, slots=True)
class RoundCharges:
    """What one round of a job is charged, part by part, and in all (``total``)."""

    noise_multiplier: float
    update: Charge
    examples: Charge
    metrics: tuple[Charge, ...]
    total: Charge


def round_charges(
    *,
    target_epsilon: float,
    metrics_epsilon: float,
    delta: float,
    sample_rate: float,
    local_steps: int,
    total_rounds: int,
    loss_sensitivity: int = 1,
) -> RoundCharges:
    """Each round's charges for a job with these settings (checked by the caller).

    ``loss_sensitivity`` is the validation loss sum's sensitivity in grid units: it sets
    that metric's noise, not its epsilon, so the charges' epsilons do not depend on it.

    Raises:
        InvalidRequestError: ``target_epsilon`` too small for the steps (see
            :func:`noise_multiplier`), or a charge out of range.
    """
    steps = total_rounds * local_steps
    sgd_epsilon = target_epsilon * (1.0 - EXAMPLES_EPSILON_SHARE)
    sigma = noise_multiplier(sgd_epsilon, delta, sample_rate, steps)
    update = subsampled_gaussian_charge(
        sample_rate=sample_rate, noise_multiplier=sigma, steps=local_steps, delta=delta
    )
    examples = laplace_charge(
        epsilon=target_epsilon * EXAMPLES_EPSILON_SHARE / total_rounds, sensitivity=1
    )
    metrics: tuple[Charge, ...] = ()
    if metrics_epsilon > 0:
        share = metrics_epsilon / 3  # held-out count, loss sum, correct-prediction count
        metrics = (
            laplace_charge(epsilon=share, sensitivity=1),
            laplace_charge(epsilon=share, sensitivity=loss_sensitivity),
            laplace_charge(epsilon=share, sensitivity=1),
        )
    return RoundCharges(sigma, update, examples, metrics, compose((update, examples, *metrics)))


def job_spend(charge: Charge, rounds: int) -> Spend:
    """The composed spend of ``rounds`` rounds each charged ``charge`` (RDP curves add).

    Composed round by round, as the ledger composes a job's charges, so that a job this
    accepts is never a last bit over what the ledger then reports (``rounds * rdp`` can
    round below the sum).
    """
    spend = Spend()
    for _ in range(rounds):
        spend = spend.plus(charge)
    return spend
