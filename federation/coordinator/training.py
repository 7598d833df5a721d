"""Federated training: rounds of DP-SGD at the nodes, updates streamed back and combined.

Each round the coordinator streams the global weights to every node at once; each node
validates, charges its ledger, runs DP-SGD locally and streams back a DP update (its new
local weights), a DP example count and optional DP validation metrics. The updates are
added, chunk by chunk as they arrive, into one running sum weighted by the noisy counts
(clipped at >= 1); a server optimizer (FedAvg, FedAdam or FedYogi) then moves the global
weights (see ``_aggregate``).

Memory stays bounded whatever the number of nodes: the global weights, one running sum, the
adaptive optimizer's two moments, and one chunk in flight per node. A round has a deadline
(``round_timeout_s``); a node that is unreachable, too slow, refuses (e.g. its budget is
spent) or fails mid-stream is dropped from that round and recorded, and the run goes on as
long as ``min_nodes`` nodes completed the round. A checkpoint is written after every round;
``resume=True`` continues from it with the same job id.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import numbers
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from federation import receipts
from federation._html import training_result_html
from federation._progress import ProgressBar, progress_bar
from federation.architectures import EXTENDED_REGISTRY, registry_with
from federation.coordinator._aggregate import (
    Contribution,
    RunningSum,
    ServerOptimizer,
    ServerOptimizerName,
)
from federation.coordinator._checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_lock,
    load_checkpoint,
    prepare_checkpoint_dir,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
    write_text_durably,
)
from federation.coordinator._history import NodeRound, RoundRecord
from federation.coordinator.client import CallGroup
from federation.errors import (
    ConfigError,
    FederationError,
    InvalidRequestError,
    NodeUnavailableError,
    SchemaMismatchError,
)
from federation.models import (
    PROBE_ROWS,
    ModelBuilder,
    ModelSpec,
    build_model,
    check_arrays,
    has_unsaved_buffers,
    input_dim,
    probe_logits,
    state_shapes,
    state_views,
)
from federation.privacy.training import job_spend, round_charges
from federation.schema import DatasetSchema
from federation.training import (
    DEFAULT_TENSOR_DIGEST,
    LEGACY_TENSOR_DIGEST,
    TensorDigest,
    TrainConfig,
    TrainResult,
    check_tensor_digest,
    tensor_hasher,
    train_payload,
)

if TYPE_CHECKING:
    from federation.coordinator import Coordinator, NodeClient

__all__ = ["NodeRound", "RoundRecord", "TrainingResult", "load_model", "load_schema", "train"]

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[np.float32]]
Evaluator = Callable[[torch.nn.Module], Mapping[str, float]]
"""``train(evaluate=...)``: the global model -> metric name -> value, on the caller's data."""

