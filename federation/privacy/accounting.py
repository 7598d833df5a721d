"""Privacy accounting: describe each release as a ``Charge`` and compose them into a ``Spend``.

Math only, never data. A ``Charge`` describes one release before it is made: its own
(epsilon, delta)-DP guarantee and its Renyi-DP (RDP) curve at every order in ``ORDERS``.
A ``Spend`` composes charges two ways at once, basic composition of (epsilon, delta) and
additive composition of RDP, and reports the smaller of the two bounds (both are valid for
the same composed mechanism), rounded up.

Sources:
    RDP and its composition: Mironov 2017, "Renyi Differential Privacy", arXiv:1702.07476,
    Prop. 1 (composition) and Prop. 7 (Gaussian mechanism).
    RDP to (epsilon, delta): Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis Testing
    Interpretations and Renyi Differential Privacy", arXiv:1905.09982, Thm. 21 (as implemented
    by Opacus' ``get_privacy_spent``).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import cast

from federation.errors import InvalidRequestError

__all__ = [
    "Charge",
    "ORDERS",
    "Spend",
    "compose",
    "gaussian_rdp",
    "preload",
    "pure_dp_rdp",
    "rdp_to_epsilon",
    "subsampled_gaussian_charge",
]

ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)
"""RDP orders (alpha) tracked by every charge: Opacus' ``RDPAccountant.DEFAULT_ALPHAS``."""

# Relative slack added to every reported epsilon so float rounding never under-reports spend.
_ROUND_UP_RELATIVE = 1e-12


def _round_up(value: float) -> float:
    """Return ``value`` nudged upward past any float rounding error (0 and inf stay put)."""
    if value == 0.0 or not math.isfinite(value):
        return value
    return math.nextafter(value + abs(value) * _ROUND_UP_RELATIVE, math.inf)


# One thread imports Opacus at a time: a node's preload thread and a request importing
# another of its modules at once met its import cycle half-initialised (ImportError in one).
_OPACUS_IMPORT = threading.Lock()


@functools.cache
def _opacus_rdp() -> ModuleType:
    """Import Opacus' RDP analysis on first use (importing Opacus loads torch, seconds)."""
    with _OPACUS_IMPORT:
        from opacus.accountants.analysis import rdp

    return cast(ModuleType, rdp)


def opacus_noise_multiplier() -> Callable[..., float]:
    """Opacus' ``get_noise_multiplier``, imported on first use (as ``_opacus_rdp``)."""
    with _OPACUS_IMPORT:
        from opacus.accountants.utils import get_noise_multiplier

    return cast(Callable[..., float], get_noise_multiplier)


def preload() -> None:
    """Import the vetted accountant now (a node calls this at start, off the request path).

    Otherwise the first charge pays a multi-second import inside the ledger's write lock.
    """
    _opacus_rdp()
    opacus_noise_multiplier()


def _check_delta(delta: float, *, allow_zero: bool) -> None:
    low_ok = delta >= 0 if allow_zero else delta > 0
    if not (math.isfinite(delta) and low_ok and delta < 1):
        rule = "0 <= delta < 1" if allow_zero else "0 < delta < 1"
        raise InvalidRequestError(f"delta must satisfy {rule}; got {delta!r}")


def _check_rdp(rdp: Sequence[float], *, owner: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in rdp)
    if len(values) != len(ORDERS):
        raise InvalidRequestError(
            f"{owner}.rdp must have one entry per order ({len(ORDERS)}); got {len(values)}"
        )
    if any(math.isnan(v) or v < 0 for v in values):
        raise InvalidRequestError(f"{owner}.rdp entries must be >= 0 (inf allowed); got {values!r}")
    return values


def _rdp_to_json(rdp: tuple[float, ...]) -> list[float | str]:
    # Strict JSON has no Infinity; spell it as a string so any parser can read the ledger.
    return [v if math.isfinite(v) else "inf" for v in rdp]


def _rdp_from_json(raw: object) -> tuple[float, ...]:
    if not isinstance(raw, list):
        raise InvalidRequestError(f"rdp must be a JSON list; got {type(raw).__name__}")
    return tuple(float(v) for v in raw)


