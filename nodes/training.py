"""DP-SGD at the node: plan a training round (validate + describe its charge), then train.

``plan_training`` checks a Train request against the public schema and the consumer's
policy, picks the noise multiplier from the node's own accountant and builds the round's
``Charge`` before any data is touched. ``TrainingEngine.train`` then runs ``local_steps``
DP-SGD steps on in-memory tensors and releases the new local weights, a DP example count
and (optionally) DP validation metrics.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133, Alg. 1), as Opacus implements it:

- Poisson sampling: each training record joins a step's batch independently with
  probability ``sample_rate`` (drawn exactly, as a Bernoulli process with geometric gaps).
- Per-sample clipping: every record's gradient is scaled to L2 norm <= ``clip_norm``.
- Gaussian noise N(0, (noise_multiplier * clip_norm)**2) is added to the sum of clipped
  gradients, which is divided by the expected batch size ``sample_rate * n_dp``, where
  ``n_dp`` is the round's released DP count of training records (post-processing). Opacus'
  ``DPOptimizer`` divides by ``sample_rate * n`` with the true ``n``; since the update's
  noise spread is ``lr * sigma / divisor``, that would publish ``n`` exactly. Then one
  plain SGD step is taken.

Neighbouring relation: add or remove one record. Accounting: the Sampled Gaussian
Mechanism's RDP (Mironov, Talwar, Zhang 2019, arXiv:1908.10530), via
``subsampled_gaussian_charge``. The noise multiplier is Opacus' ``get_noise_multiplier``
(RDP) for the *whole job* (``total_rounds * local_steps`` steps) at
``(1 - EXAMPLES_EPSILON_SHARE) * target_epsilon``; the per-round DP example counts take the
remaining share, so the job's composed spend at this node ends at or just below
``target_epsilon``. Each round is charged its part (update + count + metrics); validation
metrics, if asked for, cost ``metrics_epsilon`` per round on top. As in Opacus, the
gradient noise is floating-point Gaussian, but its bits come from AES-128-CTR under a
128-bit key drawn from the injected ``rng`` (``nodes.noise``), not from torch's generator,
whose seed keeps 32 bits; counts and metric sums use the integer mechanisms of
``federation.privacy``.

Per-sample gradient norms for the built-in Linear/ReLU stacks use the outer-product
identity (Goodfellow 2015, arXiv:1510.01799; "ghost clipping", Li et al. 2021,
arXiv:2110.05679): a Linear layer's per-sample weight gradient is ``g_i a_i^T``, so its norm
is ``|g_i| |a_i|`` and the clipped sum is ``(c * G)^T A``, exact and as cheap as a plain
backward pass. Other (operator-registered) architectures use ``torch.func`` (``vmap`` of
``grad``), also exact.

Two floating-point rules keep a coordinator's weights (finite, but as large as it likes)
from defeating the clipping or the noise. A record whose gradient or norm overflows
(inf/NaN) contributes nothing to the sum, so every record's contribution stays finite with
norm <= ``clip_norm``. And the noise is added to the clipped sum before the sum touches
the weights: the sum (accumulated over records in float64) and the noise meet in a
float64 buffer, rounding far below the noise's scale, and each weight then takes one add
of ``-step * (sum + noise)`` rounded to float32, a function of the noisy sum
(post-processing). In float32 (as in Opacus) a sum over millions of records that all push
one coordinate grows in steps wider than the noise, which then rounds away. Adding the sum to the
weights and then the noise would round ``w - step * sum`` first, and with weights whose
float spacing is near ``step * clip_norm`` that rounding reveals the un-noised sum.

Records are split once, by a public rule, into training (90%) and held-out (10%) parts:
a record is held out iff a 64-bit hash of *its own values* is 0 mod 10, so adding or
removing one record changes one part by that record and nothing else.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from federation.errors import BudgetExhaustedError, ConfigError, InvalidRequestError, PolicyError
from federation.models import (
    MODEL_REGISTRY,
    PROBE_TOLERANCE,
    ModelBuilder,
    ModelSpec,
    arrays_to_state,
    build_model,
    check_arrays,
    encode_features,
    has_unsaved_buffers,
    input_dim,
    probe_difference,
    probe_logits,
    state_shapes,
    state_to_arrays,
    state_views,
)
from federation.privacy import (
    Charge,
    RandomSource,
    add_noise,
)
from federation.privacy.training import EXAMPLES_EPSILON_SHARE, job_spend, round_charges
from federation.queries import Mechanism
from federation.releases import NoiseInfo
from federation.schema import ColumnType, DatasetSchema
from nodes.analytics import _grid
from nodes.config import ConsumerPolicy
from nodes.data import Table
from nodes.noise import KEY_BYTES, GaussianStream

__all__ = [
    "EXAMPLES_EPSILON_SHARE",
    "HOLDOUT_BUCKETS",
    "LOSS_UPPER",
    "MAX_LOCAL_STEPS",
    "LocalUpdate",
    "TrainPlan",
    "TrainingEngine",
    "check_weights",
    "clip_per_sample",
    "clipped_gradient_sum",
    "holdout_mask",
    "job_epsilon",
    "per_sample_gradients",
    "plan_training",
    "poisson_sample",
]

HOLDOUT_BUCKETS = 10  # one record in HOLDOUT_BUCKETS (by hash of its values) is held out
LOSS_UPPER = 10.0  # per-record validation loss is clamped to [0, LOSS_UPPER]
MAX_LOCAL_STEPS = 10_000
# Below this a step samples nobody from any real table (1e-9 * 1e9 records = 1), and near
# 1e-18 the geometric gaps of Poisson sampling overflow int64.
MIN_SAMPLE_RATE = 1e-9
MAX_LEARNING_RATE = 1e3
MAX_CLIP_NORM = 1e6
# Below this, float32 cannot carry the clip or the noise: at clip_norm 2**-150 the noise
# sigma * clip_norm rounds to exactly 0 while the clipped sum does not (a noiseless update).
MIN_CLIP_NORM = 1e-6
_MAX_JOB_ID = 128
_CLIP_EPS = 1e-6  # as Opacus: factor = clip_norm / (norm + 1e-6), so clipped norm < clip_norm
log = logging.getLogger(__name__)

_EVAL_BATCH = 65_536
# Built-in stacks (ghost clipping): at most this many activation values (records x the
# stack's summed layer widths) at once, forward and backward, float32 and float64 copies
# together about 80 MiB; a batch held whole (factored) may take up to a quarter of the
# parameter count if that is more (_ghost_rows). A larger batch goes through in chunks of
# records into float64 sums the size of the model, so a large sample rate can never make
# memory grow with the data after the charge (a failure there would depend on the batch
# size: on the data).
_GHOST_VALUES = 1 << 22
# At most this many per-sample gradient values at once (64 MiB of float32; vmap's
# intermediates take a few times that): an operator's architecture's batches go through
# in chunks of records.
_PER_SAMPLE_VALUES = 1 << 24
_DATA_CACHE_ENTRIES = 4
# On CPU, noise is drawn 65536 values (512 KiB of float64) at a time into one reused
# buffer; with its float32 copy and the weights' slice a block's working set is about
# 1 MiB, in a core's L2 cache. Fewer, larger blocks than torch's intra-op grain size
# (32768) cost less Python per step: at 100M parameters x 2 nodes the nodes used 2.60 CPU-s
# per round against 2.72-2.75 with 32768 blocks; 131072 (2 MiB working set) gave 2.53-
# 2.64, but 13.5-13.8 CPU-s against 13.1 at 8 nodes sharing the 2 cores (65536: 13.3).
# benchmarks/training.py --sizes 100M [--nodes 8], 2026-12-05/06, single runs: within
# the VM's run-to-run noise of a few percent. Slices past the grain size would fan out to
# worker threads, which cost far more than the add when other processes share the cores
# (measured: 0.9 s vs 3 s per 100M values), so the block loop runs on one thread
# (``_one_cpu_thread``); a round that overlaps another's loop may fan out (speed only).
_NOISE_CHUNK_CPU = 1 << 16
_NOISE_CHUNK_DEVICE = 1 << 24  # accelerators: large slices (one kernel launch each)
_THREADS_LOCK = threading.Lock()  # held while a step has torch on one thread (_one_cpu_thread)


# ------------------------------------------------------------------ planning (no data)


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """A validated training round and what it will cost, built before touching data.

    Attributes:
        spec: the model.
        round: 0-based round index, ``< total_rounds``.
        total_rounds: rounds the job runs (the noise multiplier budgets all of them).
        target_epsilon: epsilon the whole job may spend at this node.
        delta: the job's delta.
        sample_rate: Poisson sampling probability per step.
        local_steps: DP-SGD steps this round.
        learning_rate: SGD step size.
        clip_norm: per-sample gradient L2 clip.
        noise_multiplier: chosen by the node's accountant for the job.
        charge: this round's composed charge (update + example count + metrics).
        metrics_epsilon: epsilon of this round's validation metrics (0: none).
        job_id: groups the rounds of one job.
        update_charge: the DP-SGD part of ``charge``.
        examples_charge: the example-count part of ``charge``.
        metrics_charges: count, loss-sum and accuracy-sum parts (empty without metrics).
        input_dim: the model's input width.
        weight_shapes: ``(name, shape)`` of every tensor the global weights must contain.
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
    noise_multiplier: float
    charge: Charge
    metrics_epsilon: float
    job_id: str
    update_charge: Charge
    examples_charge: Charge
    metrics_charges: tuple[Charge, ...]
    input_dim: int
    weight_shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the weights this plan's model takes and releases."""
        return dict(self.weight_shapes)