DEFAULT_SERVER_LR: Mapping[str, float] = {"fedavg": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


# ---------------------------------------------------------------- records


@dataclass
class TrainingResult:
    """The trained global model and the job's history.

    Attributes:
        model: the global model (``torch.nn.Module``, float32, CPU).
        history: one record per round, including rounds before a resume.
        spec: the model spec.
        input_dim: the model's input width (rebuild with ``build_model``).
        job_id: the job's id at the nodes (their ledgers record it with every charge).
        schema: the dataset's public schema the nodes agreed on, which fixes how records
            become model inputs (``federation.models.encode_features``).
        planned_epsilon: what the job costs at each node when every round is charged
            once (``target_epsilon``, plus the metrics' share if asked for); a node whose
            job epsilon ends above it was charged a round twice (a retry).
    """

    model: torch.nn.Module
    history: list[RoundRecord]
    spec: ModelSpec
    input_dim: int
    job_id: str
    schema: DatasetSchema | None = None
    planned_epsilon: float | None = None

    def __repr__(self) -> str:
        """One line: the job, its rounds and each node's job epsilon (not every receipt)."""
        spent: dict[str, float] = {}
        for record in self.history:
            spent.update(record.job_epsilon)
        epsilon = ", ".join(f"{n}: {e:.4g}" for n, e in sorted(spent.items()))
        return (
            f"TrainingResult(job_id={self.job_id!r}, spec={self.spec!r}, "
            f"rounds={len(self.history)}, job_epsilon={{{epsilon}}})"
        )

    def _repr_html_(self) -> str:
        """The history as a table in Jupyter: per round and node, cost and DP count."""
        return training_result_html(self)

    def save(self, path: str | Path) -> Path:
        """Write the model as safetensors, plus ``<path>.json`` with what rebuilds it.

        Load it back with ``load_model(path)``, or in plain torch::

            model = build_model(spec, input_dim=input_dim)
            model.load_state_dict(safetensors.torch.load_file(path))

        Returns:
            The sidecar's path.
        """
        target = Path(path)
        state = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        write_safetensors(target, state, metadata={"format": "federation-model"})
        sidecar = target.with_name(target.name + ".json")
        write_text_durably(
            sidecar,
            json.dumps(
                {
                    "format": "federation-model",
                    "spec": _spec_dict(self.spec),
                    "input_dim": self.input_dim,
                    "job_id": self.job_id,
                    "rounds": len(self.history),
                    "schema": None if self.schema is None else self.schema.to_dict(),
                },
                indent=1,
            ),
        )
        return sidecar


def load_model(
    path: str | Path, *, registry: Mapping[str, ModelBuilder] = EXTENDED_REGISTRY
) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a model that ``TrainingResult.save`` wrote (weights + ``.json`` sidecar).

    Raises:
        ConfigError: the sidecar or the weights are missing or malformed.
    """
    target = Path(path)
    sidecar = target.with_name(target.name + ".json")
    try:
        meta = json.loads(sidecar.read_text())
        spec = _spec_from_dict(meta["spec"])
        dim = int(meta["input_dim"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read model sidecar {sidecar}: {err}") from err
    module = _module_from_arrays(spec, dim, read_safetensors(target), registry)
    return module, spec


def load_schema(path: str | Path) -> DatasetSchema:
    """The dataset schema saved with a model (``TrainingResult.save``): pass it to
    ``federation.models.encode_features`` to turn records into the model's inputs.

    Raises:
        ConfigError: the sidecar is missing or malformed, or holds no schema (a model
            saved before schemas were saved with it).
    """
    target = Path(path)
    sidecar = target.with_name(target.name + ".json")
    try:
        data = json.loads(sidecar.read_text()).get("schema")
        if data is None:
            raise ConfigError(f"{sidecar} holds no schema (saved before schemas were)")
        return DatasetSchema.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the schema in model sidecar {sidecar}: {err}") from err


# ---------------------------------------------------------------- the job


@dataclass
class _Job:
    """The fixed settings of one training job and its mutable state."""

    spec: ModelSpec
    dim: int
    names: list[str]
    rounds: int
    config: dict[str, Any]
    job_id: str
    min_nodes: int
    round_timeout_s: float
    optimizer: ServerOptimizer
    weights: Arrays
    history: list[RoundRecord] = field(default_factory=list)
    # Not part of ``config``: each round's receipts name their own digest, so a resumed job
    # may use another one (and checkpoints from before it existed still resume).
    tensor_digest: TensorDigest = DEFAULT_TENSOR_DIGEST
    # The dataset's schema the nodes agreed on when the job (or its resumption) started: a
    # node described later must hold the same.
    schema: DatasetSchema | None = None
    # What the whole job costs at each node (every round composed, metrics included): a
    # training job is one release there, so it must fit the node's per-release cap.
    cost: float = 0.0
    # The builders, when the architecture is an operator's (not built in): each round then
    # carries this coordinator's probe logits, which every node checks its own build against.
    probe_registry: Mapping[str, ModelBuilder] | None = None


def train(
    coordinator: Coordinator,
    spec: ModelSpec,
    *,
    rounds: int,
    target_epsilon: float,
    delta: float = 1e-7,
    sample_rate: float = 0.01,
    local_steps: int = 10,
    learning_rate: float = 0.5,
    clip_norm: float = 1.0,
    server_optimizer: ServerOptimizerName = "fedavg",
    server_lr: float | None = None,
    min_nodes: int | None = None,
    round_timeout_s: float = 600.0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    metrics_epsilon: float = 0.0,
    progress: bool = True,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
    tensor_digest: TensorDigest = DEFAULT_TENSOR_DIGEST,
    architectures: Mapping[str, ModelBuilder] | None = None,
    evaluate: Evaluator | None = None,
) -> TrainingResult:
    """Train ``spec`` across the coordinator's nodes with DP-SGD at each node.

    Args:
        coordinator: the connected nodes.
        spec: the model (architecture, dataset, features, target).
        rounds: number of rounds.
        target_epsilon: epsilon the whole job may spend at *each* node (nodes hold
            disjoint records); each node picks its noise multiplier for it.
        delta: the job's delta at each node (within the node's per-release cap).
        sample_rate: Poisson sampling rate of each DP-SGD step.
        local_steps: DP-SGD steps per node per round.
        learning_rate: the nodes' SGD step size.
        clip_norm: per-sample gradient clip.
        server_optimizer: ``"fedavg"``, ``"fedadam"`` or ``"fedyogi"``.
        server_lr: server step size (default 1.0 for fedavg, 0.01 for the adaptive ones).
        min_nodes: nodes that must complete each round (default: all of them).
        round_timeout_s: deadline of each round.
        checkpoint_dir: write a checkpoint there after every round.
        resume: continue from the checkpoint in ``checkpoint_dir``. Without it, a
            checkpoint already in ``checkpoint_dir`` is refused, not overwritten.
        metrics_epsilon: > 0: each node also releases DP validation loss and accuracy
            each round, charged on top of ``target_epsilon``.
        progress: show a progress bar (a widget in Jupyter).
        seed: seed of the initial weights.
        on_round: called with each round's record once the round (and its checkpoint)
            is done, e.g. to plot live in a notebook; an exception it raises stops the run.
        tensor_digest: the hash each node's receipt commits to its update with, and the
            coordinator computes as the update arrives: ``"blake3"`` (fast) or ``"sha256"``
            (where auditors require a FIPS hash). A node from before this option hashes with
            SHA-256 whatever is asked, and the coordinator follows it; a node that answers
            with any other digest is dropped from the round before its update is summed.
        architectures: builders of architectures the nodes' operators registered
            (``[architectures]`` in their node configs), by name: the coordinator builds
            the global model from the same one. The built-ins need none.
        evaluate: the coordinator's own evaluation, on its own data: called after every
            round with (a copy of) the global model in eval mode, under ``no_grad``, it
            returns metric name -> number (``federation.metrics.evaluator`` makes one
            from encoded inputs and labels: ROC-AUC, loss, accuracy). The values go in
            ``history[i].evaluation``, the progress bar and the summary. No node data is
            involved and nothing is charged. It first runs on the starting weights,
            before any round: if it raises there, the job is refused (nothing charged).
            If it raises after a round, that round (already paid for) is kept without an
            evaluation, a ``RuntimeWarning`` says why, and the job goes on.

    Returns:
        The global model and the per-round history.

    Raises:
        InvalidRequestError: bad arguments, ``resume`` with a checkpoint of another job
            (other settings, schema or optimizer), a checkpoint in ``checkpoint_dir``
            without ``resume``, or a ``checkpoint_dir`` that cannot be written (all
            checked before the first round).
        ConfigError: ``resume`` and no checkpoint in ``checkpoint_dir``, or one that
            cannot be read (not JSON, another format); nothing was charged.
        SchemaMismatchError: the nodes disagree on the dataset's schema.
        NodeUnavailableError: fewer than ``min_nodes`` nodes completed a round.
        BudgetExhaustedError, NodeBusyError, PolicyError: a refusal left fewer than
            ``min_nodes`` nodes.
    """
    check_tensor_digest(tensor_digest)
    _check_arguments(
        rounds=rounds,
        round_timeout_s=round_timeout_s,
        resume=resume,
        checkpoint_dir=checkpoint_dir,
        nodes=len(coordinator.clients),
        min_nodes=min_nodes,
    )
    rounds = int(rounds)  # np.int64 passes the check; the checkpoint wants a plain int
    if checkpoint_dir is not None:
        prepare_checkpoint_dir(Path(checkpoint_dir), resume=resume)
    lr = DEFAULT_SERVER_LR.get(server_optimizer, 1.0) if server_lr is None else server_lr
    registry = registry_with(architectures)
    if spec.architecture not in registry:
        raise InvalidRequestError(
            f"unknown architecture {spec.architecture!r}: built in are "
            f"{', '.join(EXTENDED_REGISTRY)}; one the nodes' operators registered needs its "
            "builder here too (architectures=..., --architecture NAME=TARGET)"
        )
    # Plain Python numbers: a numpy scalar (np.int64 steps) would pass every check and
    # then fail to serialise in the first checkpoint, after the nodes charged the round.
    config = {
        "target_epsilon": _real("target_epsilon", target_epsilon),
        "delta": _real("delta", delta),
        "sample_rate": _real("sample_rate", sample_rate),
        "local_steps": _integer("local_steps", local_steps),
        "learning_rate": _real("learning_rate", learning_rate),
        "clip_norm": _real("clip_norm", clip_norm),
        "metrics_epsilon": _real("metrics_epsilon", metrics_epsilon),
    }
    _check_ranges(config)
    schema = coordinator.schema(spec.dataset)
    dim = input_dim(spec, schema)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is not None:
        job = _resumed_job(
            directory, coordinator, spec, dim, rounds, config, server_optimizer, lr, registry
        )
    else:
        weights = _initial_weights(spec, dim, seed, registry)
        shapes = {n: a.shape for n, a in weights.items()}
        job = _Job(
            spec=spec,
            dim=dim,
            names=list(coordinator.clients),
            rounds=rounds,
            config=config,
            job_id=uuid.uuid4().hex,
            min_nodes=0,
            round_timeout_s=round_timeout_s,
            optimizer=ServerOptimizer(server_optimizer, shapes, lr=lr),
            weights=weights,
        )
    job.min_nodes = len(job.names) if min_nodes is None else min_nodes
    job.round_timeout_s = round_timeout_s
    job.tensor_digest = tensor_digest
    job.schema = schema
    job.cost = _job_cost(config, rounds)
    job.probe_registry = _probe_registry(spec, registry)
    if directory is not None:
        try:  # what every checkpoint will hold, checked before any round is charged
            json.dumps(_document(job), sort_keys=True)
        except (TypeError, ValueError) as err:
            raise InvalidRequestError(
                f"the job's settings cannot be saved in a checkpoint ({err}); nothing was charged"
            ) from err
    if evaluate is not None:
        try:  # before any round is charged: a mistake in it must not cost budget
            _evaluate(evaluate, job, registry)
        except Exception as err:
            raise InvalidRequestError(
                f"evaluate fails on the job's starting weights, so no round was started "
                f"(nothing was charged): {type(err).__name__}: {err}"
            ) from err
    _run(
        coordinator,
        job,
        directory,
        progress=progress,
        on_round=on_round,
        evaluate=None if evaluate is None else (evaluate, registry),
    )
    model = _module_from_arrays(spec, dim, job.weights, registry)
    return TrainingResult(
        model=model,
        history=job.history,
        spec=spec,
        input_dim=dim,
        job_id=job.job_id,
        schema=schema,
        planned_epsilon=job.cost,
    )


def _encoding_changes(before: DatasetSchema, now: DatasetSchema, spec: ModelSpec) -> list[str]:
    """The job's columns (features and target) whose type, bounds or domain differ,
    exactly (a bound moved by 0.4 moves every scaled input)."""

    def encoding(schema: DatasetSchema, name: str) -> tuple[object, ...] | None:
        found = [c for c in schema.columns if c.name == name]
        if not found:
            return None
        column = found[0]
        return (column.type.value, column.lower, column.upper, tuple(column.domain))

    lines = []
    for name in dict.fromkeys((*spec.features, spec.target)):
        old, new = encoding(before, name), encoding(now, name)
        if old != new:
            lines.append(f"column {name!r}: {old or 'missing'} then, {new or 'missing'} now")
    return lines


def _check_unchanged(directory: Path, job: _Job, start: int) -> None:
    """With the directory's lock held: its checkpoint is still the one this job read (or
    none, for a new job). Another job may have written it between the read and the lock.

    Raises:
        InvalidRequestError: it changed (nothing has been charged).
    """
    path = directory / CHECKPOINT_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        body = None
    except (OSError, ValueError) as err:
        raise InvalidRequestError(f"{path} cannot be read now: {err}") from err
    found = None if not isinstance(body, dict) else (body.get("job_id"), body.get("round"))
    expected = None if start == 0 and found is None else (job.job_id, start - 1)
    if found != expected:
        raise InvalidRequestError(
            f"{path} changed after this job read it (another job wrote it: it is now at "
            f"round {found[1] + 1 if found and isinstance(found[1], int) else '?'} of job "
            f"{found[0] if found else '?'}); nothing was charged: run again to resume from "
            "its latest round"
        )


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number; got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _check_arguments(
    *,
    rounds: int,
    round_timeout_s: float,
    resume: bool,
    checkpoint_dir: str | Path | None,
    nodes: int,
    min_nodes: int | None,
) -> None:
    if _integer("rounds", rounds) < 1:
        raise InvalidRequestError(f"rounds must be an integer >= 1; got {rounds!r}")
    timeout = _real("round_timeout_s", round_timeout_s)
    if not (math.isfinite(timeout) and timeout > 0):
        raise InvalidRequestError(f"round_timeout_s must be > 0; got {round_timeout_s!r}")
    if resume and checkpoint_dir is None:
        raise InvalidRequestError("resume=True needs checkpoint_dir (where the checkpoint is)")
    if min_nodes is not None and not 1 <= _integer("min_nodes", min_nodes) <= nodes:
        raise InvalidRequestError(f"min_nodes must be between 1 and {nodes}; got {min_nodes}")


def _check_ranges(config: Mapping[str, float]) -> None:
    """Refuse settings outside their mathematical range before anything is computed from
    them (review: sample_rate 0 or local_steps 0 made Opacus' noise search never end,
    before any node was asked). Each node also checks its operator's narrower limits."""
    for name in ("target_epsilon", "learning_rate", "clip_norm"):
        if not (math.isfinite(config[name]) and config[name] > 0):
            raise InvalidRequestError(f"{name} must be a finite number > 0; got {config[name]!r}")
    if not 0 < config["delta"] < 1:
        raise InvalidRequestError(f"delta must be in (0, 1); got {config['delta']!r}")
    if not 0 < config["sample_rate"] <= 1:
        raise InvalidRequestError(f"sample_rate must be in (0, 1]; got {config['sample_rate']!r}")
    if config["local_steps"] < 1:
        raise InvalidRequestError(f"local_steps must be >= 1; got {config['local_steps']!r}")
    metrics = config["metrics_epsilon"]
    if not (math.isfinite(metrics) and metrics >= 0):
        raise InvalidRequestError(f"metrics_epsilon must be a finite number >= 0; got {metrics!r}")


