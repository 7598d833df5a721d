"""Training values both sides share: a round's config and result, and what a receipt signs.

A node releases, for each round, a ``TrainResult`` and a DP model update. Its receipt
carries ``payload_sha256`` = SHA-256 of ``receipts.canonical_json(train_payload(...))``:
the result's DP numbers plus the BLAKE3 digest of each update tensor's raw little-endian
bytes, so a coordinator that hashed the update as it streamed in can check the receipt
offline.

Update tensors are hashed with BLAKE3 by default (256-bit output, the same generic 128-bit
collision resistance as SHA-256) because they are the one large thing a receipt covers:
hundreds of MB per node per round, hashed by the node before it sends and by the coordinator
as it receives. BLAKE3 ran at ~4.4 GB/s on one core of our benchmark machine against
SHA-256's ~1.7 GB/s with the CPU's SHA extensions. It is not a NIST/FIPS algorithm and has
fewer rounds (7) than its BLAKE2 parent, a smaller safety margin than SHA-256 though no
attack comes near it; it is checked with the ``blake3`` Python package or the ``b3sum``
tool, not ``sha256sum``. A coordinator whose auditors require SHA-256 asks for it
(``TrainConfig.tensor_digest``). The two sides agree per round: the coordinator's
``TrainConfig`` names the digest it will compute, the node hashes with it and says so in its
``TrainResult``, and a coordinator or node from before version 2 (which sends neither field)
means SHA-256. Payload version 1 carries ``"sha256"`` per tensor, version 2 ``"blake3"``.
Everything small (payload digests, the audit chain, signatures) stays SHA-256.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
from blake3 import blake3

from federation.errors import InvalidRequestError
from federation.models import PROBE_ROWS
from federation.releases import BudgetStatus, NoiseInfo, Receipt
from federation.schema import check_schema_digest

if TYPE_CHECKING:
    from federation.models import ModelSpec

__all__ = [
    "TrainConfig",
    "TrainMetric",
    "DEFAULT_TENSOR_DIGEST",
    "LEGACY_TENSOR_DIGEST",
    "TENSOR_DIGESTS",
    "TensorDigest",
    "TensorHasher",
    "TrainResult",
    "check_tensor_digest",
    "payload_version",
    "tensor_digests",
    "tensor_hasher",
    "train_payload",
]

TensorDigest = Literal["blake3", "sha256"]
TENSOR_DIGESTS: Final[tuple[TensorDigest, ...]] = ("blake3", "sha256")
DEFAULT_TENSOR_DIGEST: Final[TensorDigest] = "blake3"
# What a peer that sends no digest field (one from before payload version 2) hashes with.
LEGACY_TENSOR_DIGEST: Final[TensorDigest] = "sha256"
_PAYLOAD_VERSIONS: Final[dict[TensorDigest, int]] = {"sha256": 1, "blake3": 2}
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One round of a training job, as the coordinator asks a node for it.

    The numbers are requests: the node's ``plan_training`` checks them against its policy.
    """

    spec: ModelSpec
    round: int
    total_rounds: int
    target_epsilon: float
    delta: float
    sample_rate: float
    local_steps: int
    learning_rate: float
    clip_norm: float
    job_id: str
    metrics_epsilon: float = 0.0
    tensor_digest: TensorDigest = DEFAULT_TENSOR_DIGEST
    # The coordinator's build's outputs on the public probe rows with these global weights
    # (federation.models.probe_logits), sent for an operator-registered architecture: the
    # node refuses the round, uncharged, if its own build computes another function.
    # Empty: no check (a built-in architecture is the same code on both sides).
    probe_logits: tuple[float, ...] = ()
    # DatasetSchema.contract_digest of the dataset the job encodes records with: a node
    # whose schema changed since refuses the round, uncharged. "": no check.
    schema_sha256: str = ""

    def __post_init__(self) -> None:
        check_tensor_digest(self.tensor_digest)
        check_schema_digest(self.schema_sha256)
        if len(self.probe_logits) not in (0, PROBE_ROWS) or not all(
            math.isfinite(v) for v in self.probe_logits
        ):
            raise InvalidRequestError(
                f"probe_logits must be empty or {PROBE_ROWS} finite numbers; got "
                f"{len(self.probe_logits)} values"
            )
        if not 1 <= self.total_rounds <= 2**31:
            raise InvalidRequestError(f"total_rounds must be >= 1; got {self.total_rounds}")
        if not 0 <= self.round < self.total_rounds:
            raise InvalidRequestError(
                f"round must be in [0, total_rounds={self.total_rounds}); got {self.round}"
            )
        if not _JOB_ID_RE.fullmatch(self.job_id):
            raise InvalidRequestError(
                f"job_id must be 1-64 letters, digits, '-' or '_'; got {self.job_id[:64]!r}"
            )
        for name in (
            "target_epsilon",
            "delta",
            "sample_rate",
            "learning_rate",
            "clip_norm",
            "metrics_epsilon",
        ):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number; got {value!r}")


