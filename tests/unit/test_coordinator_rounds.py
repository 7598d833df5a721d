"""The coordinator's rounds when nodes fail: what the history records, what stops a job.

Nodes here are in-process stand-ins whose update stream goes through the real
``NodeClient._read_update`` (the wire reader, chunk checks included) into the real
``train`` loop, ``RunningSum`` and checkpoints; end-to-end runs over real node processes
are in ``tests/integration/test_training_e2e.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
import torch
from _samples import train_result

import federation.coordinator.training as training_module
from federation import receipts, wire
from federation._proto.v1 import node_pb2 as pb
from federation._train_cli import format_history
from federation.coordinator import Coordinator
from federation.coordinator.client import CallGroup, NodeClient
from federation.coordinator.training import RoundRecord, TrainingResult, train
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
    NodeUnavailableError,
    PolicyError,
)
from federation.models import ModelSpec
from federation.schema import Column, ColumnType, DatasetSchema
from federation.training import TrainConfig, TrainResult

Arrays = dict[str, npt.NDArray[np.float32]]

SCHEMA = DatasetSchema(
    "credit",
    (
        Column("a", ColumnType.FLOAT, lower=0.0, upper=1.0),
        Column("b", ColumnType.FLOAT, lower=0.0, upper=1.0),
        Column("y", ColumnType.BOOL, domain=("false", "true")),
    ),
)
SPEC = ModelSpec("mlp", "credit", ("a", "b"), "y", hidden=(4,))


def _press_ctrl_c() -> None:
    """What a user's Ctrl-C does, once the coordinator waits on its nodes' rounds."""
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)


@dataclasses.dataclass(eq=False)
class _Call:
    """A call in flight, as ``CallGroup`` sees it: something to cancel."""

    cancelled: threading.Event

    def cancel(self) -> None:
        self.cancelled.set()


class _Node:
    """Answers each round with ``weights + shift``; ``faults[round]`` changes that round:
    ``"break"`` (the stream fails after two chunks), ``"huge"`` (an update of 1e20s),
    ``"refuse"`` (a budget refusal, nothing charged), ``"hang"`` (runs until cancelled, and
    interrupts the main thread as a user's Ctrl-C would)."""

    def __init__(
        self,
        name: str,
        shift: float,
        faults: dict[int, str] | None = None,
        cap: float = 0.0,
        delta_cap: float | None = None,
    ) -> None:
        self.name = name
        self.shift = np.float32(shift)
        self.faults = faults or {}
        self.cap = cap  # its per-release cap, as its Describe shows (0: not stated)
        self.delta_cap = delta_cap  # its per-release delta cap (None: not stated)
        self.charged = 0  # rounds this node charged (its result was sent)

    def describe(self) -> SimpleNamespace:
        return _described(SCHEMA, self.cap, self.delta_cap)

    def train(
        self,
        config: TrainConfig,
        weights: Arrays,
        *,
        on_result: Callable[[TrainResult], Any],
        timeout_s: float,
        group: object = None,
    ) -> TrainResult:
        del timeout_s
        fault = self.faults.get(config.round)
        if fault == "hang":  # a round that would run until its deadline, unless cancelled
            cancelled = threading.Event()
            assert isinstance(group, CallGroup)
            group.add(_Call(cancelled))
            threading.Thread(target=_press_ctrl_c, daemon=True).start()
            if not cancelled.wait(60):
                raise AssertionError("the coordinator did not cancel the round's calls")
            raise NodeUnavailableError(f"{self.name}: CANCELLED")
        if fault == "stuck":  # a call that does not end when cancelled (stuck in the kernel)
            threading.Thread(target=_press_ctrl_c, daemon=True).start()
            time.sleep(2.0)
            raise NodeUnavailableError(f"{self.name}: CANCELLED")
        if fault == "refuse":  # refused before any charge, as a node does
            raise BudgetExhaustedError(f"node {self.name!r}: cannot afford the rest of the job")
        update = {n: w + self.shift for n, w in weights.items()}
        if fault == "huge":
            update = {n: np.full_like(w, 1e20) for n, w in weights.items()}
        self.charged += 1
        result = train_result(
            noisy_examples=100.0,
            job_epsilon=0.3 * self.charged,
            receipt=dataclasses.replace(train_result().receipt, node_name=self.name),
        )
        headers = wire.tensor_headers(update)
        opening = pb.TrainResponse(result=wire.train_result_to_proto(result, tensors=headers))
        frames = [opening.SerializeToString(), *wire.iter_chunk_frames(update, chunk_bytes=8)]

        def stream() -> Iterator[bytes]:
            if fault == "break":
                yield from frames[:3]
                raise NodeUnavailableError(f"{self.name}: the connection dropped")
            yield from frames

        reader = SimpleNamespace(name=self.name)
        return NodeClient._read_update(reader, stream(), headers, on_result)  # type: ignore[arg-type]


def _described(
    schema: DatasetSchema, cap: float = 0.0, delta_cap: float | None = None
) -> SimpleNamespace:
    """What a node's Describe tells: its dataset's schema and its per-release caps."""
    return SimpleNamespace(
        dataset=lambda _name: schema,
        budget=SimpleNamespace(max_epsilon_per_release=cap, max_delta_per_release=delta_cap),
    )


class _Coordinator:
    """The parts of ``Coordinator`` a training job uses, over ``_Node``s.

    ``late`` nodes cannot be described when the job starts and are described (with their
    own schema) at the first round.
    """

    _schema_misfits = Coordinator._schema_misfits
    _over_cap = Coordinator._over_cap

    def __init__(
        self,
        nodes: list[_Node],
        late: dict[str, DatasetSchema] | None = None,
    ) -> None:
        self.clients = {n.name: n for n in nodes}
        self.late = dict(late or {})
        self.describes: dict[str, int] = {}
        self._descriptions = {n.name: n.describe() for n in nodes if n.name not in self.late}

    def schema(self, dataset: str) -> DatasetSchema:
        del dataset
        return SCHEMA

    def _describe_missing(self, names: list[str]) -> dict[str, FederationError]:
        for name in names:
            if name not in self._descriptions:
                self._descriptions[name] = _described(self.late[name])
                self.describes[name] = self.describes.get(name, 0) + 1
        return {}

    def _receipt_key(self, name: str) -> str:
        del name
        return ""


def _train(coordinator: _Coordinator, **options: Any) -> TrainingResult:
    options.setdefault("rounds", 2)
    return train(coordinator, SPEC, target_epsilon=1.0, progress=False, **options)  # type: ignore[arg-type]


def test_a_node_whose_stream_breaks_is_partial_and_its_charge_stays_in_the_history() -> None:
    a, b = _Node("A", 0.0), _Node("B", 1.0, faults={1: "break"})
    result = _train(_Coordinator([a, b]), min_nodes=1)
    last = result.history[1]
    assert last.answered == ("A",)
    assert last.partial == ("B",)
    # B charged round 2 before its stream broke: its spend is in the history and the table.
    assert [n.node for n in last.charged] == ["B"]
    assert last.job_epsilon == {"A": pytest.approx(0.6), "B": pytest.approx(0.6)}
    assert last.epsilon["B"] == pytest.approx(0.3)
    table = format_history(result)
    assert "B (partial)" in table
    assert "B last missed round 2: " in table
    assert "the connection dropped" in table
    assert table.splitlines()[2].split()[2:4] == ["0.6", "0.6"]
    # Jupyter's table shows B's cost too (it showed "—", as if nothing was charged).
    html = result._repr_html_()
    [row] = [r for r in re.findall(r"<tr>(.*?)</tr>", html, re.S) if "charged, update not" in r]
    assert ">B<" in row
    assert ">0.3<" in row
    # Its receipt is kept as evidence of the charge, without released values: the
    # coordinator does not hold the update it commits to, so nothing claims to verify it.
    receipt = last.charged[0].receipt
    assert receipt["receipt"]["node"] == "B"  # type: ignore[index]
    assert "released" not in receipt
    document = [r.to_dict() for r in result.history]
    assert {r.receipt.node_name for r in receipts.find_receipt_records(document)} == {"A", "B"}
    assert len(list(receipts.find_receipt_records(document))) == 3  # A twice, B once
    assert type(result.history[1]).from_dict(last.to_dict()) == last
    # print(result) is one line, not every receipt of every round.
    assert repr(result).endswith("rounds=2, job_epsilon={A: 0.6, B: 0.6})")
    assert "receipt" not in repr(result)


def test_the_summary_flags_a_node_whose_job_spend_ended_above_the_plan() -> None:
    # These stand-in nodes report 0.3 more job epsilon per charged round, as a node whose
    # round was retried would end above what the job was planned to cost.
    result = _train(_Coordinator([_Node("A", 0.0)]), rounds=4)
    assert result.planned_epsilon == pytest.approx(1.0)  # target 1, no metrics
    assert "job ε 1.2 is above the 1 this job was planned to cost" in format_history(result)
    assert "job ε 1.2 is above the 1 this job was planned to cost" in result._repr_html_()
    result.planned_epsilon = 1.2
    assert "planned to cost" not in format_history(result)
    assert "planned to cost" not in result._repr_html_()


def test_a_failed_quorum_says_which_nodes_charged_the_unapplied_round() -> None:
    a, b = _Node("A", 0.0), _Node("B", 1.0, faults={1: "break"})
    with pytest.raises(NodeUnavailableError) as caught:
        _train(_Coordinator([a, b]), min_nodes=2)
    message = str(caught.value)
    assert "round 2 of 2: only 1 node(s) completed (need 2)" in message
    assert "charged at A (job ε 0.6), B (job ε 0.6) and is not applied" in message


def test_a_refusal_that_breaks_quorum_keeps_its_class_and_names_who_was_charged() -> None:
    a, b = _Node("A", 0.0), _Node("B", 1.0, faults={1: "refuse"})
    with pytest.raises(BudgetExhaustedError) as caught:
        _train(_Coordinator([a, b]))
    message = str(caught.value)
    assert message.startswith("round 2 of 2: node 'B': cannot afford the rest of the job")
    assert "charged at A (job ε 0.6) and is not applied" in message


def test_a_job_some_node_caps_below_its_epsilon_asks_nobody_when_quorum_cannot_be_met() -> None:
    # B's Describe caps one release at 0.5, below the job's target: it would refuse, and
    # asking A alone would charge A for a round that cannot be applied.
    a, b = _Node("A", 0.0), _Node("B", 1.0, cap=0.5)
    with pytest.raises(BudgetExhaustedError) as caught:
        _train(_Coordinator([a, b]))
    message = str(caught.value)
    assert "this job's composed epsilon 1 exceeds node 'B''s per-release cap of 0.5" in message
    assert message.endswith("no node was asked, so nothing was charged")
    assert a.charged == b.charged == 0
    # With a quorum of one, A trains and B is listed with the reason, never asked.
    result = _train(_Coordinator([a, b]), min_nodes=1)
    assert [r.answered for r in result.history] == [("A",), ("A",)]
    assert "per-release cap of 0.5" in dict(result.history[0].failures)["B"]
    assert b.charged == 0


def test_a_node_whose_delta_cap_is_below_the_jobs_is_not_asked() -> None:
    # B's budget is pure DP (delta 0, so its delta cap is 0: stated, not "unknown"): it
    # would refuse every round, after A had paid. It is left out before anyone is asked.
    a, b = _Node("A", 0.0, delta_cap=1e-6), _Node("B", 1.0, delta_cap=0.0)
    with pytest.raises(PolicyError, match=r"delta 1e-07 exceeds node 'B''s per-release cap of 0"):
        _train(_Coordinator([a, b]), delta=1e-7)
    assert a.charged == b.charged == 0
    result = _train(_Coordinator([a, b]), delta=1e-7, min_nodes=1)
    assert [r.answered for r in result.history] == [("A",), ("A",)]
    assert b.charged == 0
    # A cap not stated (an older node) is not a reason to leave a node out.
    assert _train(_Coordinator([a, _Node("B", 1.0)]), delta=1e-7).history[-1].answered == (
        "A",
        "B",
    )


def test_ctrl_c_during_a_round_cancels_the_nodes_calls_instead_of_waiting_for_them() -> None:
    # Leaving the round's thread pool waits for every worker: without cancelling their
    # calls, an interrupted coordinator would hang until each round's deadline.
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as caught:
        _train(
            _Coordinator([_Node("A", 0.0, faults={0: "hang"}), _Node("B", 1.0)]),
            round_timeout_s=600.0,
        )
    assert time.monotonic() - started < 30
    # B had charged the round before the interrupt: the user is told what it cost.
    assert caught.value.__notes__ == [
        "round 1 of 2 was interrupted; the round was charged at B (job ε 0.3) and is not "
        "applied (a resumed job runs it again, charged again)"
    ]


def test_the_job_cost_checked_against_caps_is_the_nodes_own_metrics_included() -> None:
    # Target 1 plus metrics 0.2 in each of 2 rounds composes to 1.1757: a node capped at
    # 1.1 would refuse the first round (nodes.training.plan_training computes the same),
    # so it is not asked, and A is not charged for a round that cannot be applied.
    a, b = _Node("A", 0.0), _Node("B", 1.0, cap=1.1)
    with pytest.raises(BudgetExhaustedError, match=r"composed epsilon 1\.17567 exceeds node 'B'"):
        _train(_Coordinator([a, b]), metrics_epsilon=0.2)
    assert a.charged == b.charged == 0
    assert (
        len(_train(_Coordinator([a, _Node("B", 1.0, cap=1.4)]), metrics_epsilon=0.2).history) == 2
    )


def test_a_node_that_joins_late_with_another_schema_misses_rounds_not_the_job() -> None:
    other = DatasetSchema("credit", (*SCHEMA.columns, Column("z", ColumnType.FLOAT, 0.0, 1.0)))
    a, b, c = _Node("A", 0.0), _Node("B", 1.0), _Node("C", 2.0)
    result = _train(_Coordinator([a, b, c], late={"C": other}), min_nodes=2)
    for record in result.history:
        assert record.answered == ("A", "B")
        assert record.missing == ("C",)
        reason = dict(record.failures)["C"]
        assert "node 'C' holds another schema of dataset 'credit'" in reason
        assert "'z'" in reason
    assert c.charged == 0  # never sent weights, never charged


def test_a_node_left_out_for_its_schema_rejoins_once_its_operator_fixes_it() -> None:
    other = DatasetSchema("credit", (*SCHEMA.columns, Column("z", ColumnType.FLOAT, 0.0, 1.0)))
    a, c = _Node("A", 0.0), _Node("C", 2.0)
    coordinator = _Coordinator([a, c], late={"C": other})

    def fix_after_round_one(record: RoundRecord) -> None:
        if record.round == 0:
            coordinator.late["C"] = SCHEMA  # the operator fixes C's data and restarts it

    result = _train(coordinator, rounds=3, min_nodes=1, on_round=fix_after_round_one)
    assert [r.answered for r in result.history] == [("A",), ("A", "C"), ("A", "C")]
    assert coordinator.describes["C"] == 2  # described again after the misfit, then kept


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi"])
def test_a_step_float32_cannot_hold_stops_the_job_before_the_checkpoint(
    optimizer: str, tmp_path: Path
) -> None:
    # Finite updates of 1e20: the average is finite, delta**2 is not. Applied, FedAdam's v
    # would be infinite for good and FedYogi's NaN the round after, in the checkpoint too.
    a, b = _Node("A", 0.0), _Node("B", 1.0, faults={1: "huge"})
    with pytest.raises(
        InvalidRequestError,
        match=r"round 2 of 3: the server step.*charged at A \(job ε 0\.6\), B \(job ε 0\.6\)",
    ):
        _train(
            _Coordinator([a, b]),
            rounds=3,
            server_optimizer=optimizer,
            checkpoint_dir=tmp_path,
        )
    body = json.loads((tmp_path / "checkpoint.json").read_text())
    assert body["round"] == 0  # round 1's checkpoint; round 2 left nothing behind
    tensors = safetensors.numpy.load_file(str(tmp_path / body["tensors_file"]))
    assert all(np.isfinite(t).all() for t in tensors.values())


def _resume(tmp_path: Path) -> TrainingResult:
    return _train(
        _Coordinator([_Node("A", 0.0), _Node("B", 1.0)]),
        rounds=3,
        server_optimizer="fedadam",
        checkpoint_dir=tmp_path,
        resume=True,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A fedadam job's checkpoint after its 3rd and last round (resuming it trains nothing,
    once the checks below pass)."""
    _train(
        _Coordinator([_Node("A", 0.0), _Node("B", 1.0)]),
        rounds=3,
        server_optimizer="fedadam",
        checkpoint_dir=tmp_path,
    )
    return tmp_path


def _edit_tensor(directory: Path, name: str, value: npt.NDArray[np.float32]) -> None:
    body = json.loads((directory / "checkpoint.json").read_text())
    path = directory / body["tensors_file"]
    tensors = safetensors.numpy.load_file(str(path))
    tensors[name] = value
    safetensors.numpy.save_file(tensors, str(path))


def test_an_intact_checkpoint_resumes(checkpoint: Path) -> None:
    assert len(_resume(checkpoint).history) == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.full((4, 2), np.nan, np.float32), "'v/0.weight' holds NaN, infinite or negative"),
        (np.full((4, 2), -1.0, np.float32), "'v/0.weight' holds NaN, infinite or negative"),
        (np.zeros(1, np.float32), r"'v/0.weight' has shape \(1,\), expected \(4, 2\)"),
    ],
)
def test_a_tampered_optimizer_moment_is_refused(
    checkpoint: Path, value: npt.NDArray[np.float32], message: str
) -> None:
    _edit_tensor(checkpoint, "v/0.weight", value)
    with pytest.raises(ConfigError, match=message):
        _resume(checkpoint)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda body: body.pop("spec"), r"is malformed \(KeyError: 'spec'\)"),
        (lambda body: body["history"][0].pop("nodes"), r"is malformed \(KeyError: 'nodes'\)"),
        (lambda body: body.update(round="x"), "is malformed"),
        (
            lambda body: body.update(tensors_file="../elsewhere/round-00002.safetensors"),
            "is not a round-NNNNN.safetensors name",
        ),
        (
            lambda body: body.update(tensors_file="/tmp/round-00002.safetensors"),  # noqa: S108
            "is not a round-NNNNN.safetensors name",
        ),
    ],
)
def test_a_malformed_checkpoint_document_is_a_config_error(
    checkpoint: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    path = checkpoint / "checkpoint.json"
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=message):
        _resume(checkpoint)


def test_the_coordinators_own_evaluation_runs_on_a_copy_after_every_round() -> None:
    seen: list[bool] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        seen.append(model.training)
        first = next(model.parameters())
        value = float(first.sum())
        with torch.no_grad():
            first.add_(1e6)  # a careless evaluation must not touch the global weights
        return {"score": value, "count": np.int64(3)}  # type: ignore[dict-item]

    plain = _train(_Coordinator([_Node("A", 0.0)]), rounds=3)
    result = _train(_Coordinator([_Node("A", 0.0)]), rounds=3, evaluate=evaluate)
    assert seen == [False] * 4  # eval mode: the starting weights, then each round
    assert [dict(r.evaluation)["count"] for r in result.history] == [3.0, 3.0, 3.0]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, result.model.state_dict()[name])
    last = result.history[-1]
    assert dict(last.evaluation)["score"] == pytest.approx(
        float(next(result.model.parameters()).detach().sum()), rel=1e-6
    )
    assert type(last).from_dict(last.to_dict()) == last
    table = format_history(result)
    assert "own score" in table.splitlines()[0]
    assert "the coordinator's evaluation of the global model on its own data" in table


def test_an_evaluation_that_fails_at_the_start_refuses_the_job_before_any_charge() -> None:
    node = _Node("A", 0.0)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        raise ValueError("my data file moved")

    with pytest.raises(InvalidRequestError, match=r"no round was started \(nothing was charged\)"):
        _train(_Coordinator([node]), rounds=3, evaluate=evaluate)
    with pytest.raises(InvalidRequestError, match="evaluate must return a mapping"):
        _train(_Coordinator([node]), evaluate=lambda model: 0.5)
    with pytest.raises(InvalidRequestError, match="evaluate returned 'auc': 'high'"):
        _train(_Coordinator([node]), evaluate=lambda model: {"auc": "high"})
    assert node.charged == 0


def test_an_evaluation_that_fails_after_a_round_keeps_the_paid_round_and_goes_on() -> None:
    calls: list[int] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:  # the start, round 1, then round 2 fails
            raise OSError("the share is down")
        return {"n": float(len(calls))}

    with pytest.warns(RuntimeWarning, match="evaluate failed after round 2 of 3: OSError"):
        result = _train(_Coordinator([_Node("A", 0.0)]), rounds=3, evaluate=evaluate)
    assert [r.evaluation for r in result.history] == [(("n", 2.0),), (), (("n", 4.0),)]


def test_ctrl_c_during_an_evaluation_checkpoints_the_paid_round_first(tmp_path: Path) -> None:
    calls: list[int] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt) as caught:
        _train(
            _Coordinator([_Node("A", 0.0)]), rounds=3, evaluate=evaluate, checkpoint_dir=tmp_path
        )
    assert caught.value.__notes__ == [
        "interrupted during evaluate after round 1 of 3; the round is applied and "
        "checkpointed (resume continues the job)"
    ]
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert len(checkpoint["history"]) == 1


def test_an_interrupted_round_names_the_nodes_whose_calls_had_not_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(training_module, "_CANCELLED_CALLS_S", 0.2)
    with pytest.raises(KeyboardInterrupt) as caught:
        _train(_Coordinator([_Node("A", 0.0, faults={0: "stuck"})]), round_timeout_s=600.0)
    assert caught.value.__notes__ == [
        "round 1 of 2 was interrupted; A had not ended 0.2 s after the cancel and may have "
        "charged it too (their ledgers say)"
    ]


def test_a_failed_evaluation_is_checkpointed_even_where_warnings_are_errors(
    tmp_path: Path,
) -> None:
    # The warning comes after the checkpoint: a "warnings are errors" filter stops the
    # job, but the paid round is in the checkpoint (review finding).
    calls: list[int] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the share is down")
        return {}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="round 1 of 3: OSError.*and checkpointed"):
            _train(
                _Coordinator([_Node("A", 0.0)]),
                rounds=3,
                evaluate=evaluate,
                checkpoint_dir=tmp_path,
            )
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert len(checkpoint["history"]) == 1


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        # Each of these made Opacus' noise search run forever, before any node was asked.
        ("sample_rate", 0.0, "sample_rate must be in (0, 1]"),
        ("local_steps", 0, "local_steps must be >= 1"),
        ("local_steps", -3, "local_steps must be >= 1"),
        ("sample_rate", 2.0, "sample_rate must be in (0, 1]"),
        ("delta", 0.0, "delta must be in (0, 1)"),
        ("clip_norm", 0.0, "clip_norm must be a finite number > 0"),
        ("target_epsilon", -1.0, "target_epsilon must be a finite number > 0"),
        ("round_timeout_s", "5", "round_timeout_s must be a number"),
        ("min_nodes", 1.5, "min_nodes must be an integer"),
    ],
)
def test_settings_out_of_range_are_refused_before_anything_is_computed(
    setting: str, value: object, message: str
) -> None:
    a, b = _Node("A", 0.0), _Node("B", 1.0)
    options: dict[str, Any] = {setting: value}
    if setting == "target_epsilon":
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            train(_Coordinator([a, b]), SPEC, rounds=2, progress=False, **options)  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            _train(_Coordinator([a, b]), **options)
    assert a.charged == b.charged == 0


def test_a_numpy_round_count_is_taken_as_an_int() -> None:
    result = _train(_Coordinator([_Node("A", 0.0)]), rounds=np.int64(2))
    assert len(result.history) == 2