def _run(
    coordinator: Coordinator,
    job: _Job,
    directory: Path | None,
    *,
    progress: bool,
    on_round: Callable[[RoundRecord], None] | None = None,
    evaluate: tuple[Evaluator, Mapping[str, ModelBuilder]] | None = None,
) -> None:
    total = RunningSum({n: a.shape for n, a in job.weights.items()})
    start = len(job.history)
    with (
        checkpoint_lock(directory) if directory is not None else contextlib.nullcontext(),
        ThreadPoolExecutor(max_workers=len(job.names), thread_name_prefix="train") as pool,
        progress_bar(job.rounds, "training", unit="round", enabled=progress) as bar,
    ):
        if directory is not None:
            _check_unchanged(directory, job, start)
        bar.update(start)
        for round_index in range(start, job.rounds):
            record = _round(coordinator, job, round_index, total, pool)
            interrupted: BaseException | None = None
            failure = ""
            if evaluate is not None:
                try:
                    values = _evaluate(evaluate[0], job, evaluate[1])
                    record = dataclasses.replace(record, evaluation=values)
                except Exception as err:
                    # The nodes have paid for this round: keep it and go on (the same
                    # evaluation passed on the initial weights, so this is the data or
                    # the moment, not the set-up). Warned after the checkpoint: a filter
                    # that turns warnings into errors must not lose the paid round.
                    failure = (
                        f"evaluate failed after round {round_index + 1} of {job.rounds}: "
                        f"{type(err).__name__}: {err}; the round is applied"
                        + (" and checkpointed" if directory else "")
                        + " and the job goes on without its evaluation"
                    )
                except BaseException as err:  # Ctrl-C: checkpoint the paid round first
                    interrupted = err
            job.history.append(record)
            if directory is not None:
                try:
                    save_checkpoint(
                        directory,
                        round_index=round_index,
                        weights=job.weights,
                        optimizer_state=job.optimizer.state,
                        document=_document(job),
                    )
                except BaseException as err:  # a full disk, Ctrl-C mid-write
                    paid = ", ".join(n.node for n in (*record.nodes, *record.charged))
                    err.add_note(
                        f"round {round_index + 1} of {job.rounds} was charged at {paid} and "
                        "applied in memory, but its checkpoint was not written: a resumed "
                        "job continues from the checkpoint before it and runs this round "
                        "again, charged again"
                    )
                    raise
            if failure:
                warnings.warn(failure, RuntimeWarning, stacklevel=1)
            if interrupted is not None:
                interrupted.add_note(
                    f"interrupted during evaluate after round {round_index + 1} of "
                    f"{job.rounds}; the round is applied"
                    + (" and checkpointed (resume continues the job)" if directory else "")
                )
                raise interrupted
            _show(bar, record, len(job.names))
            if on_round is not None:
                on_round(record)


