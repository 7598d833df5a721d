"""One training round at the node, as plain steps the servicer chains together.

``plan_round`` validates a round's config (``nodes.training.plan_training``);
``check_layout`` checks the declared layout of the global weights against the model the
node itself builds, *before* a byte of weights is read; ``check_affordable`` refuses a round
when the rest of its job would not fit the consumer's remaining budget; ``round_details``
is what the ledger records with the charge, ``round_result`` what the node releases and
``round_payload`` what its receipt signs. ``SpareBuffers`` keeps one round's tensors for
the next. Nothing here touches the protocol or the data.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from federation.errors import BudgetExhaustedError, InvalidRequestError, PolicyError
from federation.models import ModelBuilder
from federation.privacy import Spend
from federation.releases import Receipt
from federation.schema import DatasetSchema
from federation.training import (
    TensorDigest,
    TrainConfig,
    TrainMetric,
    TrainResult,
    tensor_digests,
    train_payload,
)
from federation.wire import TensorHeader, fits
from nodes.config import ConsumerPolicy
from nodes.ledger import ChargeRecord, JobRecord
from nodes.training import LocalUpdate, TrainPlan, plan_training

__all__ = [
    "SpareBuffers",
    "check_affordable",
    "check_layout",
    "plan_round",
    "round_details",
    "round_payload",
    "round_result",
]


def plan_round(
    config: TrainConfig,
    *,
    schema: DatasetSchema,
    policy: ConsumerPolicy,
    registry: Mapping[str, ModelBuilder],
) -> TrainPlan:
    """Validate a round against the schema and the consumer's policy (no data read).

    Raises:
        InvalidRequestError, PolicyError, BudgetExhaustedError: see ``plan_training``.
    """
    return plan_training(
        spec=config.spec,
        round=config.round,
        total_rounds=config.total_rounds,
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        sample_rate=config.sample_rate,
        local_steps=config.local_steps,
        learning_rate=config.learning_rate,
        clip_norm=config.clip_norm,
        metrics_epsilon=config.metrics_epsilon,
        job_id=config.job_id,
        schema=schema,
        policy=policy,
        registry=registry,
    )


def check_layout(plan: TrainPlan, headers: Sequence[TensorHeader]) -> None:
    """Check that the declared weights are exactly the planned model's tensors and shapes.

    Raises:
        InvalidRequestError: a missing, unexpected or differently shaped tensor.
    """
    expected = plan.shapes
    declared = {h.name: h.shape for h in headers}
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    if missing or unexpected:
        raise InvalidRequestError(
            f"global weights must be exactly the tensors {sorted(expected)} of the "
            f"{plan.spec.architecture} model; missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, shape in expected.items():
        if tuple(declared[name]) != tuple(shape):
            raise InvalidRequestError(
                f"global weight {name!r} must have shape {list(shape)} for this model; "
                f"got {list(declared[name])}"
            )


def check_affordable(plan: TrainPlan, *, spend: Spend, policy: ConsumerPolicy) -> None:
    """Refuse a round unless the rest of its job fits the consumer's budget.

    The rest of the job is this round and every later one, each charged ``plan.charge``,
    composed with everything the consumer spent before (as the ledger composes them). The
    ledger's atomic charge stays the real guard; this only refuses a job early, before it
    spends budget on rounds it could not finish.

    Raises:
        BudgetExhaustedError: the projected spend exceeds the budget; the message carries
            ``remaining_epsilon=...``.
    """
    projected = spend
    for _ in range(plan.total_rounds - plan.round):
        projected = projected.plus(plan.charge)
    needed = projected.epsilon_at(policy.delta)
    if needed > policy.epsilon * (1 + 1e-9):
        spent = spend.epsilon_at(policy.delta) if spend.releases else 0.0
        remaining = max(0.0, policy.epsilon - spent)
        raise BudgetExhaustedError(
            f"consumer {policy.name!r} cannot afford the rest of training job "
            f"{plan.job_id!r} ({plan.total_rounds - plan.round} rounds from round {plan.round}): "
            f"it would bring the composed spend to {needed:.6g} of {policy.epsilon:g}; ask for "
            f"a smaller target_epsilon; remaining_epsilon={remaining:.6g}",
            remaining_epsilon=remaining,
        )


def check_job(plan: TrainPlan, job: JobRecord, policy: ConsumerPolicy) -> None:
    """Refuse a round of a job whose settings differ from its first charged round, or
    that the operator's ``max_rounds`` no longer allows.

    A job's noise multiplier is chosen for its declared rounds and target epsilon: a
    coordinator must not re-declare them under the same ``job_id``. ``max_rounds`` bounds
    the rounds a job is charged at this node, retried rounds included, so repeating a
    round (say, round 0 of a one-round job) is bounded too. A new job id starts a new job,
    charged to the same budget, which is the bound that always holds.

    Raises:
        InvalidRequestError: a setting differs from the job's first round (named).
        PolicyError: the job has been charged ``max_rounds`` rounds here.
    """
    if job.rounds >= policy.max_rounds:
        raise PolicyError(
            f"train job {plan.job_id} has been charged {job.rounds} rounds at this node, "
            f"its max_rounds for consumer {policy.name!r} (retried rounds count)"
        )
    if job.first is None:
        return
    first = job.first
    now = round_details(plan)
    # The round moves on; the noise multiplier is derived from the rest (an update of the
    # accountant may shift it without the job changing). JSON, as the ledger stored it.
    compared = {k: v for k, v in now.items() if k not in ("round", "noise_multiplier")}
    changed = [k for k, v in json.loads(json.dumps(compared)).items() if v != first.get(k)]
    if changed:
        was = ", ".join(f"{k}={first.get(k)!r}" for k in changed)
        asked = ", ".join(f"{k}={now[k]!r}" for k in changed)
        raise InvalidRequestError(
            f"train job {plan.job_id} was started here with {was}; this round asks {asked}. "
            "A job's settings are fixed at its first round: start a new job to change them"
        )


def round_details(plan: TrainPlan) -> dict[str, object]:
    """The public parameters of a round, recorded with its charge."""
    spec = plan.spec
    return {
        "job_id": plan.job_id,
        "round": plan.round,
        "total_rounds": plan.total_rounds,
        "architecture": spec.architecture,
        "hidden": list(spec.hidden),
        "dataset": spec.dataset,
        "features": list(spec.features),
        "target": spec.target,
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "local_steps": plan.local_steps,
        "learning_rate": plan.learning_rate,
        "clip_norm": plan.clip_norm,
        "noise_multiplier": plan.noise_multiplier,
        "metrics_epsilon": plan.metrics_epsilon,
    }


def round_result(
    plan: TrainPlan,
    update: LocalUpdate,
    record: ChargeRecord,
    *,
    node_name: str,
    tensor_digest: TensorDigest,
    job_epsilon: float,
) -> TrainResult:
    """What the node releases for a round besides the update: all DP or public.

    ``job_epsilon`` is the job's composed spend at this node so far, this round and any
    retried round included (``Ledger.job_spend``).

    ``tensor_digest`` is the hash the coordinator asked for (``TrainConfig.tensor_digest``):
    the receipt commits to the update with the one the coordinator computes as it arrives.

    The receipt is a draft (unsigned); the servicer swaps in the signed one that
    ``Ledger.record_release`` returns for ``round_payload``'s digest.
    """
    return TrainResult(
        noisy_examples=update.noisy_examples,
        examples_noise=update.examples_noise,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=update.steps,
        cost_epsilon=plan.charge.epsilon,
        cost_delta=plan.charge.delta,
        budget=record.budget,
        receipt=Receipt(
            id=record.id,
            node_name=node_name,
            consumer=record.consumer,
            issued_at=record.created_at,
        ),
        metrics=tuple(TrainMetric(name, value, noise) for name, value, noise in update.metrics),
        job_epsilon=job_epsilon,
        tensor_digest=tensor_digest,
    )


def round_payload(plan: TrainPlan, result: TrainResult, update: LocalUpdate) -> dict[str, object]:
    """The released values a round's receipt signs: the result's DP numbers and the
    ``result.tensor_digest`` of each update tensor (``federation.training.train_payload``)."""
    return train_payload(
        result,
        job_id=plan.job_id,
        round=plan.round,
        shapes=plan.shapes,
        digests=tensor_digests(update.weights, result.tensor_digest),
    )


class SpareBuffers:
    """One set of model-sized buffers kept from a finished round for the next round.

    A node receives each round's global weights into fresh memory, and the kernel zeroes
    every page of it on first touch: about 0.25 CPU-s per 100M parameters per round on the
    2-core benchmark machine, 10% of the node's CPU there. Rounds of a job have one layout,
    so the node gives the buffers its update was streamed from back here, and the next
    round with the same layout receives into them instead.

    What the buffers hold between rounds is the update the node has just released (the
    service gives them back only after the last byte was sent). They are dropped after
    ``idle_s`` seconds without a round, so an idle node does not keep a model's memory.
    """

    def __init__(self, *, idle_s: float = 60.0) -> None:
        """Hold nothing yet; drop whatever is held after ``idle_s`` seconds unused."""
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._held: dict[str, npt.NDArray[np.float32]] | None = None
        self._timer: threading.Timer | None = None
        # Which give() a timer belongs to: a timer that fires as a newer give() replaces the
        # buffers must not drop the new ones (cancel() cannot stop one already running).
        self._generation = 0
        self._closed = False

    def take(self, headers: Sequence[TensorHeader]) -> dict[str, npt.NDArray[np.float32]] | None:
        """The held buffers if they fit ``headers`` (then no longer held), else None."""
        with self._lock:
            held, self._held = self._held, None
            self._cancel_timer()
        return held if held is not None and fits(held, headers) else None

    def give(self, arrays: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Hold ``arrays`` for the next round (replacing what was held)."""
        with self._lock:
            if self._closed:
                return  # the node is stopping: a round that outlived the grace period
            self._held = dict(arrays)
            self._generation += 1
            self._cancel_timer()
            self._timer = threading.Timer(self._idle_s, self._drop, args=(self._generation,))
            self._timer.daemon = True
            self._timer.start()

    def close(self) -> None:
        """Drop what is held and stop the idle timer for good (the node is stopping)."""
        with self._lock:
            self._closed = True
            self._held = None
            self._generation += 1
            self._cancel_timer()

    @property
    def holding(self) -> bool:
        """Whether buffers are held now."""
        with self._lock:
            return self._held is not None

    def _drop(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._held = None
                self._timer = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
