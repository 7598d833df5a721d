"""The coordinator: asks nodes for DP statistics concurrently and combines the answers."""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from federation import pki
from federation.config import CoordinatorConfig, load_coordinator_config
from federation.coordinator.analytics import Estimate, GroupResult, NodeSpend, QueryResult, combine
from federation.coordinator.client import RECEIVE_WINDOW_BYTES, NodeClient
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
    NodeBusyError,
    NodeUnavailableError,
    PolicyError,
    SchemaMismatchError,
)
from federation.queries import Count, Histogram, Mean, Mechanism, Quantile, Query, Sum
from federation.receipts import release_payload
from federation.releases import Budgets, BudgetStatus, NodeDescription, Release
from federation.schema import DatasetSchema, check_compatible
from federation.training import DEFAULT_TENSOR_DIGEST, TensorDigest
from federation.wire import AnalyzeRequest

if TYPE_CHECKING:
    # Training loads torch; importing federation must not (seconds), so it loads on use.
    from federation.coordinator.training import Evaluator, RoundRecord, TrainingResult
    from federation.models import ModelBuilder, ModelSpec

__all__ = [
    "Coordinator",
    "Estimate",
    "GroupResult",
    "NodeClient",
    "NodeSpend",
    "QueryResult",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Coordinator:
    """Fan queries out to a set of nodes and combine their DP releases.

    Example (against real nodes)::

        with Coordinator.from_config("federation.toml") as fed:
            result = fed.analyze(Mean("credit", "income"), epsilon=0.5)
            print(result.value, result.estimate().low, result.estimate().high)
    """

    def __init__(self, clients: Sequence[NodeClient]) -> None:
        """Use already-constructed node clients (see ``from_config``/``from_addresses``)."""
        if not clients:
            raise InvalidRequestError("a coordinator needs at least one node")
        self.clients = {c.name: c for c in clients}
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients)))
        self._closed = False
        self._descriptions: dict[str, NodeDescription] = {}
        # Objects that must live as long as this coordinator: a LocalFederation puts itself
        # here, so its node processes outlive a `LocalFederation.synthetic().start()` call.
        self._keep_alive: list[object] = []

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, path: str | Path) -> Coordinator:
        """Connect to the nodes listed in a ``federation.toml``."""
        return cls.from_coordinator_config(load_coordinator_config(Path(path)))

    @classmethod
    def from_coordinator_config(cls, config: CoordinatorConfig) -> Coordinator:
        """Connect to the nodes of a parsed config."""
        identity = None
        if config.tls is not None:
            identity = pki.Identity.load(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
            try:
                _check_consumer_certificate(identity)
            except ConfigError as err:
                raise ConfigError(f"tls.cert {config.tls.cert}: {err}") from None
        return cls.from_addresses(
            {n.name: n.address for n in config.nodes},
            identity=identity,
            consumer=config.consumer,
            timeout_s=config.timeout_s,
            receive_window_bytes=config.receive_window_mib * 1024 * 1024,
        )

    @classmethod
    def from_addresses(
        cls,
        addresses: Mapping[str, str],
        *,
        identity: pki.Identity | None = None,
        consumer: str | None = None,
        timeout_s: float = 30.0,
        receive_window_bytes: int | None = RECEIVE_WINDOW_BYTES,
    ) -> Coordinator:
        """Connect to ``{node name: "host:port"}``; TLS when ``identity`` is given.

        ``receive_window_bytes``: see ``NodeClient``.

        Raises:
            ConfigError: ``identity``'s certificate may serve TLS, which every node
                refuses as a consumer's.
        """
        if identity is not None:
            _check_consumer_certificate(identity)
        clients = [
            NodeClient(
                name,
                address,
                identity=identity,
                consumer=consumer,
                timeout_s=timeout_s,
                receive_window_bytes=receive_window_bytes,
            )
            for name, address in addresses.items()
        ]
        return cls(clients)

    # ---------------------------------------------------------------- metadata

    def describe(self) -> dict[str, NodeDescription]:
        """Describe every node (public metadata and this consumer's budget there)."""
        results, failures = self._fan_out(lambda c: c.describe(), list(self.clients))
        if failures:
            raise _first_failure(failures)
        self._descriptions.update(results)
        return {name: results[name] for name in self.clients}

    def budgets(self) -> Budgets:
        """This consumer's budget at each node (a dict; a table in Jupyter)."""
        return Budgets((name, d.budget) for name, d in self.describe().items())

    def schema(self, dataset: str, nodes: Sequence[str] | None = None) -> DatasetSchema:
        """The dataset's schema, after checking that the nodes agree on it.

        Nodes not described before are described now; one that cannot be (unreachable,
        busy, refusing) is left out of the check, and the queries and training rounds that
        follow do not go to it until it can be.

        Raises:
            SchemaMismatchError: the nodes' schemas differ (the message lists the columns).
            FederationError: no node could be described (the first node's error).
        """
        names = list(nodes) if nodes is not None else list(self.clients)
        failures = self._describe_missing(names)
        described = [n for n in names if n not in failures]
        if not described:
            raise _first_failure(failures)
        return self._agreed_schema(dataset, described)

    def _describe_missing(self, names: Sequence[str]) -> dict[str, FederationError]:
        """Describe the nodes among ``names`` not described yet; return those that failed."""
        missing = [n for n in names if n not in self._descriptions]
        if not missing:
            return {}
        found, failures = self._fan_out(lambda c: c.describe(), missing)
        self._descriptions.update(found)
        return failures

    def _forget_description(self, name: str) -> None:
        """Describe ``name`` again before its next request (its schema changed)."""
        self._descriptions.pop(name, None)

    def _agreed_schema(self, dataset: str, names: Sequence[str]) -> DatasetSchema:
        """The schema of ``dataset`` at the described nodes ``names``, which must agree."""
        schemas = {n: self._descriptions[n].dataset(dataset) for n in names}
        problems = check_compatible(schemas)
        if problems:
            # Described again next time: their operators may fix the disagreement.
            for name in names:
                self._forget_description(name)
            raise SchemaMismatchError(
                f"nodes disagree on the schema of dataset {dataset!r}:\n  " + "\n  ".join(problems)
            )
        return next(iter(schemas.values()))

    def _schema_misfits(
        self, dataset: str, schema: DatasetSchema, names: Sequence[str]
    ) -> dict[str, FederationError]:
        """The described nodes among ``names`` whose ``dataset`` differs from ``schema``
        (or who lack it), with why: a node that joins a running job late is checked
        against the job's schema and, if it differs, left out rather than stopping the job.
        A misfit's Describe is forgotten, so the next round describes it again: its
        operator may have fixed the data in between, and it then rejoins the job.
        """
        misfits: dict[str, FederationError] = {}
        for name in names:
            try:
                theirs = self._descriptions[name].dataset(dataset)
            except InvalidRequestError as err:
                misfits[name] = err
            else:
                problems = check_compatible({"agreed": schema, name: theirs})
                if problems:
                    misfits[name] = SchemaMismatchError(
                        f"node {name!r} holds another schema of dataset {dataset!r} than the "
                        "one agreed for this job or query:\n  " + "\n  ".join(problems)
                    )
            if name in misfits:
                del self._descriptions[name]
        return misfits

    # ---------------------------------------------------------------- analytics

    def analyze(
        self,
        query: Query,
        *,
        epsilon: float,
        delta: float = 0.0,
        mechanism: Mechanism | str = Mechanism.LAPLACE,
        min_nodes: int | None = None,
        confidence: float = 0.95,
        seed: int | None = None,
    ) -> QueryResult:
        """Ask every node for ``query`` at ``epsilon`` (each node charges its own budget).

        Args:
            query: a ``Count``, ``Sum``, ``Mean``, ``Histogram`` or ``Quantile``.
            epsilon: epsilon to spend at *each* node (nodes hold disjoint records).
            delta: delta per node for the gaussian mechanism (0 for laplace).
            mechanism: ``"laplace"`` (pure DP) or ``"gaussian"``.
            min_nodes: answer from at least this many nodes when some are unreachable,
                still busy after the client's retries, or out of budget (their per-release
                cap, or what is left); None requires all of them.
            confidence: coverage of the intervals.
            seed: seed of the interval simulations (None: fresh).

        Raises:
            NodeUnavailableError: a node is unreachable or busy (and ``min_nodes`` not met).
            SchemaMismatchError: nodes disagree on the dataset's schema.
            BudgetExhaustedError, InvalidRequestError, PolicyError: a node refused (a
            budget refusal only when it leaves fewer than ``min_nodes``). The message
            names the nodes that answered, and so were charged, before the refusal.
        """
        if not isinstance(query, Count | Sum | Mean | Histogram | Quantile):
            raise InvalidRequestError(
                f"query must be a Count, Sum, Mean, Histogram or Quantile; got {query!r}"
            )
        try:
            mech = Mechanism(mechanism) if isinstance(mechanism, str) else mechanism
        except ValueError:
            known = ", ".join(m.value for m in Mechanism)
            raise InvalidRequestError(
                f"mechanism must be one of {known}; got {mechanism!r}"
            ) from None
        for name, value in (("epsilon", epsilon), ("delta", delta), ("confidence", confidence)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidRequestError(f"{name} must be a number; got {value!r}")
        if not 0 < confidence < 1:
            raise InvalidRequestError(f"confidence must be in (0, 1); got {confidence!r}")
        request = AnalyzeRequest(
            query=query, epsilon=float(epsilon), delta=float(delta), mechanism=mech
        )
        needed = len(self.clients) if min_nodes is None else min_nodes
        if (
            isinstance(needed, bool)
            or not isinstance(needed, numbers.Integral)
            or not 1 <= needed <= len(self.clients)
        ):
            raise InvalidRequestError(
                f"min_nodes must be between 1 and {len(self.clients)}; got {min_nodes}"
            )
        # Check the cross-border contract before any node spends budget on this query; a
        # node that cannot be described now (unreachable, busy) is not asked: its schema is
        # unchecked. It counts against min_nodes like one that fails the query itself.
        failures = self._describe_missing(list(self.clients))
        # A node whose Describe shows a per-release cap below epsilon would refuse: it is
        # not asked, and if that leaves too few nodes, nobody is asked (nobody pays).
        failures.update(
            self._over_cap(epsilon, [n for n in self.clients if n not in failures], delta=delta)
        )
        described = [n for n in self.clients if n not in failures]
        # What the Describes say already settles some queries: fail before anyone pays.
        _check_enough(len(described), failures, needed, total=len(self.clients))
        schema = self._agreed_schema(query.dataset, described)
        # Each node refuses, uncharged, if its schema is no longer the one agreed here.
        request = dataclasses.replace(request, schema_sha256=schema.contract_digest())
        releases, refused = self._fan_out(lambda c: c.analyze(request), described)
        stale = [n for n, err in refused.items() if isinstance(err, SchemaMismatchError)]
        if stale:
            # Their operators changed the schema since they were described: describe them
            # again and ask those whose schema is still the one agreed (the others answered
            # under it); one that now differs is left out, named, and charged nothing.
            for name in stale:
                del refused[name]
                self._forget_description(name)
            refused.update(self._describe_missing(stale))
            again = [n for n in stale if n not in refused]
            refused.update(self._schema_misfits(query.dataset, schema, again))
            again = [n for n in again if n not in refused]
            more, more_refused = self._fan_out(lambda c: c.analyze(request), again)
            releases.update(more)
            refused.update(more_refused)
        failures.update(refused)
        bounds = _mean_bounds(query, schema)
        return self._result(query, releases, failures, needed, confidence, seed, bounds)

    def _result(
        self,
        query: Query,
        releases: dict[str, Release],
        failures: dict[str, FederationError],
        needed: int,
        confidence: float,
        seed: int | None,
        bounds: tuple[float, float] | None,
    ) -> QueryResult:
        _check_enough(len(releases), failures, needed, total=len(self.clients), charged=releases)
        ordered = {n: releases[n] for n in self.clients if n in releases}
        labels, groups = combine(
            query,
            ordered,
            confidence=confidence,
            rng=np.random.default_rng(seed),
            bounds=bounds,
        )
        spends = tuple(
            NodeSpend(
                node=name,
                epsilon=r.cost_epsilon,
                delta=r.cost_delta,
                spent_epsilon=r.budget.spent_epsilon,
                remaining_epsilon=r.budget.remaining_epsilon,
                receipt_id=r.receipt.id,
                receipt=r.receipt,
                released=release_payload(r),
                node_key_pem=self._receipt_key(name),
            )
            for name, r in ordered.items()
        )
        missing = tuple(sorted(failures))
        notes = (f"answered without: {', '.join(missing)}",) if missing else ()
        return QueryResult(
            query=query,
            labels=labels,
            groups=groups,
            nodes=spends,
            missing=missing,
            confidence=confidence,
            notes=notes,
        )

    def _over_cap(
        self,
        epsilon: float,
        names: Sequence[str],
        *,
        what: str = "epsilon",
        delta: float = 0.0,
    ) -> dict[str, FederationError]:
        """Nodes whose Describe caps one release below ``epsilon`` (a cap of 0: not stated)
        or ``delta`` (None: not stated); ``what`` names the asked epsilon in the message.

        A cached Describe that says so is refreshed first: the operator may have raised
        the cap since (a node that cannot be described now is asked as before).
        """

        def over(budget: BudgetStatus) -> bool:
            delta_cap = budget.max_delta_per_release
            return 0 < budget.max_epsilon_per_release < epsilon or (
                delta_cap is not None and delta_cap < delta
            )

        refused: dict[str, FederationError] = {}
        for name in names:
            if over(self._descriptions[name].budget):
                try:
                    self._descriptions[name] = self.clients[name].describe()
                except FederationError:
                    continue
            budget = self._descriptions[name].budget
            cap = budget.max_epsilon_per_release
            if 0 < cap < epsilon:
                refused[name] = BudgetExhaustedError(
                    f"{what} {epsilon:g} exceeds node {name!r}'s per-release cap of {cap:g} "
                    "for this consumer (from its Describe), so it was not asked"
                )
            elif budget.max_delta_per_release is not None and budget.max_delta_per_release < delta:
                # As the node itself would refuse it (a PolicyError, PERMISSION_DENIED).
                refused[name] = PolicyError(
                    f"delta {delta:g} exceeds node {name!r}'s per-release cap of "
                    f"{budget.max_delta_per_release:g} for this consumer (from its Describe), "
                    "so it was not asked"
                )
        return refused

    def _receipt_key(self, node: str) -> str:
        """The node's receipt-verification PEM from its last Describe ("" if unknown)."""
        description = self._descriptions.get(node)
        return description.receipt_key_pem.decode("ascii", "replace") if description else ""

    def count(self, dataset: str, *, epsilon: float) -> QueryResult:
        """Shorthand for ``analyze(Count(dataset), epsilon=epsilon)``."""
        return self.analyze(Count(dataset), epsilon=epsilon)

    # ---------------------------------------------------------------- training

    def train(
        self,
        spec: ModelSpec,
        *,
        rounds: int,
        target_epsilon: float,
        delta: float = 1e-7,
        sample_rate: float = 0.01,
        local_steps: int = 10,
        learning_rate: float = 0.5,
        clip_norm: float = 1.0,
        server_optimizer: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg",
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
        """Train ``spec`` with DP-SGD at every node; see ``federation.coordinator.training.train``.

        Example::

            spec = ModelSpec("mlp", "credit", ("age", "income"), "defaulted", hidden=(64, 64))
            result = fed.train(spec, rounds=10, target_epsilon=3.0,
                               evaluate=evaluator(x_mine, y_mine))  # on your own records
            result.history[-1].job_epsilon, result.history[-1].evaluation, result.model
        """
        from federation.coordinator.training import train

        return train(
            self,
            spec,
            rounds=rounds,
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            local_steps=local_steps,
            learning_rate=learning_rate,
            clip_norm=clip_norm,
            server_optimizer=server_optimizer,
            server_lr=server_lr,
            min_nodes=min_nodes,
            round_timeout_s=round_timeout_s,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            metrics_epsilon=metrics_epsilon,
            progress=progress,
            seed=seed,
            on_round=on_round,
            tensor_digest=tensor_digest,
            architectures=architectures,
            evaluate=evaluate,
        )

    # ---------------------------------------------------------------- plumbing

    def _fan_out(
        self, call: Callable[[NodeClient], T], names: Sequence[str]
    ) -> tuple[dict[str, T], dict[str, FederationError]]:
        self._check_open()
        futures = {name: self._pool.submit(call, self.clients[name]) for name in names}
        results: dict[str, T] = {}
        failures: dict[str, FederationError] = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except FederationError as err:
                log.info("node %s: %s", name, err)  # the raised error carries it
                failures[name] = err
        return results, failures

    def _check_open(self) -> None:
        """Raise ``InvalidRequestError`` if ``close`` was called (its channels are gone)."""
        if self._closed:
            raise InvalidRequestError("this coordinator is closed; connect a new one")

    def _replace_client(self, client: NodeClient) -> None:
        """Talk to node ``client.name`` through ``client`` from now on (it moved: a
        restarted local node); the old client is closed and the node described again."""
        old = self.clients[client.name]
        self.clients[client.name] = client
        self._forget_description(client.name)
        old.close()

    def close(self) -> None:
        """Close every channel and the worker pool. Safe to call twice."""
        self._closed = True
        for client in self.clients.values():
            client.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Coordinator:
        """Use as a context manager that closes on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close channels."""
        self.close()


def _mean_bounds(query: Query, schema: DatasetSchema) -> tuple[float, float] | None:
    """The bounds a mean query's nodes clamped each record to: the query's own, else its
    column's public bounds (as the node's planner chooses)."""
    if not isinstance(query, Mean):
        return None
    if query.bounds is not None:
        return (float(query.bounds[0]), float(query.bounds[1]))
    column = schema.column(query.column)
    if column.lower is None or column.upper is None:
        return None
    return (float(column.lower), float(column.upper))


def _check_enough(
    answered: int,
    failures: Mapping[str, FederationError],
    needed: int,
    *,
    total: int,
    charged: Mapping[str, Release] | None = None,
) -> None:
    """Raise unless ``answered`` of ``total`` nodes meet ``needed`` and none refused outright.

    A node that cannot answer (unreachable; busy after the client's retries; out of
    budget; its schema changed since the nodes agreed) charged nothing: it counts against
    ``min_nodes`` instead of failing a query others have paid for. A policy or request
    refusal is raised as it is. A raised refusal names the nodes in ``charged`` (they
    answered, and paid, for nothing).
    """
    cannot = (NodeUnavailableError, NodeBusyError, BudgetExhaustedError, SchemaMismatchError)
    refusals = {n: e for n, e in failures.items() if not isinstance(e, cannot)}
    if not refusals and answered < needed:
        # Too few: the reason is the budget or the schema, if either, not "unavailable".
        refusals = {
            n: e
            for n, e in failures.items()
            if isinstance(e, BudgetExhaustedError | SchemaMismatchError)
        }
    if refusals:
        raise _naming_charged(_first_failure(refusals), charged or {})
    if answered < needed:
        names = ", ".join(sorted(failures))
        raise NodeUnavailableError(
            f"only {answered} of {total} nodes answered (need {needed}); "
            f"unavailable: {names}. Details: " + "; ".join(str(e) for e in failures.values())
        )


def _check_consumer_certificate(identity: pki.Identity) -> None:
    """Every node refuses a certificate that may serve TLS as a consumer's
    (PERMISSION_DENIED): say so before asking any."""
    if pki.is_server_certificate(identity.cert_pem):
        raise ConfigError(
            "the certificate may serve TLS (a node's, or one without an extended key usage "
            "limiting it to clients); nodes refuse it as a consumer's: use one from "
            "`federation certs issue --role consumer`"
        )


def _first_failure(failures: Mapping[str, FederationError]) -> FederationError:
    return next(iter(failures.values()))


def _naming_charged(err: FederationError, charged: Mapping[str, Release]) -> FederationError:
    """``err``, its message extended with the nodes that were charged for the query."""
    if not charged:
        return err
    paid = ", ".join(
        f"{name} (epsilon {r.cost_epsilon:g}, receipt {r.receipt.id})"
        for name, r in charged.items()
    )
    message = f"{err}; already charged for this query, whose answer is not returned: {paid}"
    if isinstance(err, BudgetExhaustedError):
        return BudgetExhaustedError(message, remaining_epsilon=err.remaining_epsilon)
    return type(err)(message)