def _round(
    coordinator: Coordinator,
    job: _Job,
    round_index: int,
    total: RunningSum,
    pool: ThreadPoolExecutor,
) -> RoundRecord:
    """Run one round at every node concurrently and step the global weights."""
    started = time.monotonic()
    total.reset()
    config = TrainConfig(
        spec=job.spec,
        round=round_index,
        total_rounds=job.rounds,
        job_id=job.job_id,
        tensor_digest=job.tensor_digest,
        probe_logits=_probe(job),
        schema_sha256="" if job.schema is None else job.schema.contract_digest(),
        **job.config,
    )
    # A node not described yet (say, unreachable when the job started) is described and its
    # schema checked before it is sent weights; one that still cannot be misses the round.
    failures: dict[str, FederationError] = coordinator._describe_missing(job.names)
    names = [n for n in job.names if n not in failures]
    if job.schema is not None:
        failures.update(coordinator._schema_misfits(job.spec.dataset, job.schema, names))
        names = [n for n in job.names if n not in failures]
    # A node whose Describe caps one release below what the job costs would refuse it.
    failures.update(
        coordinator._over_cap(
            job.cost, names, what="this job's composed epsilon", delta=job.config["delta"]
        )
    )
    names = [n for n in job.names if n not in failures]
    for name, error in failures.items():
        log.warning(
            "round %d of %d: node %s dropped before training: %s",
            round_index + 1,
            job.rounds,
            name,
            error,
        )
    if len(names) < job.min_nodes:
        # Asking the others would charge them for a round that cannot be applied.
        raise _quorum_error(
            f"round {round_index + 1} of {job.rounds}", [], failures, job.min_nodes, 0, asked=False
        )
    group = CallGroup()
    futures: dict[str, Future[NodeRound | _Failed]] = {}
    try:
        futures = {
            name: pool.submit(
                _train_node,
                coordinator.clients[name],
                config,
                job.weights,
                total,
                job.round_timeout_s,
                coordinator._receipt_key(name),
                group,
            )
            for name in names
        }
        outcomes = {name: future.result() for name, future in futures.items()}
    except BaseException as err:
        # Ctrl-C (or any error here): end every node's call now, or leaving the pool
        # would wait for each round to finish, up to round_timeout_s.
        group.cancel()
        paid, pending = _charged_so_far(futures)
        stopped = "was interrupted" if isinstance(err, KeyboardInterrupt) else "stopped"
        note = f"round {round_index + 1} of {job.rounds} {stopped}" + _charged_note(paid)
        if pending:
            note += (
                f"; {', '.join(pending)} had not ended {_CANCELLED_CALLS_S:g} s after the "
                "cancel and may have charged it too (their ledgers say)"
            )
        err.add_note(note)
        raise
    done: list[NodeRound] = []
    charged: list[NodeRound] = []
    partial: list[str] = []
    for name, outcome in outcomes.items():
        if isinstance(outcome, NodeRound):
            done.append(outcome)
            continue
        log.warning(
            "round %d of %d: node %s dropped: %s", round_index + 1, job.rounds, name, outcome.error
        )
        failures[name] = outcome.error
        if isinstance(outcome.error, SchemaMismatchError):
            # Its operator changed the schema since it was described (refused, uncharged):
            # the next round describes it again and checks it against the job's.
            coordinator._forget_description(name)
        if outcome.contributed:
            partial.append(name)
        if outcome.charged is not None:
            charged.append(outcome.charged)
    if len(done) < job.min_nodes:
        label = f"round {round_index + 1} of {job.rounds}"
        raise _quorum_error(label, [*done, *charged], failures, job.min_nodes, len(done))
    try:
        average = total.average(job.weights)
    except KeyboardInterrupt as err:  # the round is paid: name who charged it
        err.add_note(
            f"round {round_index + 1} of {job.rounds} was interrupted while averaging"
            + _charged_note([*done, *charged])
        )
        raise
    except InvalidRequestError as err:
        # Which node's values overflowed cannot be told from the sum; stop before the
        # global weights (and the checkpoint) turn NaN.
        raise InvalidRequestError(
            f"round {round_index + 1} of {job.rounds}: {err} (from "
            f"{', '.join([*(n.node for n in done), *(f'{p} (partial)' for p in partial)])}); the "
            "global weights are unchanged and this round is not checkpointed"
            + _charged_note([*done, *charged])
        ) from err
    try:
        job.optimizer.step(job.weights, average)
    except KeyboardInterrupt as err:
        err.add_note(
            f"round {round_index + 1} of {job.rounds} was interrupted in the server step "
            "(the global weights in memory may be part-stepped: resume from the checkpoint)"
            + _charged_note([*done, *charged])
        )
        raise
    except InvalidRequestError as err:
        raise InvalidRequestError(
            f"round {round_index + 1} of {job.rounds}: {err}; the global weights and the "
            "optimizer state are unchanged and this round is not checkpointed"
            + _charged_note([*done, *charged])
        ) from err
    return RoundRecord(
        round=round_index,
        nodes=tuple(done),
        missing=tuple(n for n in failures if n not in partial),
        partial=tuple(partial),
        failures=tuple((n, str(e)) for n, e in failures.items()),
        charged=tuple(charged),
        duration_s=time.monotonic() - started,
    )