@dataclass(frozen=True, slots=True)
class TrainMetric:
    """One DP validation metric a node released for a round (e.g. ``loss``)."""

    name: str
    value: float
    noise: NoiseInfo


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a node releases for one round, besides the DP model update itself.

    Attributes:
        noisy_examples: DP estimate of the examples the node trained on (FedAvg weight).
        examples_noise: how that estimate was noised.
        noise_multiplier: DP-SGD noise multiplier the node chose for the job.
        sample_rate: Poisson sampling rate it used.
        steps: DP-SGD steps it took.
        cost_epsilon: this round's charge (update, count and metrics together).
        cost_delta: this round's delta.
        budget: the consumer's budget at the node after the charge.
        receipt: the node's ledger entry for the charge.
        metrics: DP validation metrics (empty unless ``metrics_epsilon > 0``).
        job_epsilon: the job's composed epsilon at the node so far.
        tensor_digest: the hash the receipt's update entries use.
    """

    noisy_examples: float
    examples_noise: NoiseInfo
    noise_multiplier: float
    sample_rate: float
    steps: int
    cost_epsilon: float
    cost_delta: float
    budget: BudgetStatus
    receipt: Receipt
    metrics: tuple[TrainMetric, ...]
    job_epsilon: float
    tensor_digest: TensorDigest = DEFAULT_TENSOR_DIGEST

    def __post_init__(self) -> None:
        check_tensor_digest(self.tensor_digest)


def check_tensor_digest(name: str) -> TensorDigest:
    """Return ``name`` if it is a tensor digest both sides know.

    Raises:
        InvalidRequestError: any other name.
    """
    for known in TENSOR_DIGESTS:
        if name == known:
            return known
    raise InvalidRequestError(
        f"tensor_digest must be one of {', '.join(TENSOR_DIGESTS)}; got {str(name)[:32]!r}"
    )


def payload_version(digest: TensorDigest) -> int:
    """The train payload version whose update entries carry ``digest``."""
    return _PAYLOAD_VERSIONS[digest]


class TensorHasher(Protocol):
    """What ``tensor_hasher`` returns: hashlib's interface, fed raw bytes."""

    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def tensor_hasher(digest: TensorDigest = DEFAULT_TENSOR_DIGEST) -> TensorHasher:
    """Return a fresh hasher for one update tensor; feed it the raw little-endian bytes."""
    if digest == "blake3":
        return blake3()
    return hashlib.sha256()


def tensor_digests(
    arrays: Mapping[str, npt.NDArray[np.float32]], digest: TensorDigest = DEFAULT_TENSOR_DIGEST
) -> dict[str, str]:
    """Return the hex ``digest`` of each tensor's raw little-endian C-order bytes.

    Tensors hash in parallel threads (``blake3`` and ``hashlib`` release the GIL on large
    buffers).
    """

    def one(array: npt.NDArray[np.float32]) -> str:
        hasher = tensor_hasher(digest)
        hasher.update(np.ascontiguousarray(array, dtype="<f4").view(np.uint8).data)
        return hasher.hexdigest()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(arrays, pool.map(one, arrays.values()), strict=True))


def _noise(noise: NoiseInfo) -> dict[str, object]:
    return {
        "mechanism": noise.mechanism.value,
        "scale": float(noise.scale),
        "sensitivity": float(noise.sensitivity),
        "granularity": float(noise.granularity),
    }


def train_payload(
    result: TrainResult,
    *,
    job_id: str,
    round: int,  # noqa: A002 -- the protocol's field name
    shapes: Mapping[str, tuple[int, ...]],
    digests: Mapping[str, str],
) -> dict[str, object]:
    """Return the JSON object of a training round's release whose digest its receipt carries.

    Everything in it is DP or public: the result's numbers and the update's digests, made
    with ``result.tensor_digest``.
    """
    digest = result.tensor_digest
    return {
        "version": payload_version(digest),
        "operation": "train",
        "job_id": job_id,
        "round": int(round),
        "noisy_examples": float(result.noisy_examples),
        "examples_noise": _noise(result.examples_noise),
        "noise_multiplier": float(result.noise_multiplier),
        "sample_rate": float(result.sample_rate),
        "steps": int(result.steps),
        "job_epsilon": float(result.job_epsilon),
        "metrics": [
            {"name": m.name, "value": float(m.value), "noise": _noise(m.noise)}
            for m in result.metrics
        ],
        "update": [
            {"name": name, "dtype": "float32", "shape": list(shapes[name]), digest: digests[name]}
            for name in shapes
        ],
    }
