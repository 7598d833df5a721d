"""Known-answer and property tests for federation.privacy.accounting."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from federation.errors import InvalidRequestError
from federation.privacy import (
    ORDERS,
    Charge,
    Spend,
    gaussian_charge,
    gaussian_rdp,
    laplace_charge,
    pure_dp_rdp,
    rdp_to_epsilon,
    subsampled_gaussian_charge,
)


def _by_hand_epsilon(rdp: list[float], delta: float) -> float:
    """Balle et al. 2020 (arXiv:1905.09982) Thm. 21, minimised over ORDERS, written out."""
    return min(
        r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a, r in zip(ORDERS, rdp, strict=True)
    )


def test_orders_are_opacus_defaults() -> None:
    assert list(ORDERS) == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


@pytest.mark.parametrize(("sigma", "sensitivity"), [(1.0, 1.0), (0.7, 3.0), (1234.5, 17.0)])
def test_gaussian_rdp_matches_opacus(sigma: float, sensitivity: float) -> None:
    ours = gaussian_rdp(sigma=sigma, sensitivity=sensitivity)
    theirs = opacus_rdp.compute_rdp(
        q=1.0, noise_multiplier=sigma / sensitivity, steps=1, orders=list(ORDERS)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=0)


def test_gaussian_rdp_closed_form() -> None:
    rdp = gaussian_rdp(sigma=2.0, sensitivity=3.0)
    for alpha, value in zip(ORDERS, rdp, strict=True):
        assert value == pytest.approx(alpha * 9.0 / 8.0, rel=1e-12)


def test_pure_dp_rdp_is_min_of_epsilon_and_zcdp() -> None:
    rdp = pure_dp_rdp(epsilon=0.5)
    assert rdp[ORDERS.index(2.0)] == pytest.approx(0.25)
    assert rdp[ORDERS.index(63.0)] == 0.5
    assert all(0 <= r <= 0.5 for r in rdp)


@pytest.mark.parametrize(
    ("sample_rate", "noise_multiplier", "steps", "delta"),
    [(0.01, 1.1, 1000, 1e-5), (0.05, 2.0, 200, 1e-6), (1.0, 5.0, 3, 1e-5)],
)
def test_subsampled_gaussian_matches_opacus_accountant(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float
) -> None:
    accountant = RDPAccountant()
    accountant.history.append((noise_multiplier, sample_rate, steps))
    expected = accountant.get_epsilon(delta=delta)
    charge = subsampled_gaussian_charge(
        sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta
    )
    assert charge.mechanism == "dp_sgd"
    assert charge.delta == delta
    assert charge.epsilon == pytest.approx(expected, rel=0.01)
    assert charge.epsilon >= expected


def test_rdp_to_epsilon_matches_formula_and_opacus() -> None:
    rdp = [r * 7 for r in gaussian_rdp(sigma=3.0, sensitivity=1.0)]
    opacus_eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-6)
    ours = rdp_to_epsilon(rdp, delta=1e-6)
    assert ours == pytest.approx(_by_hand_epsilon(rdp, 1e-6), rel=1e-9)
    assert ours > opacus_eps  # rounded up past float error


def test_rdp_to_epsilon_handles_infinite_orders() -> None:
    assert rdp_to_epsilon([math.inf] * len(ORDERS), delta=1e-5) == math.inf
    rdp = list(gaussian_rdp(sigma=2.0, sensitivity=1.0))
    with_inf = [math.inf] * 50 + rdp[50:]
    assert rdp_to_epsilon(with_inf, delta=1e-5) == pytest.approx(
        _by_hand_epsilon(with_inf, 1e-5), rel=1e-9
    )


def test_rdp_to_epsilon_extreme_best_order_does_not_warn() -> None:
    # Tiny sigma puts the best order at the smallest alpha; Opacus warns (warnings are errors).
    assert math.isfinite(rdp_to_epsilon(gaussian_rdp(sigma=0.05, sensitivity=1.0), delta=0.5))


def test_empty_spend_is_zero() -> None:
    assert Spend().epsilon_at(1e-5) == 0.0
    assert Spend().epsilon_at(0.0) == 0.0


def test_pure_charges_compose_basically_at_delta_zero() -> None:
    spend = Spend().plus(laplace_charge(epsilon=0.3, sensitivity=1))
    spend = spend.plus(laplace_charge(epsilon=0.4, sensitivity=5))
    assert spend.epsilon_at(0.0) == pytest.approx(0.7, rel=1e-9)
    assert spend.epsilon_at(0.0) > spend.epsilon_sum  # rounded up past float error


def test_gaussian_spend_at_delta_zero_is_infinite() -> None:
    spend = Spend().plus(gaussian_charge(epsilon=1.0, delta=1e-6, sensitivity=1))
    assert spend.epsilon_at(0.0) == math.inf


def test_composed_gaussians_match_rdp_by_hand() -> None:
    charges = [
        gaussian_charge(epsilon=1.0, delta=1e-7, sensitivity=1),
        gaussian_charge(epsilon=0.5, delta=1e-7, sensitivity=4),
    ] * 5
    spend = Spend()
    for charge in charges:
        spend = spend.plus(charge)
    rho = sum(c.sensitivity**2 / (2 * c.noise_scale**2) for c in charges)
    by_hand = _by_hand_epsilon([a * rho for a in ORDERS], 1e-6)
    assert by_hand < 7.5  # RDP beats basic composition here, so it is what is reported
    assert spend.epsilon_at(1e-6) == pytest.approx(by_hand, rel=1e-9)
    assert spend.epsilon_at(1e-6) >= by_hand
    assert spend.releases == 10
    assert spend.delta_sum == pytest.approx(1e-6)


def test_basic_composition_wins_for_few_releases() -> None:
    spend = Spend().plus(gaussian_charge(epsilon=1.0, delta=1e-6, sensitivity=1))
    assert spend.epsilon_at(1e-6) == pytest.approx(1.0, rel=1e-9)
    assert spend.epsilon_at(1e-6) >= 1.0
    # Below the charge's own delta, basic composition does not apply; RDP still does.
    assert 1.0 < spend.epsilon_at(1e-9) < math.inf


_charges = st.one_of(
    st.builds(
        lambda e, s: laplace_charge(epsilon=e, sensitivity=s),
        st.floats(0.01, 5.0),
        st.integers(1, 1000),
    ),
    st.builds(
        lambda e, d, s: gaussian_charge(epsilon=e, delta=d, sensitivity=s),
        st.floats(0.05, 5.0),
        st.sampled_from([1e-4, 1e-6, 1e-9]),
        st.integers(1, 100),
    ),
    st.builds(
        lambda q, z, n: subsampled_gaussian_charge(
            sample_rate=q, noise_multiplier=z, steps=n, delta=1e-4
        ),
        st.floats(0.001, 0.2),
        st.floats(0.6, 4.0),
        st.integers(1, 500),
    ),
)


@settings(deadline=None, max_examples=40)
@given(charges=st.lists(_charges, min_size=1, max_size=8), delta=st.sampled_from([1e-9, 1e-6]))
def test_spend_is_monotone_and_never_below_a_single_charge(
    charges: list[Charge], delta: float
) -> None:
    spend = Spend()
    previous = 0.0
    for charge in charges:
        after = spend.plus(charge)
        assert after.releases == spend.releases + 1
        assert all(b >= a for a, b in zip(spend.rdp, after.rdp, strict=True))
        assert after.epsilon_sum >= spend.epsilon_sum
        now = after.epsilon_at(delta)
        assert now >= previous
        # A pure-DP charge claims (epsilon, 0); a Gaussian one is tight at its own delta.
        if charge.delta == 0 or charge.delta >= delta:
            assert now >= charge.epsilon
        spend, previous = after, now
    assert spend.epsilon_at(delta) <= spend.epsilon_sum * (1 + 1e-9) or spend.delta_sum > delta


_rdp_entries = st.one_of(st.floats(0.0, 1e6), st.just(math.inf))


@given(
    mechanism=st.sampled_from(["discrete_laplace", "discrete_gaussian", "dp_sgd"]),
    epsilon=st.floats(0.0, 1e3),
    delta=st.floats(0.0, 0.999),
    rdp=st.lists(_rdp_entries, min_size=len(ORDERS), max_size=len(ORDERS)),
    sensitivity=st.floats(0.0, 1e9),
    noise_scale=st.floats(0.0, 1e9),
)
def test_charge_json_round_trips(
    mechanism: str,
    epsilon: float,
    delta: float,
    rdp: list[float],
    sensitivity: float,
    noise_scale: float,
) -> None:
    charge = Charge(mechanism, epsilon, delta, tuple(rdp), sensitivity, noise_scale)
    text = charge.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON {name}"))
    assert Charge.from_json(text) == charge


@given(
    epsilon_sum=st.floats(0.0, 1e6),
    delta_sum=st.floats(0.0, 10.0),
    rdp=st.lists(_rdp_entries, min_size=len(ORDERS), max_size=len(ORDERS)),
    releases=st.integers(0, 10**9),
)
def test_spend_json_round_trips(
    epsilon_sum: float, delta_sum: float, rdp: list[float], releases: int
) -> None:
    spend = Spend(epsilon_sum, delta_sum, tuple(rdp), releases)
    assert Spend.from_json(spend.to_json()) == spend


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"epsilon_sum": 0}',
        '{"epsilon_sum": "x", "delta_sum": 0, "rdp": [], "releases": 0}',
    ],
)
def test_spend_from_bad_json_raises(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        Spend.from_json(text)


def test_charge_from_json_rejects_wrong_rdp_length() -> None:
    good = json.loads(laplace_charge(epsilon=1.0, sensitivity=1).to_json())
    good["rdp"] = good["rdp"][:-1]
    with pytest.raises(InvalidRequestError, match=r"rdp"):
        Charge.from_json(json.dumps(good))


_ZEROS = (0.0,) * len(ORDERS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-9}, "delta"),
        ({"rdp": (0.0,) * 3}, "rdp"),
        ({"rdp": (-1.0,) + _ZEROS[1:]}, "rdp"),
        ({"rdp": (math.nan,) + _ZEROS[1:]}, "rdp"),
        ({"mechanism": ""}, "mechanism"),
        ({"noise_scale": -1.0}, "noise_scale"),
    ],
)
def test_invalid_charge_raises(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "mechanism": "discrete_laplace",
        "epsilon": 1.0,
        "delta": 0.0,
        "rdp": _ZEROS,
    }
    with pytest.raises(InvalidRequestError, match=field):
        Charge(**(base | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: Spend(releases=-1), "releases"),
        (lambda: Spend(epsilon_sum=-1.0), "epsilon_sum"),
        (lambda: Spend().epsilon_at(1.0), "delta"),
        (lambda: rdp_to_epsilon(_ZEROS, delta=0.0), "delta"),
        (lambda: rdp_to_epsilon((0.0,), delta=1e-5), "rdp"),
        (lambda: gaussian_rdp(sigma=0.0, sensitivity=1.0), "sigma"),
        (lambda: pure_dp_rdp(epsilon=-1.0), "epsilon"),
        (
            lambda: subsampled_gaussian_charge(
                sample_rate=0.0, noise_multiplier=1.0, steps=1, delta=1e-5
            ),
            "sample_rate",
        ),
        (
            lambda: subsampled_gaussian_charge(
                sample_rate=0.1, noise_multiplier=1.0, steps=0, delta=1e-5
            ),
            "steps",
        ),
        (
            lambda: subsampled_gaussian_charge(
                sample_rate=0.1, noise_multiplier=-1.0, steps=1, delta=1e-5
            ),
            "noise_multiplier",
        ),
    ],
)
def test_invalid_accounting_inputs_raise(call: object, field: str) -> None:
    assert callable(call)
    with pytest.raises(InvalidRequestError, match=field):
        call()


def test_the_node_preload_and_a_first_request_import_opacus_together() -> None:
    # A node preloads the accountant in a thread while the first Train request imports
    # another Opacus module: unserialised, one of them met Opacus' import cycle half-done
    # (ImportError in the preload thread, 3 runs in 3), and the slow import then landed in
    # the ledger's write lock. A fresh interpreter, as a node starts.
    script = (
        "import threading\n"
        "from federation.privacy import accounting, training\n"
        "t = threading.Thread(target=accounting.preload)\n"
        "t.start()\n"
        "training.noise_multiplier(1.0, 1e-6, 0.01, 100)\n"
        "t.join()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