def _train_node(
    client: NodeClient,
    config: TrainConfig,
    weights: Arrays,
    total: RunningSum,
    timeout_s: float,
    node_key_pem: str,
    group: CallGroup | None = None,
) -> NodeRound | _Failed:
    """Train one round at one node; return its record, or what failed and what it cost."""
    sink: _HashingSink | None = None
    released: TrainResult | None = None

    def on_result(result: TrainResult) -> _HashingSink:
        nonlocal sink, released
        released = result  # the node has charged this round, whatever happens next
        # The node's TrainResult names the digest its receipt used: what we asked for, or
        # SHA-256 from a node that predates the choice (it sends no name). Anything else
        # would give the job receipts its owner did not choose: drop the node before a
        # byte of its update reaches the sum.
        if result.tensor_digest not in (config.tensor_digest, LEGACY_TENSOR_DIGEST):
            raise InvalidRequestError(
                f"it committed to its update with {result.tensor_digest}; this job asked "
                f"for {config.tensor_digest}"
            )
        contribution = total.contribution(max(1.0, result.noisy_examples))
        sink = _HashingSink(contribution, weights, result.tensor_digest)
        return sink

    try:
        result = client.train(
            config, weights, on_result=on_result, timeout_s=timeout_s, group=group
        )
    except FederationError as err:
        contributed = False
        if sink is not None:
            sink.contribution.abandon()
            contributed = any(sink.contribution.received.values())
        charged = None
        if released is not None:
            charged = _charged_round(client.name, released, node_key_pem)
        return _Failed(err, contributed, charged)
    assert sink is not None  # on_result ran: train() returned a result
    sink.contribution.complete()
    shapes = {name: tuple(a.shape) for name, a in weights.items()}
    round_ = _node_round(client.name, config, result, shapes, sink.digests())
    if node_key_pem:
        round_ = dataclasses.replace(round_, receipt={**round_.receipt, "node_key": node_key_pem})
    return round_


