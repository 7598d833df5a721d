"""A node whose operator changes the dataset's schema under a long-lived coordinator.

The coordinator describes each node once and sends, with every request, the digest of the
schema it agreed (``DatasetSchema.contract_digest``). A node whose schema is no longer that
one refuses before it charges; the coordinator describes it again and asks it again only if
its schema is still the agreed one. Before, a node restarted with other bounds answered
over its new bins, and the coordinator added them to the other node's bin by bin.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from federation import Histogram, Quantile
from federation.coordinator import Coordinator
from federation.errors import SchemaMismatchError
from federation.local import LocalFederation
from federation.schema import Column, ColumnType, DatasetSchema

SCHEMA = DatasetSchema("d", (Column("x", ColumnType.FLOAT, 0.0, 100.0),))
NODES = ("a", "b")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def local() -> Iterator[LocalFederation]:
    # Every record is 90. Fixed ports: a restarted node keeps its address, as a real one.
    data = {n: {"x": np.full(2000, 90.0)} for n in NODES}
    fed = LocalFederation.from_arrays(
        data, schema=SCHEMA, epsilon=100.0, max_epsilon_per_release=5.0
    )
    for path in fed.node_configs.values():
        text = path.read_text()
        assert 'listen = "127.0.0.1:0"' in text
        path.write_text(
            text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{_free_port()}"')
        )
    fed.start()
    try:
        yield fed
    finally:
        fed.stop()


def _coordinator(local: LocalFederation) -> Coordinator:
    """A coordinator of our own: ``local.restart`` rebuilds its own, not this one."""
    return Coordinator.from_addresses(
        {n: p.address for n, p in local.processes.items()}, identity=local.identity
    )


def _set_upper(local: LocalFederation, node: str, old: str, new: str) -> None:
    path = local.node_configs[node]
    text = path.read_text()
    assert text.count(f"upper = {old}\n") == 1
    path.write_text(text.replace(f"upper = {old}\n", f"upper = {new}\n"))
    local.restart(node)


def test_a_node_whose_schema_changed_is_left_out_uncharged_and_rejoins_when_it_agrees(
    local: LocalFederation,
) -> None:
    query = Quantile("d", "x", quantiles=(0.5,), bins=4)
    with _coordinator(local) as fed:
        before = fed.analyze(query, epsilon=1.0, seed=0).estimate()
        assert before.low <= 90.0 <= before.high
        _set_upper(local, "b", "100.0", "200.0")
        spent = fed.clients["b"].describe().budget.spent_epsilon

        # Every node needed: the schema is the reason (not "unavailable"), and a, which
        # answered before b was described again, is named as charged for nothing.
        with pytest.raises(SchemaMismatchError, match="already charged for this query.*: a"):
            fed.analyze(query, epsilon=1.0)
        assert fed.clients["b"].describe().budget.spent_epsilon == spent
        _set_upper(local, "b", "200.0", "100.0")
        assert fed.analyze(query, epsilon=1.0).missing == ()
        _set_upper(local, "b", "100.0", "200.0")
        spent = fed.clients["b"].describe().budget.spent_epsilon

        result = fed.analyze(Histogram("d", "x", bins=4), epsilon=1.0, min_nodes=1)

        # b refused (its bins are [0, 200]), was described again, and now differs from the
        # agreed schema: left out, charged nothing. a's bins alone make the answer.
        assert result.missing == ("b",)
        assert result.labels == ("[0, 25)", "[25, 50)", "[50, 75)", "[75, 100]")
        assert [n.node for n in result.nodes] == ["a"]
        assert fed.clients["b"].describe().budget.spent_epsilon == spent
        # Without min_nodes the nodes now disagree before anyone is asked.
        with pytest.raises(Exception, match="disagree on the schema of dataset 'd'"):
            fed.analyze(query, epsilon=1.0)

        # Its operator puts the bounds back: the coordinator describes b again and it
        # answers, with no new coordinator.
        _set_upper(local, "b", "200.0", "100.0")
        again = fed.analyze(query, epsilon=1.0, seed=0)
        assert again.missing == ()
        assert again.estimate().low <= 90.0 <= again.estimate().high


def test_a_node_refuses_a_request_made_for_another_schema_and_charges_nothing(
    local: LocalFederation,
) -> None:
    # The coordinator's retry hides the refusal; the node's own answer, asked directly.
    from federation.queries import Mechanism
    from federation.wire import AnalyzeRequest

    with _coordinator(local) as fed:
        client = fed.clients["a"]
        spent = client.describe().budget.spent_epsilon
        request = AnalyzeRequest(Histogram("d", "x", bins=4), 1.0, 0.0, Mechanism.LAPLACE)
        other = DatasetSchema("d", (Column("x", ColumnType.FLOAT, 0.0, 200.0),))
        with pytest.raises(SchemaMismatchError, match="nothing was charged"):
            client.analyze(_with_digest(request, other.contract_digest()))
        assert client.describe().budget.spent_epsilon == spent
        # The digest of the schema it holds goes through.
        client.analyze(_with_digest(request, SCHEMA.contract_digest()))
        assert client.describe().budget.spent_epsilon > spent


def _with_digest(request: object, digest: str) -> object:
    import dataclasses

    return dataclasses.replace(request, schema_sha256=digest)  # type: ignore[type-var]