def plan_training(
    *,
    spec: ModelSpec,
    round: int,  # the protocol's field name (shadows the builtin here only)
    total_rounds: int,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    local_steps: int,
    learning_rate: float,
    clip_norm: float,
    metrics_epsilon: float,
    job_id: str,
    schema: DatasetSchema,
    policy: ConsumerPolicy,
    registry: Mapping[str, ModelBuilder] = MODEL_REGISTRY,
) -> TrainPlan:
    """Validate a training round against schema and policy and describe its charge.

    Nothing here reads data, and a refused request changes no state. The "train"
    permission itself is checked by the guard, not here.

    Returns:
        The plan; ``plan.charge`` is what the ledger must record before ``train`` runs.

    Raises:
        InvalidRequestError: a malformed or out-of-range field, an unknown architecture,
            bad features or target, or a hyper-parameter outside the operator's policy
            (more rounds than ``max_rounds``, a noise multiplier below
            ``noise_multiplier_floor``).
        PolicyError: the architecture is not in the consumer's ``allowed_models``, or
            ``delta`` exceeds the per-release cap.
        BudgetExhaustedError: the job's whole spend (every round's update, count and
            metrics, composed) exceeds the consumer's per-release cap: a training job is
            one release.
    """
    _check_schedule(round, total_rounds, local_steps, job_id)
    _check_numbers(sample_rate, learning_rate, clip_norm)
    _check_privacy(target_epsilon, delta, metrics_epsilon, policy)
    dim = _check_data(spec, schema)
    shapes = _check_model(spec, dim, policy, registry)
    if total_rounds > policy.max_rounds:
        raise InvalidRequestError(
            f"total_rounds {total_rounds} exceeds this node's max_rounds of "
            f"{policy.max_rounds} for consumer {policy.name!r}; run fewer rounds"
        )
    _, _, loss_sensitivity = _loss_grid()
    charges = round_charges(
        target_epsilon=target_epsilon,
        metrics_epsilon=metrics_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        local_steps=local_steps,
        total_rounds=total_rounds,
        loss_sensitivity=loss_sensitivity,
    )
    sigma = charges.noise_multiplier
    if sigma < policy.noise_multiplier_floor:
        raise InvalidRequestError(
            f"target_epsilon {target_epsilon:g} over {total_rounds} rounds x {local_steps} "
            f"steps at sample_rate {sample_rate:g} needs noise_multiplier {sigma:.4g}, below "
            f"this node's noise_multiplier_floor of {policy.noise_multiplier_floor:g}; ask "
            "for a smaller epsilon, fewer rounds or steps, or a lower sample rate"
        )
    _check_float32_noise(sigma, clip_norm)
    charge = charges.total
    # A training job is one release: all its rounds, composed (the metrics too), must fit
    # the cap, not only target_epsilon (the DP-SGD and counts' share). A coordinator
    # computes the same (federation.privacy.training) before it asks any node.
    whole = job_spend(charge, total_rounds).epsilon_at(delta)
    if whole > policy.max_epsilon_per_release:
        raise BudgetExhaustedError(
            f"this job would cost epsilon {whole:.4g} over its {total_rounds} rounds (update, "
            f"example count and metrics together), above this node's per-release cap of "
            f"{policy.max_epsilon_per_release:g} for consumer {policy.name!r} (a training job "
            "is one release); ask for less target or metrics epsilon"
        )
    return TrainPlan(
        spec=spec,
        round=round,
        total_rounds=total_rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        local_steps=local_steps,
        learning_rate=learning_rate,
        clip_norm=clip_norm,
        noise_multiplier=sigma,
        charge=charge,
        metrics_epsilon=metrics_epsilon,
        job_id=job_id,
        update_charge=charges.update,
        examples_charge=charges.examples,
        metrics_charges=charges.metrics,
        input_dim=dim,
        weight_shapes=tuple(shapes.items()),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_schedule(round_: int, total_rounds: int, local_steps: int, job_id: str) -> None:
    if not _is_int(total_rounds) or total_rounds < 1:
        raise InvalidRequestError(f"total_rounds must be an integer >= 1; got {total_rounds!r}")
    if not _is_int(round_) or not 0 <= round_ < total_rounds:
        raise InvalidRequestError(
            f"round must be an integer in [0, total_rounds={total_rounds}); got {round_!r}"
        )
    if not _is_int(local_steps) or not 1 <= local_steps <= MAX_LOCAL_STEPS:
        raise InvalidRequestError(
            f"local_steps must be an integer 1-{MAX_LOCAL_STEPS}; got {local_steps!r}"
        )
    if not (0 < len(job_id) <= _MAX_JOB_ID and job_id.isprintable()):
        raise InvalidRequestError(
            f"job_id must be 1-{_MAX_JOB_ID} printable characters; got {job_id[:_MAX_JOB_ID]!r}"
        )


def _check_numbers(sample_rate: float, learning_rate: float, clip_norm: float) -> None:
    if not (math.isfinite(sample_rate) and MIN_SAMPLE_RATE <= sample_rate <= 1):
        raise InvalidRequestError(
            f"sample_rate must be in [{MIN_SAMPLE_RATE:g}, 1]; got {sample_rate!r}"
        )
    for name, value in (("learning_rate", learning_rate), ("clip_norm", clip_norm)):
        if not (math.isfinite(value) and value > 0):
            raise InvalidRequestError(f"{name} must be a finite number > 0; got {value!r}")
    # Past these, float32 training overflows after the round is charged (INTERNAL, budget
    # spent); refuse up front instead.
    if learning_rate > MAX_LEARNING_RATE:
        raise InvalidRequestError(
            f"learning_rate must be <= {MAX_LEARNING_RATE:g}; got {learning_rate!r}"
        )
    if clip_norm > MAX_CLIP_NORM:
        raise InvalidRequestError(f"clip_norm must be <= {MAX_CLIP_NORM:g}; got {clip_norm!r}")
    if clip_norm < MIN_CLIP_NORM:
        raise InvalidRequestError(f"clip_norm must be >= {MIN_CLIP_NORM:g}; got {clip_norm!r}")


def _check_float32_noise(sigma: float, clip_norm: float) -> None:
    """Refuse a plan whose noise float32 would not carry at the planned multiplier.

    The step adds ``float32(sigma * clip_norm) * z`` to a sum clipped at
    ``float32(clip_norm)``; their ratio must be the multiplier the accountant used.
    """
    scale, clip = float(np.float32(sigma * clip_norm)), float(np.float32(clip_norm))
    tiny = float(np.finfo(np.float32).tiny)
    if not (scale >= tiny and clip >= tiny and abs(scale / clip - sigma) <= 1e-6 * sigma):
        raise InvalidRequestError(
            f"noise multiplier {sigma:.4g} at clip_norm {clip_norm!r} is not representable "
            "in float32 training; ask for a larger clip_norm or a smaller epsilon"
        )


def _check_privacy(
    target_epsilon: float, delta: float, metrics_epsilon: float, policy: ConsumerPolicy
) -> None:
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise InvalidRequestError(
            f"target_epsilon must be a finite number > 0; got {target_epsilon!r}"
        )
    if not (math.isfinite(metrics_epsilon) and metrics_epsilon >= 0):
        raise InvalidRequestError(
            f"metrics_epsilon must be a finite number >= 0 (0: no metrics); got {metrics_epsilon!r}"
        )
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise InvalidRequestError(f"delta must satisfy 0 < delta < 1; got {delta!r}")
    cap = policy.max_epsilon_per_release
    for name, value in (("target_epsilon", target_epsilon), ("metrics_epsilon", metrics_epsilon)):
        if value > cap:
            raise BudgetExhaustedError(
                f"{name} {value:g} exceeds this node's per-release cap of {cap:g} for "
                f"consumer {policy.name!r} (a training job is one release); ask for less"
            )
    if delta > policy.max_delta_per_release:
        raise PolicyError(
            f"delta {delta:g} exceeds this node's per-release cap of "
            f"{policy.max_delta_per_release:g} for consumer {policy.name!r}"
        )


def _check_data(spec: ModelSpec, schema: DatasetSchema) -> int:
    if spec.dataset != schema.name:
        raise InvalidRequestError(
            f"model.dataset {spec.dataset!r} does not match the dataset {schema.name!r}"
        )
    for name in spec.features:
        column = schema.column(name)
        if column.type.is_numeric and not column.has_bounds:
            raise InvalidRequestError(
                f"feature {name!r} has no public bounds in this node's schema; a numeric "
                "feature is scaled by its bounds, so the operator must declare them"
            )
    target = schema.column(spec.target)
    if target.type is not ColumnType.BOOL:
        raise InvalidRequestError(
            f"model.target {spec.target!r} is {target.type.value}; the target must be a bool column"
        )
    return input_dim(spec, schema)


def _check_model(
    spec: ModelSpec, dim: int, policy: ConsumerPolicy, registry: Mapping[str, ModelBuilder]
) -> dict[str, tuple[int, ...]]:
    if spec.architecture not in registry:
        known = ", ".join(sorted(registry))
        raise InvalidRequestError(
            f"model.architecture {spec.architecture!r} is not known to this node; known: {known}"
        )
    if spec.architecture not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models) or "none"
        raise PolicyError(
            f"model.architecture {spec.architecture!r} is not allowed for consumer "
            f"{policy.name!r}; allowed_models: {allowed}"
        )
    with torch.device("meta"):  # checks the hyper-parameters without allocating weights
        model = build_model(spec, input_dim=dim, registry=registry)
    try:
        shapes = state_shapes(model)
        tensors = [*model.parameters(), *model.buffers()]
    except Exception as err:  # an operator's module (say, uninitialised lazy layers)
        raise InvalidRequestError(
            f"architecture {spec.architecture!r} built a module whose state cannot be read "
            f"before training: {type(err).__name__}: {err}"
        ) from err
    if not any(True for _ in model.parameters()):
        raise InvalidRequestError(f"model {spec.architecture!r} has no trainable parameters")
    if any(t.device.type != "meta" for t in tensors):
        # It allocated on a device of its own choosing, ignoring the node's: refuse it
        # rather than let every request allocate a model before any check.
        raise InvalidRequestError(
            f"architecture {spec.architecture!r} puts its tensors on a device itself (or "
            "makes them with torch.from_numpy); its builder must create them on the current "
            "(default) device, e.g. torch.tensor(array) rather than torch.from_numpy(array), "
            "so that the node checks a request without allocating the model"
        )
    # Every tensor the model holds, non-persistent buffers included (not on the wire, but
    # built for real at the node).
    size = sum(t.numel() for t in {id(t): t for t in tensors}.values())
    if size > policy.max_model_parameters:
        raise InvalidRequestError(
            f"model {spec.architecture!r} with hidden {list(spec.hidden)} has {size:,} "
            f"values; this node's max_model_parameters for consumer {policy.name!r} is "
            f"{policy.max_model_parameters:,}"
        )
    return shapes