def _charged_so_far(
    futures: Mapping[str, Future[NodeRound | _Failed]],
) -> tuple[list[NodeRound], list[str]]:
    """The nodes of an interrupted round that charged it, once their cancelled calls end,
    and the nodes whose calls had not ended by then (unknown).

    A node charges before its update leaves, so one whose result had arrived has paid
    for a round that is not applied: the user is told, as for a failed quorum.
    """
    done, _ = wait(futures.values(), timeout=_CANCELLED_CALLS_S)
    pending = sorted(name for name, future in futures.items() if future not in done)
    charged = []
    for future in done:
        outcome = None if future.cancelled() or future.exception() else future.result()
        if isinstance(outcome, NodeRound):
            charged.append(outcome)
        elif isinstance(outcome, _Failed) and outcome.charged is not None:
            charged.append(outcome.charged)
    return sorted(charged, key=lambda n: n.node), pending


# How long an interrupted round waits for its cancelled calls to end (they end at once
# unless a node's stream is stuck in the kernel).
_CANCELLED_CALLS_S = 10.0


@dataclass(frozen=True, slots=True)
class _Failed:
    """A node's failed round: the error, whether a prefix of its update reached the sum,
    and, if its result had arrived (the node charged the round), that round's record."""

    error: FederationError
    contributed: bool
    charged: NodeRound | None


class _HashingSink:
    """Adds chunks to the running sum and hashes each tensor as it streams in, so the
    node's receipt can be checked against the update that actually arrived."""

    def __init__(self, contribution: Contribution, weights: Arrays, digest: TensorDigest) -> None:
        self.contribution = contribution
        self._hashes = {name: tensor_hasher(digest) for name in weights}

    def __call__(self, name: str, offset: int, values: npt.NDArray[np.float32]) -> None:
        self._hashes[name].update(values.view(np.uint8).data)
        self.contribution(name, offset, values)

    def digests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._hashes.items()}


def _node_round(
    node: str,
    config: TrainConfig,
    result: TrainResult,
    shapes: Mapping[str, tuple[int, ...]],
    digests: Mapping[str, str],
) -> NodeRound:
    payload = train_payload(
        result, job_id=config.job_id, round=config.round, shapes=shapes, digests=digests
    )
    if receipts.payload_sha256(payload) != result.receipt.payload_sha256:
        # Not dropped: the update is already in the sum and its DP cost was charged. Say
        # so now rather than when someone verifies the history's receipts.
        log.warning(
            "node %s round %d: the receipt does not match the update that arrived (%s "
            "digests and DP numbers); `federation receipts verify` will report it",
            node,
            config.round + 1,
            result.tensor_digest,
        )
    record = receipts.ReceiptRecord(node=node, receipt=result.receipt, released=payload)
    return _round_of(node, result, record.to_dict())


def _charged_round(node: str, result: TrainResult, node_key_pem: str) -> NodeRound:
    """The record of a round a node charged but whose update was not used whole.

    Its receipt is kept without the released values (``released``): the coordinator does
    not hold the whole update the receipt commits to, so the record is evidence of the
    charge, not a verifiable release (``federation receipts verify`` skips it).
    """
    receipt: dict[str, object] = {"node": node, "receipt": receipts.receipt_to_dict(result.receipt)}
    if node_key_pem:
        receipt["node_key"] = node_key_pem
    return _round_of(node, result, receipt)


def _round_of(node: str, result: TrainResult, receipt: Mapping[str, object]) -> NodeRound:
    return NodeRound(
        node=node,
        epsilon=result.cost_epsilon,
        delta=result.cost_delta,
        job_epsilon=result.job_epsilon,
        spent_epsilon=result.budget.spent_epsilon,
        remaining_epsilon=result.budget.remaining_epsilon,
        noisy_examples=result.noisy_examples,
        noise_multiplier=result.noise_multiplier,
        steps=result.steps,
        metrics=tuple((m.name, m.value) for m in result.metrics),
        receipt=receipt,
    )


def _job_cost(config: Mapping[str, Any], rounds: int) -> float:
    """The job's composed epsilon at a node, as the node computes it before charging.

    Settings a node would refuse for other reasons (say, a target too small for the steps)
    give the larger of the asked epsilons: the node's own refusal then says why.
    """
    asked = max(config["target_epsilon"], config["metrics_epsilon"])
    try:
        charges = round_charges(
            target_epsilon=config["target_epsilon"],
            metrics_epsilon=config["metrics_epsilon"],
            delta=config["delta"],
            sample_rate=config["sample_rate"],
            local_steps=config["local_steps"],
            total_rounds=rounds,
        )
        return float(max(asked, job_spend(charges.total, rounds).epsilon_at(config["delta"])))
    except (FederationError, ValueError, ArithmeticError):
        return float(asked)


def _charged_note(charged: Sequence[NodeRound]) -> str:
    """Say which nodes charged a round that is not applied, and what it cost them."""
    if not charged:
        return ""
    spent = ", ".join(f"{n.node} (job ε {n.job_epsilon:.3g})" for n in charged)
    return (
        f"; the round was charged at {spent} and is not applied (a resumed job runs it "
        "again, charged again)"
    )


