"""What a node releases: DP measurements, their noise description, cost and receipt.

These are plain values on the coordinator side. Everything in them is either a DP release
or public metadata; ``federation/wire.py`` converts them to and from the protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federation._html import budgets_html, node_description_html
from federation.errors import InvalidRequestError
from federation.queries import Mechanism
from federation.schema import DatasetSchema

__all__ = [
    "BudgetStatus",
    "Budgets",
    "GroupRelease",
    "Measurement",
    "NodeDescription",
    "NoiseInfo",
    "Receipt",
    "Release",
]


@dataclass(frozen=True, slots=True)
class NoiseInfo:
    """How a measurement was noised, in released units (public: depends on epsilon only)."""

    mechanism: Mechanism
    scale: float  # Laplace scale b, or Gaussian sigma
    sensitivity: float
    granularity: float  # released values are integer multiples of this

    def __post_init__(self) -> None:
        for name in ("scale", "sensitivity", "granularity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidRequestError(f"noise {name} must be finite and >= 0; got {value!r}")

    @property
    def std(self) -> float:
        """Standard deviation of the noise (continuous approximation, an upper bound)."""
        if self.mechanism is Mechanism.LAPLACE:
            return math.sqrt(2.0) * self.scale
        return self.scale


@dataclass(frozen=True, slots=True)
class Measurement:
    """One named DP vector: ``count``, ``sum`` or ``bins``."""

    name: str
    values: tuple[float, ...]
    noise: NoiseInfo
    center: float = 0.0  # a mean's ``sum`` adds up (x - center)


@dataclass(frozen=True, slots=True)
class GroupRelease:
    """The measurements for one group ("" when the query has no group-by)."""

    group: str
    measurements: tuple[Measurement, ...]

    def measurement(self, name: str) -> Measurement:
        """Return the measurement called ``name``."""
        for m in self.measurements:
            if m.name == name:
                return m
        raise InvalidRequestError(f"release of group {self.group!r} has no {name!r} measurement")


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A consumer's privacy budget at one node."""

    epsilon: float
    delta: float
    spent_epsilon: float
    remaining_epsilon: float
    releases: int
    max_epsilon_per_release: float
    max_delta_per_release: float | None = None  # None: not stated (a node from before)


class Budgets(dict[str, BudgetStatus]):
    """This consumer's budget at each node: a ``dict`` that renders as a table in Jupyter."""

    def _repr_html_(self) -> str:
        return budgets_html(self)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof of one release: the node's signed audit entry for it.

    ``federation.receipts`` defines the hashed payload and the signed bytes exactly, and
    verifies a receipt against the node's certificate.
    """

    id: str  # the release's audit entry id
    node_name: str
    consumer: str
    issued_at: float  # seconds since the Unix epoch
    payload_sha256: str = ""  # hex SHA-256 of the released values' canonical JSON
    signature: bytes = b""  # the node's signature over receipts.receipt_message(...)
    key_id: str = ""  # the signing key (receipts.key_id_of)
    # The consumer's releases at this node, numbered 1, 2, ... (never the audit chain's
    # position, which would show how much other consumers asked); a gap is a release the
    # node recorded under the consumer's name that it holds no receipt for.
    sequence: int = 0
    epsilon: float = 0.0  # cost of the release
    delta: float = 0.0
    operation: str = ""  # "analyze", "train", ...
    charge_id: str = ""  # the audit entry that charged the budget for this release


@dataclass(frozen=True, slots=True)
class Release:
    """A node's whole answer to one Analyze request."""

    groups: tuple[GroupRelease, ...]
    bin_labels: tuple[str, ...]
    bin_edges: tuple[float, ...]
    cost_epsilon: float
    cost_delta: float
    budget: BudgetStatus
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class NodeDescription:
    """A node's public metadata as seen by one consumer."""

    node_name: str
    jurisdiction: str
    software_version: str
    datasets: tuple[DatasetSchema, ...]
    consumer: str
    budget: BudgetStatus
    allowed_operations: tuple[str, ...]
    # PEM that verifies the node's receipts: its TLS certificate, or an Ed25519 public key
    # (plaintext development node); see federation.receipts.
    receipt_key_pem: bytes = b""
    receipt_key_id: str = ""

    def dataset(self, name: str) -> DatasetSchema:
        """Return the schema of dataset ``name``."""
        for ds in self.datasets:
            if ds.name == name:
                return ds
        known = ", ".join(d.name for d in self.datasets) or "none"
        raise InvalidRequestError(
            f"node {self.node_name!r} has no dataset {name!r}; it has: {known}"
        )

    def _repr_html_(self) -> str:
        return node_description_html(self)
