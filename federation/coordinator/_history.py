"""The record of a training job: what each node released and what it cost, per round."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NodeRound", "RoundRecord"]


@dataclass(frozen=True, slots=True)
class NodeRound:
    """What one node released in one round (all DP or public), and what it cost.

    Attributes:
        node: the node's name.
        epsilon: this round's charge at the node (update, count and metrics).
        delta: this round's delta.
        job_epsilon: the job's composed epsilon at the node so far.
        spent_epsilon: the consumer's composed spend at the node (all releases).
        remaining_epsilon: the consumer's remaining budget there.
        noisy_examples: DP count of the node's training records (the FedAvg weight).
        noise_multiplier: DP-SGD noise multiplier the node chose.
        steps: DP-SGD steps taken.
        metrics: DP validation metrics, ``(name, value)`` (empty unless requested).
        receipt: the node's signed receipt with the released values it covers
            (``federation.receipts.ReceiptRecord.to_dict()``).
    """

    node: str
    epsilon: float
    delta: float
    job_epsilon: float
    spent_epsilon: float
    remaining_epsilon: float
    noisy_examples: float
    noise_multiplier: float
    steps: int
    metrics: tuple[tuple[str, float], ...]
    receipt: Mapping[str, object]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["metrics"] = {name: value for name, value in self.metrics}
        data["receipt"] = dict(self.receipt)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeRound:
        """Read what ``to_dict`` wrote."""
        values = dict(data)
        values["metrics"] = tuple((str(k), float(v)) for k, v in dict(data["metrics"]).items())
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of a training job.

    Attributes:
        round: 0-based round index.
        nodes: the nodes whose whole update arrived, in coordinator order.
        missing: nodes that contributed nothing this round.
        partial: nodes whose update stream broke midway; the chunks that arrived are
            averaged per coordinate (see ``_aggregate``).
        failures: ``(node, reason)`` for every node in ``missing`` or ``partial``.
        duration_s: wall-clock seconds of the round.
        charged: nodes that charged the round (their result arrived) but whose update was
            not used whole: listed in ``partial`` or ``missing`` too. Their cost counts in
            ``epsilon`` and ``job_epsilon``; their receipts are kept without the released
            values (the coordinator does not hold the update they commit to).
        evaluation: ``(name, value)`` from ``train(evaluate=...)``: the coordinator's own
            evaluation of the global model after this round, on its own data (no node's
            data and no privacy cost); empty without it.
    """

    round: int
    nodes: tuple[NodeRound, ...]
    missing: tuple[str, ...]
    partial: tuple[str, ...]
    failures: tuple[tuple[str, str], ...]
    duration_s: float
    charged: tuple[NodeRound, ...] = ()
    evaluation: tuple[tuple[str, float], ...] = ()

    @property
    def answered(self) -> tuple[str, ...]:
        """Names of the nodes that completed the round."""
        return tuple(n.node for n in self.nodes)

    @property
    def epsilon(self) -> dict[str, float]:
        """This round's epsilon charged per node (``charged`` nodes included)."""
        return {n.node: n.epsilon for n in (*self.nodes, *self.charged)}

    @property
    def job_epsilon(self) -> dict[str, float]:
        """The job's epsilon so far per node that charged this round."""
        return {n.node: n.job_epsilon for n in (*self.nodes, *self.charged)}

    def metric(self, name: str) -> float | None:
        """A DP metric averaged over the nodes, weighted by their noisy counts; None if absent."""
        pairs = [
            (value, max(n.noisy_examples, 1.0))
            for n in self.nodes
            for metric, value in n.metrics
            if metric == name
        ]
        if not pairs:
            return None
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        return {
            "round": self.round,
            "nodes": [n.to_dict() for n in self.nodes],
            "missing": list(self.missing),
            "partial": list(self.partial),
            "failures": [list(f) for f in self.failures],
            "duration_s": self.duration_s,
            "charged": [n.to_dict() for n in self.charged],
            # JSON has no NaN: a non-finite value is written as null.
            "evaluation": {k: v if math.isfinite(v) else None for k, v in self.evaluation},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Read what ``to_dict`` wrote."""
        return cls(
            round=int(data["round"]),
            nodes=tuple(NodeRound.from_dict(n) for n in data["nodes"]),
            missing=tuple(data["missing"]),
            partial=tuple(data["partial"]),
            failures=tuple((str(a), str(b)) for a, b in data["failures"]),
            duration_s=float(data["duration_s"]),
            charged=tuple(NodeRound.from_dict(n) for n in data.get("charged", ())),
            evaluation=tuple(
                (str(k), math.nan if v is None else float(v))
                for k, v in dict(data.get("evaluation", {})).items()
            ),
        )