def _quorum_error(
    label: str,
    charged: Sequence[NodeRound],
    failures: Mapping[str, FederationError],
    needed: int,
    completed: int,
    *,
    asked: bool = True,
) -> FederationError:
    refusals = [e for e in failures.values() if not isinstance(e, NodeUnavailableError)]
    # Those nodes charged the round although it is not applied: say what it cost.
    note = _charged_note(charged) if asked else "; no node was asked, so nothing was charged"
    if refusals and len(refusals) == len(failures):
        # Keep the refusal's class (a BudgetExhaustedError stays one) and add the note.
        first = copy.copy(refusals[0])
        others = "; ".join(f"{n}: {e}" for n, e in failures.items() if e is not refusals[0])
        first.args = (f"{label}: {first}" + (f"; {others}" if others else "") + note,)
        return first
    summary = "; ".join(f"{n}: {e}" for n, e in failures.items())
    return NodeUnavailableError(
        f"{label}: only {completed} node(s) completed (need {needed}); {summary}{note}"
    )


def _probe_registry(
    spec: ModelSpec, registry: Mapping[str, ModelBuilder]
) -> Mapping[str, ModelBuilder] | None:
    """The builders to probe a job's rounds with: an operator's architecture only (a
    built-in one is the same code at both ends, and probing it would cost a copy of a
    large model and a forward pass every round)."""
    return None if spec.architecture in EXTENDED_REGISTRY else registry


def _probe(job: _Job) -> tuple[float, ...]:
    """This coordinator's build's logits on the public probe rows with the global weights
    (see ``TrainConfig.probe_logits``); () for a built-in architecture, and for a round
    whose logits are not finite (nothing to compare: the round goes unchecked)."""
    if job.probe_registry is None:
        return ()
    # Adopted, not copied: probe_logits runs the forward on copies of the tensors.
    model = _module_from_arrays(job.spec, job.dim, job.weights, job.probe_registry)
    try:
        logits = probe_logits(model, job.dim)
    except Exception as err:
        raise InvalidRequestError(
            f"architecture {job.spec.architecture!r} fails on the public probe rows here "
            f"(federation.models.probe_inputs): {type(err).__name__}: {err}"
        ) from err
    if len(logits) != PROBE_ROWS:
        raise InvalidRequestError(
            f"architecture {job.spec.architecture!r} gave {len(logits)} outputs for "
            f"{PROBE_ROWS} probe rows; a model must give one logit per row"
        )
    if not all(math.isfinite(v) for v in logits):
        log.warning(
            "round weights give a non-finite output on the probe rows; the nodes cannot "
            "check that they build %r as this coordinator does this round",
            job.spec.architecture,
        )
        return ()
    return logits


def _evaluate(
    evaluate: Evaluator, job: _Job, registry: Mapping[str, ModelBuilder]
) -> tuple[tuple[str, float], ...]:
    """Run the coordinator's own evaluation on a copy of the global model."""
    copies = {name: np.array(a, copy=True) for name, a in job.weights.items()}
    model = _module_from_arrays(job.spec, job.dim, copies, registry)
    model.eval()
    with torch.no_grad():
        values = evaluate(model)
    if not isinstance(values, Mapping):
        raise InvalidRequestError(
            f"evaluate must return a mapping of metric names to numbers; got "
            f"{type(values).__name__}"
        )
    out = []
    for name, value in values.items():
        if not isinstance(name, str) or isinstance(value, bool):
            raise InvalidRequestError(f"evaluate returned {name!r}: {value!r}; need str: number")
        try:
            out.append((name, float(value)))
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"evaluate returned {name!r}: {value!r}; need str: number"
            ) from None
    return tuple(out)


def _show(bar: ProgressBar, record: RoundRecord, nodes: int) -> None:
    parts = [f"nodes {len(record.nodes)}/{nodes}"]
    if record.job_epsilon:
        parts.append("ε " + " ".join(f"{n}={e:.3g}" for n, e in record.job_epsilon.items()))
    for metric in ("loss", "accuracy"):
        value = record.metric(metric)
        if value is not None:
            parts.append(f"{metric} {value:.3g}")
    parts += [f"own {name} {value:.3g}" for name, value in record.evaluation]
    bar.set_postfix_str(" | ".join(parts))
    bar.update(1)


# ---------------------------------------------------------------- models and checkpoints


def _spec_dict(spec: ModelSpec) -> dict[str, object]:
    return {
        "architecture": spec.architecture,
        "dataset": spec.dataset,
        "features": list(spec.features),
        "target": spec.target,
        "hidden": list(spec.hidden),
    }