def _loss_grid() -> tuple[float, float, int]:
    """Granularity, centre and integer sensitivity of the centred loss sum."""
    half = LOSS_UPPER / 2
    granularity = _grid(half, integer=False)
    return granularity, half, round(half / granularity)


def job_epsilon(plan: TrainPlan, *, rounds: int) -> float:
    """Return the epsilon at ``plan.delta`` of ``rounds`` rounds charged like ``plan``.

    The RDP curves of the rounds add up (``Spend``), so this is what the ledger reports
    for the job when each round is charged ``plan.charge``.
    """
    return job_spend(plan.charge, rounds).epsilon_at(plan.delta)


def check_weights(plan: TrainPlan, weights: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Check received global weights before charging: names, shapes, float32, finite.

    Raises:
        InvalidRequestError: see ``federation.models.check_arrays``.
    """
    check_arrays(plan.shapes, weights)


# ------------------------------------------------------------------ DP-SGD primitives


def poisson_sample(n: int, sample_rate: float, rng: RandomSource) -> npt.NDArray[np.int64]:
    """Return the sorted indices of a Poisson sample of ``range(n)``: each kept w.p. q.

    Exact and O(q n): the gaps between kept indices of a Bernoulli(q) process are i.i.d.
    geometric(q) on {1, 2, ...}, so cumulative sums of geometric draws are the sample.
    """
    if sample_rate >= 1.0:
        return np.arange(n, dtype=np.int64)
    chunks: list[npt.NDArray[np.int64]] = []
    last = -1
    expected = n * sample_rate
    while True:
        size = int(expected + 4.0 * math.sqrt(expected) + 16.0)
        # A gap past n ends the sample whatever its size: capping it keeps the sum in int64.
        gaps = np.minimum(rng.geometric(sample_rate, size=size), n + 1)
        kept = last + np.cumsum(gaps, dtype=np.int64)
        if kept[-1] >= n:
            chunks.append(kept[kept < n])
            return np.concatenate(chunks)
        chunks.append(kept)
        last = int(kept[-1])


def _losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.reshape(y.shape), y, reduction="none")


def per_sample_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Return every record's loss gradient per parameter, shaped ``(batch, *param.shape)``.

    ``torch.func``: ``vmap`` over records of ``grad`` of the logistic loss of one record.
    Works for any module that maps one row to one logit.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.binary_cross_entropy_with_logits(out.reshape(()), yi)

    grads: dict[str, torch.Tensor] = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return grads


def _clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    return (clip_norm / (norms + _CLIP_EPS)).clamp(max=1.0)


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each record's gradient (over all parameters) to L2 norm <= ``clip_norm``.

    A record whose norm is not finite (its gradient overflowed) gets zeros: a record
    contributes a finite vector of norm <= ``clip_norm`` or nothing.

    Returns:
        The clipped per-sample gradients and the per-sample norms before clipping.
    """
    squares = [g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()]
    norms = torch.stack(squares).sum(0).sqrt()
    factors = _clip_factors(norms, clip_norm)
    finite = torch.isfinite(norms)
    clipped: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        shape = (-1,) + (1,) * (g.dim() - 1)
        # A record whose gradient overflowed contributes zeros (inf * 0 would be NaN).
        clipped[name] = torch.where(finite.reshape(shape), g * factors.reshape(shape), 0.0)
    return clipped, norms


def _linear_stack(model: nn.Module) -> list[nn.Module] | None:
    """The layers of a plain Linear/ReLU stack ending in one logit (the built-ins), else None.

    Such a stack takes the fast paths: batched metrics and the hand-written per-sample
    backward, both of which assume each row's output is a function of that row alone. So
    the stack must be exactly that: ``nn.Sequential``/``nn.Linear``/``nn.ReLU`` with no
    hook (a forward hook can mix rows), no instance-level ``forward``, and Linear layers
    holding exactly their ``weight`` and ``bias`` (``weight_norm`` adds others). Anything
    else takes the generic per-record path.
    """
    layers = list(model) if type(model) is nn.Sequential else [model]
    if not all(type(layer) in (nn.Linear, nn.ReLU) for layer in layers):
        return None
    if _has_hooks([model, *layers]) or any("forward" in vars(m) for m in (model, *layers)):
        _warn_global_hooks()
        return None
    for layer in layers:
        if layer._buffers or (
            isinstance(layer, nn.Linear) and not set(layer._parameters) <= {"weight", "bias"}
        ):
            return None
    params = [id(p) for layer in layers for p in layer.parameters(recurse=False)]
    if {id(p) for p in model.parameters()} != set(params) or model._buffers:
        # The container holds a tensor of its own (register_parameter on the Sequential):
        # not a plain stack.
        return None
    if len(set(params)) != len(params):
        # A Linear used twice, or two sharing a weight: the per-sample gradient of the
        # shared tensor sums over its uses, whose norm the per-layer identity does not
        # give. The generic path is exact.
        return None
    last = layers[-1]
    return layers if isinstance(last, nn.Linear) and last.out_features == 1 else None


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _has_hooks(modules: list[nn.Module]) -> bool:
    """Whether any of ``modules``, or torch's global module hooks, has a forward or
    backward hook."""
    from torch.nn.modules import module as torch_module

    if any(
        getattr(torch_module, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    ):
        return True
    return any(getattr(m, name, None) for m in modules for name in _HOOK_DICTS)


def _warn_global_hooks() -> None:
    """Say once, in the node's log, when torch's global module hooks cost the fast path."""
    global _WARNED_GLOBAL_HOOKS
    if _WARNED_GLOBAL_HOOKS or not _has_hooks([]):
        return
    _WARNED_GLOBAL_HOOKS = True
    log.warning(
        "global torch module hooks are installed in this process (a profiler, a module "
        "tracker, an operator's builder?): every model trains on the slower per-record path"
    )


_WARNED_GLOBAL_HOOKS = False


def _leaked_record_values(model: nn.Module) -> list[str]:
    """Attributes of ``model``'s modules that hold a value from inside a per-record pass.

    A forward that keeps ``x`` (or anything computed from it) in a Python attribute keeps
    a torch.func wrapper of the batch; the next per-record pass would read it as batched,
    so record i would see another call's record i. Found by review; such a module is
    refused before the charge (``preflight``) and, should it slip past, after the pass
    (nothing released).
    """
    leaked = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if _holds_wrapped_tensor(value, depth=3):
                leaked.append(f"{name + '.' if name else ''}{key}")
    return leaked


def _holds_wrapped_tensor(value: object, *, depth: int) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(value))
    if depth == 0:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_wrapped_tensor(v, depth=depth - 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_wrapped_tensor(v, depth=depth - 1) for v in value.values())
    return False


def _check_no_leak(model: nn.Module) -> None:
    """Refuse a model whose forward kept a per-record value (see ``_leaked_record_values``)."""
    leaked = _leaked_record_values(model)
    if leaked:
        raise RuntimeError(
            f"the model keeps a tensor computed during a per-record pass in "
            f"{', '.join(leaked)} (a record's values, or a cache the next pass would read "
            "stale); its forward must be a function of its parameters, buffers and the "
            "record alone"
        )


def _ghost_factors(
    layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, clip_norm: float
) -> tuple[list[tuple[nn.Linear, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-sample clipping of a Linear/ReLU stack in factored form.

    Forward and backward are written out (no autograd graph): the logistic loss's
    gradient w.r.t. the logit is sigmoid(z) - y, a ReLU passes it where its input is > 0,
    and a Linear layer passes ``g @ W`` down. Row i of every ``g`` is record i's own.

    A record whose norm is not finite contributes nothing (its rows are zeroed).

    Returns:
        ``(layer, scaled, a)`` per Linear layer, whose clipped gradient sum is
        ``scaled.T @ a`` (weight) and ``scaled.sum(0)`` (bias): no per-sample gradient,
        and not even the summed gradient, is materialised (``scaled`` and ``a``, the
        layer's input, are float64: products of float32 values, exact); and the
        per-sample norms before clipping.
    """
    with torch.no_grad():
        inputs: list[torch.Tensor] = []
        h = x
        for layer in layers:
            inputs.append(h)
            h = layer(h)
        g = torch.sigmoid(h).sub_(y.reshape(-1, 1))
        # Norms in float64: in float32 a coordinator's weights could make |g|^2 underflow
        # to 0 (g ~ 1e-23) while |a| ~ 1e19, so a record read as norm 0 went unclipped.
        squares = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        pairs: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        for position in range(len(layers) - 1, -1, -1):
            layer, a = layers[position], inputs[position]
            if isinstance(layer, nn.Linear):
                # |g a^T|^2 + |g|^2 = |g|^2 (|a|^2 + 1): weight and bias parts of the norm.
                a64, g64 = a.double(), g.double()
                input_squares = torch.linalg.vecdot(a64, a64)
                if layer.bias is not None:
                    input_squares += 1.0
                squares.addcmul_(torch.linalg.vecdot(g64, g64), input_squares)
                pairs.append((layer, a64, g64))  # float64 from here on (products too)
                if position > 0:
                    g = g @ layer.weight
            else:  # ReLU: autograd's own backward kernel (passes g where a > 0)
                g = torch.ops.aten.threshold_backward(g, a, 0)
        norms = squares.sqrt_()
        factors = _clip_factors(norms, clip_norm).unsqueeze(1)
        finite = torch.isfinite(norms).unsqueeze(1)
        if not bool(finite.all()):
            # A record whose activations or gradient overflowed (inf/NaN, e.g. under huge
            # weights) contributes nothing: zero its rows, as inf * 0 would be NaN.
            factors = torch.where(finite, factors, 0.0)
            pairs = [
                (layer, torch.where(finite, a, 0.0), torch.where(finite, g, 0.0))
                for layer, a, g in pairs
            ]
        # float64: g * factor rounded to float32 (subnormal for tiny g) could move a
        # record's contribution past the clip.
        # In place: each g here is its own float64 copy, not needed after this.
        scaled = [(layer, g.mul_(factors), a) for layer, a, g in pairs]
    return scaled, norms.to(x.dtype)


def _ghost_rows(layers: list[nn.Module], *, factored: bool = False) -> int:
    """Records per chunk of the ghost-clipping pass: ``_GHOST_VALUES`` activation values
    (about 20 bytes each, float32 and float64 copies together). ``factored``: the most
    records a batch may have to be held whole, without dense sums; a quarter of the
    parameter count in values if that is more (about 5 bytes a parameter, under the 8 of
    the dense float64 sums it saves)."""
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    width = sum(m.in_features + m.out_features for m in linear)
    values = _GHOST_VALUES
    if factored:
        params = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in linear)
        values = max(values, params // 4)
    return max(1, values // max(width, 1))


def _dense_sums(layers: list[nn.Module]) -> dict[int, torch.Tensor]:
    """A float64 zero tensor per parameter of a Linear/ReLU stack, keyed by ``id``."""
    sums: dict[int, torch.Tensor] = {}
    for layer in layers:
        if isinstance(layer, nn.Linear):
            for param in (layer.weight, layer.bias):
                if param is not None:
                    sums[id(param)] = torch.zeros_like(param, dtype=torch.float64)
    return sums


def _ghost_sums64(
    layers: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    clip_norm: float,
    *,
    into: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Clipped gradient sums (float64, dense) of a Linear/ReLU stack, keyed by
    ``id(parameter)``, over chunks of ``_ghost_rows`` records; and the per-sample norms.
    ``into`` (from ``_dense_sums``) is zeroed and reused."""
    if into is None:
        sums = _dense_sums(layers)
    else:
        sums = into
        for total in sums.values():
            total.zero_()
    norms: list[torch.Tensor] = []
    step = _ghost_rows(layers)
    with torch.no_grad():
        for start in range(0, x.shape[0], step):
            pairs, chunk_norms = _ghost_factors(
                layers, x[start : start + step], y[start : start + step], clip_norm
            )
            norms.append(chunk_norms)
            for layer, scaled, a in pairs:
                sums[id(layer.weight)].addmm_(scaled.T, a)
                if layer.bias is not None:
                    sums[id(layer.bias)].add_(scaled.sum(0))
    empty = torch.zeros(0, device=x.device, dtype=x.dtype)
    return sums, torch.cat(norms) if norms else empty


def _ghost_clipped_sum(
    layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, clip_norm: float
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Clipped gradient sum of a Linear/ReLU stack, keyed by ``id(parameter)``."""
    sums, norms = _ghost_sums64(layers, x, y, clip_norm)
    return {key: total.to(x.dtype) for key, total in sums.items()}, norms


def clipped_gradient_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return the sum over records of per-sample gradients clipped to ``clip_norm``.

    Linear/ReLU stacks take the outer-product path (no per-sample gradient is ever
    materialised); any other module takes ``per_sample_gradients`` + ``clip_per_sample``.
    Both are exact.

    Returns:
        Parameter name -> clipped gradient sum, and the per-sample norms before clipping.
    """
    layers = _linear_stack(model)
    if layers is None:
        sums, norms = _chunked_clipped_sum(model, x, y, clip_norm)
        return {name: g.to(x.dtype) for name, g in sums.items()}, norms
    by_id, norms = _ghost_clipped_sum(layers, x, y, clip_norm)
    return {name: by_id[id(p)] for name, p in model.named_parameters()}, norms


def _chunked_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample clipped gradient sums (float64) of any module, a few records at a time.

    Per-sample gradients take (records x parameters) values, and the coordinator chooses
    the sample rate: all at once, a large batch of a large model would exhaust the node's
    memory after the round was charged. Records go through in chunks of at most
    ``_PER_SAMPLE_VALUES`` gradient values (one record at a time for a model larger than
    that), each chunk's clipped gradients summed into float64 totals.
    """
    params = sum(p.numel() for p in model.parameters())
    step = max(1, _PER_SAMPLE_VALUES // max(params, 1))
    sums: dict[str, torch.Tensor] = {}
    norms: list[torch.Tensor] = []
    for start in range(0, x.shape[0], step):
        chunk = per_sample_gradients(model, x[start : start + step], y[start : start + step])
        _check_no_leak(model)
        clipped, chunk_norms = clip_per_sample(chunk, clip_norm)
        del chunk
        norms.append(chunk_norms)
        for name, g in clipped.items():
            part = g.sum(0, dtype=torch.float64)
            if name in sums:
                sums[name] += part
            else:
                sums[name] = part
    if not norms:  # no records: zero sums
        sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        return sums, torch.zeros(0, dtype=x.dtype, device=x.device)
    return sums, torch.cat(norms)


# ------------------------------------------------------------------ execution (data)


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    """What one node releases after a round: all of it DP.

    Attributes:
        weights: the new local weights after DP-SGD (float32, C-contiguous), same names
            and shapes as the global weights received.
        noisy_examples: DP count of the training records (for weighting; may be < 0).
        examples_noise: how ``noisy_examples`` was noised.
        metrics: ``(name, value, noise)`` DP validation metrics ("loss", "accuracy") of
            the new local weights on the held-out records; empty without metrics.
        steps: DP-SGD steps taken.
    """

    weights: dict[str, npt.NDArray[np.float32]]
    noisy_examples: float
    examples_noise: NoiseInfo
    metrics: tuple[tuple[str, float, NoiseInfo], ...]
    steps: int


@dataclass(frozen=True, slots=True)
class _Tensors:
    train_x: torch.Tensor
    train_y: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor


def _mix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser (array arithmetic wraps modulo 2**64 silently)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_mask(table: Table) -> npt.NDArray[np.bool_]:
    """Return which records are held out: hash of the record's own values mod 10 == 0.

    The rule is public and depends on nothing but the record, so neighbouring datasets
    split every shared record the same way.
    """
    h = np.zeros(table.rows, dtype=np.uint64)
    for index, column in enumerate(table.schema.columns):
        values = np.ascontiguousarray(table.column(column.name))
        if values.dtype.itemsize == 8:
            bits = values.view(np.uint64)
        else:
            bits = values.astype(np.int64).view(np.uint64)
        salt = np.uint64(((index + 1) * 0x9E3779B97F4A7C15) % 2**64)
        h = _mix64(h ^ _mix64(bits + salt))
    return np.asarray(h % np.uint64(HOLDOUT_BUCKETS) == 0)


def _feature_matrix(table: Table, features: tuple[str, ...]) -> npt.NDArray[np.float32]:
    """Inputs in [0, 1]: numeric by public bounds (clamped), bools 0/1, categories one-hot."""
    return encode_features(table.columns, features=features, schema=table.schema)


# A parameter's clipped gradient sum as rows (the parameter viewed as ``(rows, row_len)``):
# dense, or a Linear weight's factored ``(scaled, a)`` whose rows ``r`` are
# ``scaled[:, r].T @ a``.
_GradientRows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class _Piece:
    """Rows ``start:stop`` of parameter ``param`` and the noise-buffer slice that holds them."""

    param: int
    start: int
    stop: int
    target: torch.Tensor  # the parameter's rows, shaped (stop - start, row_len)
    source: torch.Tensor  # the buffer's slice, same shape


def _rows(param: torch.Tensor) -> torch.Tensor:
    """``param`` viewed as ``(rows, row_len)``: a weight's own rows; a vector's values."""
    flat = param.detach()
    if flat.dim() >= 2:  # (not -1: a zero-size view cannot infer it)
        return flat.view(flat.shape[0], math.prod(flat.shape[1:]))
    return flat.view(-1, 1)


class _Stepper:
    """DP-SGD steps on one model, updating its parameters in place.

    ``param -= step_size * (clipped gradient sum + N(0, sigma^2))``, without a gradient or
    noise tensor the size of the model. The parameters are cut into row blocks of up to
    65536 values (several small tensors share a block); per block, the noise is drawn into
    a small reused buffer, the block's part of the clipped sum is added to it (a Linear
    layer's as a rank-B ``addmm_``, B = batch size), and the block of weights takes the
    noisy sum in one add. The noise is the same N(0, sigma^2) per coordinate as Opacus
    adds, and, as there, it joins the sum before the weights see it (see the module
    docstring); only the memory traffic differs.
    """

    def __init__(
        self,
        model: nn.Module,
        data: _Tensors,
        plan: TrainPlan,
        noise: GaussianStream,
        *,
        examples: float,
    ) -> None:
        self.model = model
        self.data = data
        self.plan = plan
        self.stream = noise
        self.layers = _linear_stack(model)
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.position = {id(param): i for i, (_, param) in enumerate(named)}
        rows = [_rows(param) for _, param in named]
        first = rows[0]
        chunk = _NOISE_CHUNK_CPU if first.device.type == "cpu" else _NOISE_CHUNK_DEVICE
        # A block holds at least one row, so a row wider than the chunk widens the buffer.
        size = min(sum(r.numel() for r in rows), max([chunk] + [r.shape[1] for r in rows]))
        # The clipped sum and the noise meet in float64: in float32 a sum over millions of
        # records that all push one coordinate grows in steps wider than the noise (and
        # than one record), so the noise would round away and one record would show.
        self.noise = torch.empty(size, device=first.device, dtype=torch.float64)
        self.noisy = torch.empty(size, device=first.device, dtype=first.dtype)
        self.batches = _noise_batches(rows, self.noise, self.noisy)
        self.n = data.train_x.shape[0]
        # Divide by the expected batch size q * n_dp, where n_dp is this round's released DP
        # count, never the true n: the update's noise spread is lr * sigma / (q * divisor),
        # so a true-n divisor would publish n exactly (Opacus uses the true n here).
        self.step_size = plan.learning_rate / max(plan.sample_rate * examples, 1.0)
        self.sigma = plan.noise_multiplier * plan.clip_norm
        # Batches past _ghost_rows records take dense float64 sums (8 bytes a parameter).
        # Whether this round needs them is decided here, from the released DP count, its
        # public noise scale and the sample rate, never from a batch's size: the memory a
        # round takes (and so whether it fails after the charge) must not depend on the
        # data. Only a batch 10 standard deviations past that bound (counting the count's
        # noise 10 scales up) allocates them later: a negligible chance.
        self.dense: dict[int, torch.Tensor] | None = None
        if self.layers is not None:
            count_scale = plan.examples_charge.noise_scale
            high = plan.sample_rate * (max(examples, 0.0) + 10.0 * count_scale)
            if high + 10.0 * math.sqrt(high + 1.0) > _ghost_rows(self.layers, factored=True):
                self.dense = _dense_sums(self.layers)

    def step(self, rng: RandomSource) -> None:
        """Sample a Poisson batch, take an SGD step on its clipped sum plus Gaussian noise."""
        plan = self.plan
        index = torch.from_numpy(poisson_sample(self.n, plan.sample_rate, rng))
        index = index.to(self.data.train_x.device)
        with torch.no_grad():
            sums = None
            if index.numel():
                sums = self._clipped_sum(self.data.train_x[index], self.data.train_y[index])
            with _one_cpu_thread(self.noise.device):
                for noise, noisy, pieces, targets, sources in self.batches:
                    self.stream.fill(noise, self.sigma)
                    if sums is not None:
                        for piece in pieces:
                            _add_rows(piece.source, sums[piece.param], piece.start, piece.stop)
                    noisy.copy_(noise)  # rounding the noisy sum: post-processing
                    torch._foreach_add_(targets, sources, alpha=-self.step_size)

    def _clipped_sum(self, x: torch.Tensor, y: torch.Tensor) -> list[_GradientRows]:
        """The clipped gradient sum of every parameter, as rows, in parameter order."""
        # Summed over records in float64 (see __init__): each record's clipped part is
        # float32, the sum of them is not rounded to float32 again.
        if self.layers is None:
            totals, _ = _chunked_clipped_sum(self.model, x, y, self.plan.clip_norm)
            return [_rows(totals[name]) for name in self.names]
        # A Linear/ReLU stack: its parameters are exactly its layers' weights and biases.
        if self.dense is not None or x.shape[0] > _ghost_rows(self.layers, factored=True):
            # A batch too large to hold factored: chunks of records into dense float64
            # sums (memory the model's size, never the batch's).
            if self.dense is None:  # a batch far past its expected size (see __init__)
                self.dense = _dense_sums(self.layers)
            dense, _ = _ghost_sums64(self.layers, x, y, self.plan.clip_norm, into=self.dense)
            return [_rows(dense[id(p)]) for _, p in self.model.named_parameters()]
        sums: dict[int, _GradientRows] = {}
        pairs, _ = _ghost_factors(self.layers, x, y, self.plan.clip_norm)
        for layer, scaled, a in pairs:
            # float64 products: a product of two float32 numbers is exact there, so no
            # rounding of the un-noised sum can lean one way over millions of records.
            sums[self.position[id(layer.weight)]] = (scaled, a)
            if layer.bias is not None:
                sums[self.position[id(layer.bias)]] = scaled.sum(0).unsqueeze(1)
        return [sums[i] for i in range(len(self.names))]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN (a NaN sentinel is unchanged)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _check_buffers_kept(
    model: nn.Module, before: Mapping[str, torch.Tensor], architecture: str
) -> None:
    """Refuse to release a model whose buffers training changed (they carry no noise)."""
    for name, buffer in model.named_buffers():
        if name not in before or not _same(buffer, before[name]):
            raise RuntimeError(
                f"architecture {architecture!r} changed its buffer {name!r} while training "
                "in eval mode; buffers are released without noise, so nothing is released"
            )


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block loop's many small CPU ops on the calling thread only.

    Each block's ops are small (65536 values); torch and the BLAS would still wake their
    worker threads for some (a rank-B ``addmm_`` does), and with passive OpenMP waiting
    (``python -m nodes``) each wake-up costs more than the op: 0.21 s against 0.03 s for
    a 100M-parameter step's 3,000 blocks of 32768 values, measured.

    ``torch.set_num_threads`` is process-wide: torch work on other threads meanwhile runs
    on one thread too (speed only, never results). A node trains one round at a time by
    default (``max_concurrent_trainings``); when rounds overlap, only one lowers the
    count at a time and the others leave it alone.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not _THREADS_LOCK.acquire(blocking=False):
        yield
        return
    try:
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
    finally:
        _THREADS_LOCK.release()


def _add_rows(out: torch.Tensor, part: _GradientRows, start: int, stop: int) -> None:
    """``out += rows start:stop`` of a parameter's clipped gradient sum (all float64)."""
    if isinstance(part, tuple):
        scaled, a = part
        out.addmm_(scaled[:, start:stop].T, a)
    else:
        out.add_(part[start:stop])


_Batch = tuple[torch.Tensor, torch.Tensor, list[_Piece], list[torch.Tensor], list[torch.Tensor]]


def _noise_batches(
    rows: list[torch.Tensor], noise: torch.Tensor, out: torch.Tensor
) -> list[_Batch]:
    """Pack every row of ``rows`` (parameters as ``(rows, row_len)``) into noise draws.

    Returns, per draw of at most ``noise.numel()`` values: the part of ``noise`` (where
    noise and clipped sum meet) to fill, the same part of ``out`` (the same values in the
    weights' dtype), the pieces (whole rows of one parameter each, their ``source`` in
    ``noise``), and the pieces' targets with their slices of ``out``, as lists for
    ``_foreach_add_``. Small tensors share one draw (a small model takes one noise fill
    and one ``_foreach_add_`` per step) and large ones span several. Together the pieces
    cover each coordinate exactly once. Every row fits in ``noise``.
    """
    size = noise.numel()
    batches: list[_Batch] = []
    pieces: list[_Piece] = []
    outs: list[torch.Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal pieces, outs, filled
        if pieces:
            batches.append((noise[:filled], out[:filled], pieces, [p.target for p in pieces], outs))
        pieces, outs, filled = [], [], 0

    for param, matrix in enumerate(rows):
        count, width = matrix.shape
        if matrix.numel() == 0:
            continue
        start = 0
        while start < count:
            take = min(count - start, (size - filled) // width)
            if take == 0:
                flush()
                continue
            source = noise[filled : filled + take * width].view(take, width)
            pieces.append(_Piece(param, start, start + take, matrix[start : start + take], source))
            outs.append(out[filled : filled + take * width].view(take, width))
            start += take
            filled += take * width
            if filled == size:
                flush()
    flush()
    return batches


class TrainingEngine:
    """DP-SGD over one in-memory table; feature tensors are cached per (features, target)."""

    def __init__(
        self,
        table: Table,
        *,
        device: str = "cpu",
        registry: Mapping[str, ModelBuilder] = MODEL_REGISTRY,
    ) -> None:
        """Wrap ``table``; ``device`` is a torch device name ("cpu", "cuda", "cuda:1").

        Raises:
            ConfigError: ``device`` is not a usable torch device.
        """
        try:
            self.device = torch.device(device)
            # What a round needs of the device: memory and the noise stream's ops on it.
            GaussianStream(bytes(KEY_BYTES), device=self.device, pool=2).fill(
                torch.empty(1, device=self.device)
            )
        except (RuntimeError, AssertionError, NotImplementedError, ValueError) as err:
            # torch's own message can run to a paragraph (linker hints): keep its gist.
            gist = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if device.startswith("cuda") and not torch.cuda.is_available():
                build = torch.version.cuda or "none (a CPU-only build)"
                gist = f"torch {torch.__version__} sees no CUDA device (its CUDA: {build})"
            raise ConfigError(f"training device {device!r} is not available: {gist}") from err
        self.table = table
        self.registry = registry
        self._lock = threading.Lock()
        self._holdout: npt.NDArray[np.bool_] | None = None
        self._cache: OrderedDict[tuple[tuple[str, ...], str], _Tensors] = OrderedDict()

    def train(
        self,
        plan: TrainPlan,
        global_weights: Mapping[str, npt.NDArray[np.generic]],
        *,
        rng: RandomSource,
        noise_key: bytes | None = None,
        in_place: bool = False,
    ) -> LocalUpdate:
        """Run one round of DP-SGD from ``global_weights`` and return the DP release.

        Call only once ``plan.charge`` is durable in the ledger. Every random draw
        (sampling, count and metric noise) comes from ``rng``; the gradient noise comes
        from AES-128-CTR under ``noise_key`` (16 bytes, for this round only), by default
        the first 16 bytes ``rng`` gives. A node's Train handler passes a key of its own
        from the OS CSPRNG (and its ``rng`` is itself AES-CTR, ``nodes.noise.CryptoRandom``),
        so nothing the round releases bears on the noise key; tests leave it out to
        reproduce a round from a seeded numpy ``rng`` alone.

        With ``in_place`` the engine takes ``global_weights`` over: on a CPU device, their
        (writable, float32, C-contiguous) buffers become the model's parameters, DP-SGD
        updates them, and the update's ``weights`` are those same arrays, so a round
        makes no copy of the model (the node's Train handler, which owns the received
        buffers, uses this). Without it ``global_weights`` are left untouched.

        Raises:
            InvalidRequestError: the plan is for another dataset, or the weights do not
                fit the model (names, shapes, float32, finite).
        """
        if plan.spec.dataset != self.table.schema.name:
            raise InvalidRequestError(
                f"plan is for dataset {plan.spec.dataset!r}, not {self.table.schema.name!r}"
            )
        check_weights(plan, global_weights)
        data = self._tensors(plan.spec.features, plan.spec.target)
        model = self._model(plan, global_weights, in_place=in_place)
        # Eval mode throughout: a layer whose output mixes the batch (BatchNorm's batch
        # statistics) would break per-sample clipping, and its running statistics, updated
        # by forward passes over records, would leave in the weights without noise. In
        # eval mode BatchNorm is a fixed map of the statistics received, Dropout the
        # identity; the check below catches an architecture that changes a buffer anyway.
        model.eval()
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        stream = GaussianStream(
            rng.bytes(KEY_BYTES) if noise_key is None else noise_key,
            device=self.device,
            pool=max(1, sum(p.numel() for p in model.parameters()) * plan.local_steps),
        )
        # The DP count comes first: the steps normalise by it (post-processing), not by n.
        examples = add_noise(
            np.array([data.train_x.shape[0]], dtype=np.int64), plan.examples_charge, rng=rng
        )
        stepper = _Stepper(model, data, plan, stream, examples=float(examples[0]))
        for _ in range(plan.local_steps):
            stepper.step(rng)
        metrics = self._metrics(model, data, plan, rng) if plan.metrics_charges else ()
        _check_buffers_kept(model, buffers, plan.spec.architecture)
        return LocalUpdate(
            weights=state_views(model) if in_place else state_to_arrays(model),
            noisy_examples=float(examples[0]),
            examples_noise=_noise_info(plan.examples_charge, granularity=1.0),
            metrics=metrics,
            steps=plan.local_steps,
        )

    def preflight(
        self,
        plan: TrainPlan,
        weights: Mapping[str, npt.NDArray[np.generic]],
        *,
        probe_logits: Sequence[float] = (),
    ) -> None:
        """Check, before the charge, that this round can train without touching any record.

        With ``probe_logits`` (the coordinator's build's outputs on the public probe rows
        with these weights, ``federation.models.probe_logits``), this node's build must
        give the same, within ``PROBE_TOLERANCE``: the two builders of an operator's
        architecture could agree on every tensor name and shape and still compute
        different functions, and the coordinator would average them as one.

        The built-in Linear/ReLU stacks always can. An operator's architecture runs one
        DP-SGD gradient and one evaluation pass on two made-up rows (zeros, labels 0 and
        1), in eval mode as a round does: one that cannot take per-sample gradients (an
        in-place update of a captured tensor, data-dependent control flow) would otherwise
        fail only when a batch holds records, after the charge, and so tell the coordinator
        whether any record was sampled. These passes run on a copy of the weights, so
        ``weights`` are never modified; an architecture that writes a buffer is refused.

        Raises:
            InvalidRequestError: the weights do not fit the plan, the architecture fails
                on the made-up rows, or it computes another function than the
                coordinator's (nothing has been charged).
        """
        with torch.device("meta"):  # the structure alone: no memory, no RNG
            skeleton = build_model(plan.spec, input_dim=plan.input_dim, registry=self.registry)
        plain = _linear_stack(skeleton) is not None
        if plain and not probe_logits:
            return
        check_weights(plan, weights)
        if plain:  # adopted, not copied: the probe runs on copies of its tensors
            model = self._model(plan, weights, in_place=True)
            _check_probe(plan, model, probe_logits, isolate=True)
            return
        # A copy: an operator's forward may write its parameters or buffers (from the
        # made-up rows only), and the round must train from the weights as received.
        model = self._model(plan, weights, in_place=False)
        model.eval()
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        if probe_logits:
            _check_probe(plan, model, probe_logits)
        x = torch.zeros((2, plan.input_dim), device=self.device)
        y = torch.tensor([0.0, 1.0], device=self.device)
        try:
            clipped_gradient_sum(model, x, y, clip_norm=plan.clip_norm)
            with torch.no_grad():
                _record_logits(model)(x)  # as the metrics pass runs it
            _check_buffers_kept(model, buffers, plan.spec.architecture)
        except Exception as err:  # an operator's code: any failure means "cannot train"
            gist = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise InvalidRequestError(
                f"architecture {plan.spec.architecture!r} cannot be trained with per-sample "
                f"clipping at this node: {gist}; nothing was charged"
            ) from err

    def _model(
        self,
        plan: TrainPlan,
        weights: Mapping[str, npt.NDArray[np.generic]],
        *,
        in_place: bool,
    ) -> nn.Module:
        # Built on "meta" then filled from the global weights: no use of global RNG state.
        with torch.device("meta"):
            model = build_model(plan.spec, input_dim=plan.input_dim, registry=self.registry)
        if has_unsaved_buffers(model):
            # A non-persistent buffer (an operator's architecture) is not in the weights,
            # so only the constructor can set it: build for real, RNG state kept.
            with torch.random.fork_rng(devices=[]):
                model = build_model(plan.spec, input_dim=plan.input_dim, registry=self.registry)
            model = model.to(self.device)
        elif in_place:
            # check_weights has run: the arrays fit the model. Adopt them (no copy on CPU).
            state = {name: torch.from_numpy(_adoptable(a)) for name, a in weights.items()}
            model.load_state_dict(
                {name: t.to(self.device) for name, t in state.items()}, assign=True
            )
            return model
        else:
            model = model.to_empty(device=self.device)
        arrays_to_state(model, weights)
        return model

    def _metrics(
        self, model: nn.Module, data: _Tensors, plan: TrainPlan, rng: RandomSource
    ) -> tuple[tuple[str, float, NoiseInfo], ...]:
        """Loss and accuracy on the held-out records as DP means (noisy sum / noisy count)."""
        count_charge, loss_charge, correct_charge = plan.metrics_charges
        granularity, center, _ = _loss_grid()
        loss_grid, correct, n = self._evaluate(model, data, granularity, center)
        noisy = add_noise(np.array([n], dtype=np.int64), count_charge, rng=rng)
        noisy_loss = add_noise(np.array([loss_grid], dtype=np.int64), loss_charge, rng=rng)
        noisy_correct = add_noise(np.array([correct], dtype=np.int64), correct_charge, rng=rng)
        denominator = max(float(noisy[0]), 1.0)
        loss = min(max(center + float(noisy_loss[0]) * granularity / denominator, 0.0), LOSS_UPPER)
        accuracy = min(max(float(noisy_correct[0]) / denominator, 0.0), 1.0)
        # Noise of the numerator in the mean's units (the count's noise is not included).
        loss_noise = _noise_info(loss_charge, granularity=granularity, divisor=denominator)
        correct_noise = _noise_info(correct_charge, granularity=1.0, divisor=denominator)
        return (("loss", loss, loss_noise), ("accuracy", accuracy, correct_noise))

    def _evaluate(
        self, model: nn.Module, data: _Tensors, granularity: float, center: float
    ) -> tuple[int, int, int]:
        """Exact centred loss sum on the grid, correct predictions and held-out count."""
        loss_grid = 0
        correct = 0
        n = data.holdout_x.shape[0]
        logits_of = _record_logits(model)
        layers = _linear_stack(model)
        # A wide model's activations over 65,536 rows would take gigabytes, after the
        # charge. A built-in stack's forward holds two layers' activations, so the widest
        # bounds the batch; an operator's is measured: its modules' outputs for one row.
        if layers is not None:
            per_row = max((m.out_features for m in layers if isinstance(m, nn.Linear)), default=1)
        elif n:
            per_row = _output_values(model, lambda: logits_of(data.holdout_x[:1]))
        else:
            per_row = 1
        batch = min(_EVAL_BATCH, max(1, _GHOST_VALUES // per_row))
        with torch.no_grad():
            for start in range(0, n, batch):
                x = data.holdout_x[start : start + batch]
                y = data.holdout_y[start : start + batch]
                logits = logits_of(x)
                # A record whose logit overflowed (NaN loss) counts as the worst loss: its
                # term stays bounded, and the round does not fail because it is there.
                losses = _losses(logits, y).double().nan_to_num(nan=LOSS_UPPER)
                losses = losses.clamp(0.0, LOSS_UPPER)
                loss_grid += int(torch.round((losses - center) / granularity).sum().item())
                correct += int(((logits > 0) == (y > 0.5)).sum().item())
        return loss_grid, correct, n

    def _tensors(self, features: tuple[str, ...], target: str) -> _Tensors:
        key = (features, target)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._holdout is None:
                self._holdout = holdout_mask(self.table)
            held = self._holdout
        matrix = torch.from_numpy(_feature_matrix(self.table, features))
        labels = torch.from_numpy(self.table.column(target).astype(np.float32))
        keep = torch.from_numpy(~held)
        tensors = _Tensors(
            train_x=matrix[keep].contiguous().to(self.device),
            train_y=labels[keep].contiguous().to(self.device),
            holdout_x=matrix[~keep].contiguous().to(self.device),
            holdout_y=labels[~keep].contiguous().to(self.device),
        )
        with self._lock:
            self._cache[key] = tensors
            while len(self._cache) > _DATA_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return tensors


def _check_probe(
    plan: TrainPlan, model: nn.Module, expected: Sequence[float], *, isolate: bool = False
) -> None:
    """Refuse a round whose model here computes another function than the coordinator's.

    ``isolate``: run the forward on copies of the tensors, for a model that adopted the
    received weights. A plain stack's own forward writes nothing, but a global hook or a
    patched ``nn.Linear.forward`` installed by operator code since the stack was checked
    could; without ``isolate``, the model must be a copy (a buffer the forward writes is
    then caught by preflight's buffer check).
    """
    name = plan.spec.architecture
    try:
        got = probe_logits(model, plan.input_dim, isolate=isolate)
    except Exception as err:  # an operator's code
        gist = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise InvalidRequestError(
            f"architecture {name!r} fails on the public probe rows at this node: {gist}; "
            "nothing was charged"
        ) from err
    difference = probe_difference(expected, got)
    if difference > PROBE_TOLERANCE:
        raise InvalidRequestError(
            f"architecture {name!r} at this node computes another function than the "
            f"coordinator's builder of it: with the round's weights, their outputs on the "
            f"public probe rows differ by {difference:.3g} of their scale (at most "
            f"{PROBE_TOLERANCE:g} is taken as the same), though every tensor's name and "
            "shape match. Both sides must build it from the same code (the node's "
            "[architectures] entry and the coordinator's architectures=), and a buffer the "
            "weights do not carry (non-persistent) must not be set from random values; "
            "nothing was charged"
        )


def _output_values(model: nn.Module, run: Callable[[], object]) -> int:
    """How many values ``model``'s modules output, all of them counted, while ``run`` runs.

    Run on one record, an upper bound on the activations a row of an operator's forward
    keeps (a container's output is its last child's, counted twice; values made between
    modules, like a functional ``relu``, are not counted, so it is an estimate).
    """
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return max(total, 1)


def _record_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> one logit per row of x``, each row's a function of that row alone.

    The metrics' noise assumes one record moves only its own loss and correctness terms.
    The built-in stacks are row-wise by construction and run batched. An operator's
    forward might mix rows (``x - x.mean(0)``) or write a parameter from the data while
    gradients are off, so it runs once per row (``vmap``), over copies of the parameters
    and buffers: no row can see another, and what it writes never reaches the release.
    """
    if _linear_stack(model) is not None:
        return lambda x: model(x).reshape(x.shape[0])
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def one(row: torch.Tensor) -> torch.Tensor:
        # A copy of the row too: a forward that writes its input in place (x.mul_(2))
        # changed the engine's cached held-out rows for every later round (review).
        out: torch.Tensor = functional_call(model, (params, buffers), (row.unsqueeze(0).clone(),))
        if out.numel() != 1:
            raise ValueError(f"the model gave {out.numel()} outputs for one row, not 1 logit")
        return out.reshape(())

    def logits(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = vmap(one)(x)
        _check_no_leak(model)
        return out

    return logits


def _adoptable(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """``array`` itself when torch can share it (writable, C-contiguous), else a copy."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, order="C")


def _noise_info(charge: Charge, *, granularity: float, divisor: float = 1.0) -> NoiseInfo:
    return NoiseInfo(
        mechanism=Mechanism.LAPLACE,
        scale=charge.noise_scale * granularity / divisor,
        sensitivity=charge.sensitivity * granularity / divisor,
        granularity=granularity if divisor == 1.0 else 0.0,
    )