def _load_object(text: str, *, owner: str, keys: frozenset[str]) -> dict[str, object]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRequestError(f"{owner} JSON is malformed: {err}") from err
    if not isinstance(raw, dict) or set(raw) != keys:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise InvalidRequestError(f"{owner} JSON must have exactly keys {sorted(keys)}; got {got}")
    return cast(dict[str, object], raw)


def _as_float(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number; got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Charge:
    """The privacy cost of one release, described before the release is made.

    Attributes:
        mechanism: Which mechanism makes the release, e.g. ``"discrete_laplace"``,
            ``"discrete_gaussian"`` or ``"dp_sgd"``.
        epsilon: This release's own (epsilon, delta)-DP guarantee, epsilon part.
        delta: This release's own (epsilon, delta)-DP guarantee, delta part.
        rdp: RDP epsilon at each order of ``ORDERS`` (``math.inf`` allowed).
        sensitivity: Sensitivity in the mechanism's integer units (informational).
        noise_scale: Laplace scale t or Gaussian sigma, in the same units (informational).
    """

    mechanism: str
    epsilon: float
    delta: float
    rdp: tuple[float, ...]
    sensitivity: float = 0.0
    noise_scale: float = 0.0

    def __post_init__(self) -> None:
        if not self.mechanism:
            raise InvalidRequestError("Charge.mechanism must be a non-empty name; got ''")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise InvalidRequestError(
                f"Charge.epsilon must be finite and >= 0; got {self.epsilon!r}"
            )
        _check_delta(self.delta, allow_zero=True)
        object.__setattr__(self, "rdp", _check_rdp(self.rdp, owner="Charge"))
        for name in ("sensitivity", "noise_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidRequestError(f"Charge.{name} must be finite and >= 0; got {value!r}")

    def to_json(self) -> str:
        """Serialise for persistence; ``from_json`` restores an equal charge."""
        return json.dumps(
            {
                "mechanism": self.mechanism,
                "epsilon": self.epsilon,
                "delta": self.delta,
                "rdp": _rdp_to_json(self.rdp),
                "sensitivity": self.sensitivity,
                "noise_scale": self.noise_scale,
            },
            allow_nan=False,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Charge:
        """Parse what ``to_json`` wrote.

        Raises:
            InvalidRequestError: The text is not a valid serialised charge.
        """
        raw = _load_object(text, owner="Charge", keys=_CHARGE_KEYS)
        mechanism = raw["mechanism"]
        if not isinstance(mechanism, str):
            raise InvalidRequestError(f"Charge.mechanism must be a string; got {mechanism!r}")
        return cls(
            mechanism=mechanism,
            epsilon=_as_float(raw["epsilon"], name="Charge.epsilon"),
            delta=_as_float(raw["delta"], name="Charge.delta"),
            rdp=_rdp_from_json(raw["rdp"]),
            sensitivity=_as_float(raw["sensitivity"], name="Charge.sensitivity"),
            noise_scale=_as_float(raw["noise_scale"], name="Charge.noise_scale"),
        )


_CHARGE_KEYS = frozenset(Charge.__dataclass_fields__)


def _zeros() -> tuple[float, ...]:
    return (0.0,) * len(ORDERS)


@dataclass(frozen=True, slots=True)
class Spend:
    """The composition of every charge made for one (node, consumer) pair.

    Two bounds are kept side by side: basic sequential composition of (epsilon, delta)
    (Dwork & Roth 2014, Thm. 3.16) and additive RDP composition (Mironov 2017,
    arXiv:1702.07476, Prop. 1). Both hold for the same composed mechanism, so the smaller
    is reported.

    Attributes:
        epsilon_sum: Sum of the charges' epsilons.
        delta_sum: Sum of the charges' deltas.
        rdp: Sum of the charges' RDP curves over ``ORDERS``.
        releases: Number of charges composed.
    """

    epsilon_sum: float = 0.0
    delta_sum: float = 0.0
    rdp: tuple[float, ...] = field(default_factory=_zeros)
    releases: int = 0

    def __post_init__(self) -> None:
        for name in ("epsilon_sum", "delta_sum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidRequestError(f"Spend.{name} must be finite and >= 0; got {value!r}")
        object.__setattr__(self, "rdp", _check_rdp(self.rdp, owner="Spend"))
        if isinstance(self.releases, bool) or not isinstance(self.releases, int):
            raise InvalidRequestError(f"Spend.releases must be an int; got {self.releases!r}")
        if self.releases < 0:
            raise InvalidRequestError(f"Spend.releases must be >= 0; got {self.releases!r}")

    def plus(self, charge: Charge) -> Spend:
        """Return the spend after also making the release ``charge`` describes."""
        return Spend(
            epsilon_sum=self.epsilon_sum + charge.epsilon,
            delta_sum=self.delta_sum + charge.delta,
            rdp=tuple(a + b for a, b in zip(self.rdp, charge.rdp, strict=True)),
            releases=self.releases + 1,
        )

    def epsilon_at(self, delta: float) -> float:
        """Return an upper bound on the composed epsilon at ``delta``, rounded up.

        The bound is the smaller of basic composition (usable only if ``delta_sum <= delta``)
        and the RDP curve converted at ``delta``; ``math.inf`` if neither applies.

        Args:
            delta: Target delta, ``0 <= delta < 1``.

        Returns:
            Epsilon such that everything released so far is (epsilon, delta)-DP; 0.0 if
            nothing was released.

        Raises:
            InvalidRequestError: ``delta`` is out of range.
        """
        _check_delta(delta, allow_zero=True)
        if self.releases == 0:
            return 0.0
        basic = self.epsilon_sum if self.delta_sum <= delta else math.inf
        renyi = rdp_to_epsilon(self.rdp, delta=delta) if delta > 0 else math.inf
        return _round_up(min(basic, renyi))

    def to_json(self) -> str:
        """Serialise for persistence; ``from_json`` restores an equal spend."""
        return json.dumps(
            {
                "epsilon_sum": self.epsilon_sum,
                "delta_sum": self.delta_sum,
                "rdp": _rdp_to_json(self.rdp),
                "releases": self.releases,
            },
            allow_nan=False,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Spend:
        """Parse what ``to_json`` wrote.

        Raises:
            InvalidRequestError: The text is not a valid serialised spend.
        """
        raw = _load_object(text, owner="Spend", keys=_SPEND_KEYS)
        releases = raw["releases"]
        if isinstance(releases, bool) or not isinstance(releases, int):
            raise InvalidRequestError(f"Spend.releases must be an int; got {releases!r}")
        return cls(
            epsilon_sum=_as_float(raw["epsilon_sum"], name="Spend.epsilon_sum"),
            delta_sum=_as_float(raw["delta_sum"], name="Spend.delta_sum"),
            rdp=_rdp_from_json(raw["rdp"]),
            releases=releases,
        )


_SPEND_KEYS = frozenset(Spend.__dataclass_fields__)


def compose(charges: Sequence[Charge]) -> Charge:
    """Describe several releases made together as one charge (sequential composition).

    Epsilons and deltas add (basic composition, Dwork & Roth 2014, Thm. 3.16) and RDP
    curves add order by order (Mironov 2017, arXiv:1702.07476, Prop. 1). A single charge is
    returned unchanged; a composed one is named by joining its parts' mechanisms with ``+``.

    Raises:
        InvalidRequestError: ``charges`` is empty.
    """
    if not charges:
        raise InvalidRequestError("compose needs at least one charge; got none")
    if len(charges) == 1:
        return charges[0]
    return Charge(
        mechanism="+".join(c.mechanism for c in charges),
        epsilon=sum(c.epsilon for c in charges),
        delta=sum(c.delta for c in charges),
        rdp=tuple(sum(values) for values in zip(*(c.rdp for c in charges), strict=True)),
    )


def rdp_to_epsilon(rdp: Sequence[float], *, delta: float) -> float:
    """Convert an RDP curve over ``ORDERS`` to epsilon at ``delta``, rounded up.

    Uses Opacus' ``get_privacy_spent``, i.e. Balle et al. 2020, arXiv:1905.09982, Thm. 21:
    RDP (alpha, r) implies (r + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1),
    delta)-DP, minimised over the orders. Infinite entries are simply never the minimum.

    Args:
        rdp: RDP epsilon at each order of ``ORDERS``.
        delta: Target delta, ``0 < delta < 1``.

    Returns:
        The epsilon bound (never negative), or ``math.inf`` if every order is infinite.

    Raises:
        InvalidRequestError: ``delta`` is out of range or ``rdp`` has the wrong length.

    >>> round(rdp_to_epsilon(gaussian_rdp(sigma=1.0, sensitivity=1.0), delta=1e-5), 3)
    4.729
    """
    _check_delta(delta, allow_zero=False)
    values = _check_rdp(rdp, owner="rdp_to_epsilon")
    if all(math.isinf(v) for v in values):
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the best order is the first or last one. The bound it returns is
        # still valid (only perhaps not the tightest), so the warning carries no risk here.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        epsilon, _ = _opacus_rdp().get_privacy_spent(
            orders=list(ORDERS), rdp=list(values), delta=delta
        )
    return _round_up(max(0.0, float(epsilon)))


def _check_positive(value: float, *, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidRequestError(f"{name} must be finite and > 0; got {value!r}")


def gaussian_rdp(*, sigma: float, sensitivity: float) -> tuple[float, ...]:
    """Return the RDP curve of the Gaussian mechanism over ``ORDERS``.

    RDP at order alpha is alpha * sensitivity**2 / (2 * sigma**2) (Mironov 2017,
    arXiv:1702.07476, Prop. 7). The same curve holds exactly for the discrete Gaussian on
    integer-valued queries (Canonne, Kamath, Steinke 2020, arXiv:2004.00010, Thm. 4: it
    satisfies sensitivity**2 / (2 sigma**2)-zCDP). Neighbouring: any relation under which
    the query's L2 sensitivity is ``sensitivity``.

    Raises:
        InvalidRequestError: ``sigma`` is not finite and > 0, or ``sensitivity`` < 0.

    >>> gaussian_rdp(sigma=2.0, sensitivity=1.0)[ORDERS.index(2.0)]
    0.25
    """
    _check_positive(sigma, name="sigma")
    if not (math.isfinite(sensitivity) and sensitivity >= 0):
        raise InvalidRequestError(f"sensitivity must be finite and >= 0; got {sensitivity!r}")
    rho = sensitivity**2 / (2.0 * sigma**2)
    return tuple(alpha * rho for alpha in ORDERS)


def pure_dp_rdp(*, epsilon: float) -> tuple[float, ...]:
    """Return an RDP curve valid for any epsilon-DP mechanism.

    At order alpha: min(epsilon, alpha * epsilon**2 / 2). epsilon-DP implies
    (epsilon**2 / 2)-zCDP (Bun & Steinke 2016, arXiv:1605.02065, Prop. 3.3), and RDP of any
    order is at most the max-divergence epsilon (Mironov 2017, arXiv:1702.07476, Prop. 3
    with monotonicity in alpha). Same neighbouring relation as the mechanism's epsilon-DP.

    Raises:
        InvalidRequestError: ``epsilon`` is not finite and >= 0.
    """
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InvalidRequestError(f"epsilon must be finite and >= 0; got {epsilon!r}")
    return tuple(min(epsilon, alpha * epsilon**2 / 2.0) for alpha in ORDERS)


def subsampled_gaussian_charge(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float
) -> Charge:
    """Describe ``steps`` DP-SGD steps: Poisson subsampling then the Gaussian mechanism.

    The RDP curve is Opacus' ``compute_rdp`` (Mironov, Talwar, Zhang 2019, "Renyi
    Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, Sec. 3.3);
    epsilon is that curve converted at ``delta`` (``rdp_to_epsilon``). Neighbouring:
    add/remove one record. Sensitivity is 1 clip norm; noise_scale is ``noise_multiplier``
    in clip-norm units.

    Args:
        sample_rate: Poisson sampling probability q, ``0 < q <= 1``.
        noise_multiplier: Noise standard deviation divided by the clip norm, > 0.
        steps: Number of noisy gradient steps, >= 1.
        delta: Target delta for the charge's epsilon, ``0 < delta < 1``.

    Raises:
        InvalidRequestError: Any argument is out of range.
    """
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise InvalidRequestError(f"sample_rate must satisfy 0 < q <= 1; got {sample_rate!r}")
    _check_positive(noise_multiplier, name="noise_multiplier")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequestError(f"steps must be an int >= 1; got {steps!r}")
    _check_delta(delta, allow_zero=False)
    curve = _opacus_rdp().compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(ORDERS)
    )
    rdp = tuple(float(v) for v in curve)
    return Charge(
        mechanism="dp_sgd",
        epsilon=rdp_to_epsilon(rdp, delta=delta),
        delta=delta,
        rdp=rdp,
        sensitivity=1.0,
        noise_scale=noise_multiplier,
    )