def _spec_from_dict(data: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec(
        architecture=str(data["architecture"]),
        dataset=str(data["dataset"]),
        features=tuple(str(f) for f in data["features"]),
        target=str(data["target"]),
        hidden=tuple(int(h) for h in data["hidden"]),
    )


def _initial_weights(
    spec: ModelSpec, dim: int, seed: int, registry: Mapping[str, ModelBuilder]
) -> Arrays:
    """Seeded initial weights (as ``models.initial_arrays``), as zero-copy views of the
    freshly built module's tensors: one model in memory, not two."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_model(spec, input_dim=dim, registry=registry)
    # Views where the state is float32 already; anything else (BatchNorm's int64
    # num_batches_tracked, a float64 builder) as a float32 copy, as the wire carries it.
    return state_views(module)


def _module_from_arrays(
    spec: ModelSpec,
    dim: int,
    arrays: Mapping[str, npt.NDArray[np.float32]],
    registry: Mapping[str, ModelBuilder],
) -> torch.nn.Module:
    """Build the module on ``meta`` and adopt ``arrays`` as its parameters (no copy).

    A module with a buffer the weights do not carry (non-persistent) is built for real,
    as the nodes build it, so that buffer holds what its constructor puts there.
    """
    with torch.device("meta"):
        module = build_model(spec, input_dim=dim, registry=registry)
    shapes = state_shapes(module)
    check_arrays(shapes, arrays)
    if has_unsaved_buffers(module):
        with torch.random.fork_rng(devices=[]):
            module = build_model(spec, input_dim=dim, registry=registry)
    state = {
        name: torch.from_numpy(a if a.flags.writeable else a.copy())
        for name, a in ((n, arrays[n]) for n in shapes)
    }
    module.load_state_dict(state, assign=True)
    return module


def _document(job: _Job) -> dict[str, object]:
    """Everything a checkpoint holds besides tensors."""
    return {
        "job_id": job.job_id,
        "spec": _spec_dict(job.spec),
        "input_dim": job.dim,
        "total_rounds": job.rounds,
        "nodes": list(job.names),
        "config": dict(job.config),
        "optimizer": job.optimizer.hyperparameters(),
        "history": [r.to_dict() for r in job.history],
        # How records became inputs: a resumed job must find the nodes' schema unchanged.
        "schema": job.schema.to_dict() if job.schema is not None else None,
    }


def _resumed_job(
    directory: Path,
    coordinator: Coordinator,
    spec: ModelSpec,
    dim: int,
    rounds: int,
    config: dict[str, Any],
    optimizer_name: ServerOptimizerName,
    lr: float,
    registry: Mapping[str, ModelBuilder],
) -> _Job:
    """Rebuild a job from its checkpoint, checking it is the same job.

    Raises:
        ConfigError: no readable checkpoint.
        InvalidRequestError: the checkpoint is for another spec, round count, privacy
            settings or server optimizer.
    """
    body, weights, state = load_checkpoint(directory)
    where = directory / "checkpoint.json"
    try:
        return _job_from_checkpoint(
            body,
            weights,
            state,
            where,
            coordinator,
            spec,
            dim,
            rounds,
            config,
            optimizer_name,
            lr,
            registry,
        )
    except FederationError:
        raise  # the checks' own refusals (another job, bad weights)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        # A hand-edited or truncated document: a clear refusal, not a traceback.
        raise ConfigError(f"{where} is malformed ({type(err).__name__}: {err})") from err


def _job_from_checkpoint(
    body: dict[str, object],
    weights: dict[str, npt.NDArray[np.float32]],
    state: dict[str, npt.NDArray[np.float32]],
    where: Path,
    coordinator: Coordinator,
    spec: ModelSpec,
    dim: int,
    rounds: int,
    config: dict[str, Any],
    optimizer_name: ServerOptimizerName,
    lr: float,
    registry: Mapping[str, ModelBuilder],
) -> _Job:
    if _spec_from_dict(body["spec"]) != spec or body["input_dim"] != dim:  # type: ignore[arg-type]
        raise InvalidRequestError(f"{where} is for another model spec: {body['spec']}")
    saved = body.get("schema")
    if isinstance(saved, dict):  # checkpoints from before it was saved: not checked
        changed = _encoding_changes(
            DatasetSchema.from_dict(saved), coordinator.schema(spec.dataset), spec
        )
        if changed:
            raise InvalidRequestError(
                f"{where}: the nodes' schema of dataset {spec.dataset!r} changed since the "
                f"job started ({'; '.join(changed)}); records would become inputs "
                "differently in the rounds left, so the job cannot be resumed: start a new "
                "one"
            )
    if body["total_rounds"] != rounds or body["config"] != config:
        raise InvalidRequestError(
            f"{where} is for a job of {body['total_rounds']} rounds with {body['config']}; "
            "resume with the same rounds and privacy settings (the nodes chose their noise "
            "for them)"
        )
    settings = body["optimizer"]
    if not isinstance(settings, dict) or settings.get("name") != optimizer_name:
        raise InvalidRequestError(f"{where} used server optimizer {settings}")
    if settings.get("lr") != lr:
        raise InvalidRequestError(
            f"{where} used server_lr {settings.get('lr')}; resume with the same server_lr "
            f"(got {lr})"
        )
    with torch.device("meta"):
        shapes = state_shapes(build_model(spec, input_dim=dim, registry=registry))
    check_arrays(shapes, weights)
    optimizer = ServerOptimizer(optimizer_name, shapes, lr=lr)
    if optimizer.hyperparameters() != settings:
        # Betas and tau are this version's defaults: a checkpoint written under others
        # would resume with another optimizer than the one its moments come from.
        raise InvalidRequestError(
            f"{where} used server optimizer settings {settings}; this version's are "
            f"{optimizer.hyperparameters()}, so the job cannot be resumed here"
        )
    if set(state) != set(optimizer.state):
        raise ConfigError(f"{where}: optimizer state does not match {optimizer_name}")
    for key, array in state.items():
        target = optimizer.state[key]
        if array.shape != target.shape:
            raise ConfigError(
                f"{where}: optimizer moment {key!r} has shape {array.shape}, expected "
                f"{target.shape}"
            )
        # The moments steer every later step: a NaN or a negative second moment would
        # turn the weights NaN after the next (charged) round.
        if not np.isfinite(array).all() or (key.startswith("v/") and (array < 0).any()):
            raise ConfigError(
                f"{where}: optimizer moment {key!r} holds NaN, infinite"
                + (" or negative" if key.startswith("v/") else "")
                + " values"
            )
        target[...] = array
    history = [RoundRecord.from_dict(r) for r in body["history"]]  # type: ignore[attr-defined]
    if len(history) != int(body["round"]) + 1:  # type: ignore[call-overload]
        raise ConfigError(
            f"{where}: history has {len(history)} rounds, expected {body['round']} + 1"
        )
    return _Job(
        spec=spec,
        dim=dim,
        names=list(coordinator.clients),
        rounds=rounds,
        config=config,
        job_id=str(body["job_id"]),
        min_nodes=0,
        round_timeout_s=0.0,
        optimizer=optimizer,
        weights={n: weights[n] for n in shapes},
        history=history,
    )
