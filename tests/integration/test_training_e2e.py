"""Federated training over real node processes (mutual TLS on loopback).

The production path end to end: Train streams with chunked tensors both ways, DP-SGD at each
node, charges in each node's ledger, FedAvg at the coordinator, checkpoints and resume, and
the refusals that must charge nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import safetensors.torch
import torch
from _waits import hold_slots

import federation.coordinator.training as training_module
from federation import (
    BudgetExhaustedError,
    Count,
    InvalidRequestError,
    NodeBusyError,
    NodeUnavailableError,
    pki,
    receipts,
    wire,
)
from federation._proto.v1 import node_pb2 as pb
from federation._proto.v1 import node_pb2_grpc as pb_grpc
from federation.architectures import load_builder
from federation.coordinator import Coordinator, NodeClient
from federation.coordinator._checkpoint import checkpoint_lock
from federation.coordinator.client import RECEIVE_WINDOW_BYTES
from federation.coordinator.training import (
    NodeRound,
    RoundRecord,
    TrainingResult,
    load_model,
    load_schema,
)
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.local import LocalFederation, NodeProcess
from federation.metrics import evaluator, predict, roc_auc
from federation.models import ModelSpec, build_model, encode_features, initial_arrays, input_dim
from federation.schema import DatasetSchema
from federation.training import TrainConfig
from nodes.ledger import Ledger

FEATURES = ("age", "income", "debt_ratio", "credit_lines", "years_employed", "loan_amount")
SPEC = ModelSpec("mlp", "credit", FEATURES, "defaulted", hidden=(16,))
TRAINING = {
    "sample_rate": 0.05,
    "local_steps": 10,
    "learning_rate": 2.0,
    "clip_norm": 1.0,
    "progress": False,
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_fed() -> Iterator[LocalFederation]:
    """Two TLS nodes, 5000 records each, a budget that several jobs fit in."""
    local = LocalFederation.synthetic(rows=5000, epsilon=200.0, max_epsilon_per_release=50.0)
    local.start()
    yield local
    local.stop()


def _fed(local: LocalFederation) -> Coordinator:
    assert local.coordinator is not None
    return local.coordinator


def releases(fed: Coordinator) -> dict[str, int]:
    return {name: d.budget.releases for name, d in fed.describe().items()}


def held_out_auc(model: torch.nn.Module) -> float:
    """AUC on fresh synthetic records of both jurisdictions, inputs scaled as nodes do."""
    rows = [synthetic_credit(jurisdiction=j, rows=3000, seed=99) for j in ("hong-kong", "shenzhen")]
    columns = []
    for name in FEATURES:
        column = CREDIT_SCHEMA.column(name)
        assert column.lower is not None
        assert column.upper is not None
        values = np.concatenate([np.asarray(r[name], dtype=np.float64) for r in rows])
        columns.append(
            (np.clip(values, column.lower, column.upper) - column.lower)
            / (column.upper - column.lower)
        )
    x = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))
    labels = np.concatenate([np.asarray(r["defaulted"], dtype=bool) for r in rows])
    with torch.no_grad():
        scores = model(x).reshape(-1).double().numpy()
    return roc_auc(scores, labels)


# ---------------------------------------------------------------- the happy path


def test_training_reaches_a_useful_model_and_saves_it(
    trained_fed: LocalFederation, tmp_path: Path
) -> None:
    fed = _fed(trained_fed)
    before = fed.budgets()
    seen: list[RoundRecord] = []
    # The coordinator's own records, evaluated after every round at no privacy cost.
    own = synthetic_credit(jurisdiction="shenzhen", rows=2000, seed=77)
    x_own = encode_features(own, features=SPEC.features, schema=CREDIT_SCHEMA)
    result = fed.train(
        SPEC,
        rounds=4,
        target_epsilon=4.0,
        metrics_epsilon=0.5,
        on_round=seen.append,
        evaluate=evaluator(x_own, own["defaulted"]),
        **TRAINING,
    )

    assert [r.round for r in result.history] == [0, 1, 2, 3]
    assert seen == result.history  # the callback saw every round, in order
    for record in result.history:
        assert record.answered == ("hong-kong", "shenzhen")
        assert record.missing == ()
        assert record.partial == ()
        assert record.metric("loss") is not None
    last = result.history[-1]
    for node in last.nodes:
        # Each round charged, and the job's composed spend never passes its target (plus
        # the metrics, which are charged on top).
        assert 0 < node.epsilon <= node.job_epsilon <= 4.0 + 4 * 0.5
        assert node.spent_epsilon > before[node.node].spent_epsilon
    assert held_out_auc(result.model) > 0.65
    assert [sorted(dict(r.evaluation)) for r in result.history] == [["accuracy", "auc", "loss"]] * 4
    # The last evaluation is of the model the job returns.
    final_auc = roc_auc(predict(result.model, x_own), own["defaulted"])
    assert dict(last.evaluation)["auc"] == pytest.approx(final_auc, abs=1e-12)

    # Rounds after the first receive the global model into the buffers the node's last
    # update was sent from (no fresh model-sized memory per round).
    for name, node in trained_fed.processes.items():
        log = node.log_path.read_text(errors="replace")
        into = re.findall(rf"train job {result.job_id} round (\d) .* bytes into (.*)", log)
        assert into == [("0", "new buffers")] + [
            (str(r), "the last round's buffers") for r in (1, 2, 3)
        ], name

    # Every receipt is signed by its node over the update the coordinator actually received.
    records = [receipts.ReceiptRecord.from_dict(n.receipt) for r in result.history for n in r.nodes]
    assert trained_fed.identity is not None
    verdicts = receipts.verify_records(records, ca_pem=trained_fed.identity.ca_pem)
    assert [failure for _, failure in verdicts] == [None] * 8

    # The saved model loads back in plain torch, and through load_model.
    path = tmp_path / "model.safetensors"
    result.save(path)
    plain = build_model(SPEC, input_dim=len(FEATURES))
    plain.load_state_dict(safetensors.torch.load_file(path))
    loaded, spec = load_model(path)
    assert spec == SPEC
    for module in (plain, loaded):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, result.model.state_dict()[name])
    # The sidecar carries the public schema: a consumer encodes its own records with it,
    # exactly as the nodes did (the inputs held_out_auc builds by hand).
    schema = load_schema(path)
    assert schema == CREDIT_SCHEMA
    records = synthetic_credit(jurisdiction="hong-kong", rows=50, seed=5)
    x = encode_features(records, features=spec.features, schema=schema)
    for i, name in enumerate(FEATURES):
        column = CREDIT_SCHEMA.column(name)
        assert column.lower is not None
        assert column.upper is not None
        expected = (np.clip(records[name], column.lower, column.upper) - column.lower) / (
            column.upper - column.lower
        )
        np.testing.assert_allclose(x[:, i], expected, rtol=1e-6)


def _assert_receipts_verify(local: LocalFederation, nodes: Sequence[NodeRound]) -> None:
    """Each node's receipt is signed by a CA-issued key over the update that arrived."""
    records = [receipts.ReceiptRecord.from_dict(n.receipt) for n in nodes]
    assert local.identity is not None
    verdicts = receipts.verify_records(records, ca_pem=local.identity.ca_pem)
    assert [failure for _, failure in verdicts] == [None] * len(nodes)


def test_large_model_update_arrives_bit_exact(trained_fed: LocalFederation) -> None:
    # ~4.2M parameters (17 MB, 8 chunks per tensor): the node signs the BLAKE3 digest of
    # every tensor it sends; the coordinator hashes what it receives; the receipt must verify.
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", hidden=(2048, 2048))
    fed = _fed(trained_fed)
    result = fed.train(spec, rounds=1, target_epsilon=2.0, **{**TRAINING, "local_steps": 1})
    (record,) = result.history
    assert record.answered == ("hong-kong", "shenzhen")
    state = result.model.state_dict()
    assert sum(t.numel() for t in state.values()) > 4_000_000
    assert all(t.dtype == torch.float32 for t in state.values())
    for node in record.nodes:
        released = node.receipt["released"]
        assert isinstance(released, dict)
        assert [u["shape"] for u in released["update"]] == [list(t.shape) for t in state.values()]
        assert released["version"] == 2
        assert all(len(str(u["blake3"])) == 64 for u in released["update"])
    _assert_receipts_verify(trained_fed, record.nodes)


def test_a_coordinator_may_ask_for_sha256_digests_and_the_receipts_verify(
    trained_fed: LocalFederation,
) -> None:
    fed = _fed(trained_fed)
    result = fed.train(
        SPEC, rounds=1, target_epsilon=2.0, tensor_digest="sha256", **{**TRAINING, "local_steps": 1}
    )
    (record,) = result.history
    for node in record.nodes:
        released = node.receipt["released"]
        assert isinstance(released, dict)
        assert released["version"] == 1
        assert all(set(u) == {"name", "dtype", "shape", "sha256"} for u in released["update"])
    _assert_receipts_verify(trained_fed, record.nodes)


def test_a_slow_coordinator_holds_the_node_back_instead_of_buffering_its_update(
    tmp_path: Path,
) -> None:
    # A node's update stream may run at most RECEIVE_WINDOW_BYTES ahead of what the
    # coordinator has read, so the coordinator's memory stays bounded however slowly it
    # reads. Here it stops reading a 67 MB update at the 5th chunk for STALL_S, with more
    # than 3 windows still to come: the node cannot finish sending (its log's "released"
    # time) until the coordinator reads on. With a window as large as the update (or, in
    # some runs, gRPC's adaptive one) the node is done in a fraction of STALL_S.
    stall_s, stall_at = 3.0, 5
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", hidden=(4096, 4096))
    weights = initial_arrays(spec, input_dim=input_dim(spec, CREDIT_SCHEMA), seed=1)
    total = sum(a.nbytes for a in weights.values())
    assert total - stall_at * wire.CHUNK_BYTES > 3 * RECEIVE_WINDOW_BYTES
    local = LocalFederation.synthetic(
        nodes=["hong-kong"],
        rows=2000,
        epsilon=50.0,
        max_epsilon_per_release=10.0,
        workdir=tmp_path,
    )
    fed = local.start()
    assert fed.clients["hong-kong"].receive_window_bytes == RECEIVE_WINDOW_BYTES
    stalls: list[float] = []
    try:
        for round_index in range(2):  # the second on a connection that has carried one
            chunks = 0

            def sink(name: str, offset: int, values: npt.NDArray[np.float32]) -> None:
                nonlocal chunks
                chunks += 1
                if chunks == stall_at:
                    started = time.monotonic()
                    time.sleep(stall_s)
                    stalls.append(time.monotonic() - started)

            config = dataclasses.replace(
                _RAW_CONFIG, spec=spec, round=round_index, sample_rate=0.002, job_id="slow-reader"
            )
            fed.clients["hong-kong"].train(config, weights, on_result=lambda _, s=sink: s)
            assert chunks * wire.CHUNK_BYTES >= total
        log = local.processes["hong-kong"].log_path.read_text(errors="replace")
    finally:
        local.stop()
    assert len(stalls) == 2
    released = re.findall(r"train job slow-reader round (\d) .*released ([0-9.]+)s", log)
    assert [r for r, _ in released] == ["0", "1"], log[-2000:]
    times = [float(t) for _, t in released]
    assert min(times) >= 0.95 * stall_s, f"the node finished sending while unread: {times}"


# ---------------------------------------------------------------- refusals over the raw stub


_RAW_CONFIG = TrainConfig(
    spec=SPEC,
    round=0,
    total_rounds=2,
    target_epsilon=2.0,
    delta=1e-7,
    sample_rate=0.05,
    local_steps=1,
    learning_rate=1.0,
    clip_norm=1.0,
    job_id="raw-job",
)


def test_a_round_past_its_deadline_says_to_raise_the_round_timeout(
    trained_fed: LocalFederation,
) -> None:
    with pytest.raises(NodeUnavailableError) as caught:
        _fed(trained_fed).train(
            SPEC, rounds=1, target_epsilon=1.0, round_timeout_s=0.001, **TRAINING
        )
    message = str(caught.value)
    assert "DEADLINE_EXCEEDED" in message
    assert "the round took longer than its deadline of 0.001s: raise --round-timeout" in message


OPERATOR_NET = """
import torch
from torch import nn

class TanhNet(nn.Module):
    def __init__(self, input_dim):
        super().__init__()
        self.norm = nn.BatchNorm1d(input_dim)  # its int64 num_batches_tracked: float32 on the wire
        self.body = nn.Sequential(nn.Linear(input_dim, 16), nn.Tanh(), nn.Linear(16, 1))
        self.register_buffer("scale", torch.full((1,), 0.5), persistent=False)  # not on the wire

    def forward(self, x):
        return self.body(self.norm(x)) * self.scale

def tanh_net(spec, input_dim):
    return TanhNet(input_dim)

class ReluNet(TanhNet):  # every tensor's name and shape as TanhNet's; another forward
    def __init__(self, input_dim):
        super().__init__(input_dim)
        self.body[1] = nn.ReLU()

def relu_net(spec, input_dim):
    return ReluNet(input_dim)
"""


def test_an_architecture_the_operators_register_trains_end_to_end(tmp_path: Path) -> None:
    # Each node imports the builder named in its own config; the coordinator builds the
    # global model from the same file. The coordinator sends only the name.
    builder = tmp_path / "operator_nets.py"
    builder.write_text(OPERATOR_NET)
    local = LocalFederation.synthetic(
        rows=2000,
        epsilon=50.0,
        max_epsilon_per_release=10.0,
        allowed_models=["mlp", "tanh-net"],
        architectures={"tanh-net": f"{builder}:tanh_net"},
        workdir=tmp_path / "fed",
    )
    for path in local.node_configs.values():
        assert f'"tanh-net" = "{builder}:tanh_net"' in path.read_text()  # as an operator writes
    with local:
        fed = _fed(local)
        spec = ModelSpec("tanh-net", "credit", FEATURES, "defaulted")
        before = releases(fed)
        with pytest.raises(InvalidRequestError, match="needs its builder here too"):
            fed.train(spec, rounds=2, target_epsilon=2.0, **TRAINING)
        assert releases(fed) == before  # refused before any node was asked
        # A coordinator whose builder of the name computes another function (ReLU for
        # Tanh, same tensors): each node compares its build's outputs on the public probe
        # rows with the coordinator's and refuses the round before the charge.
        with pytest.raises(InvalidRequestError, match="computes another function") as info:
            fed.train(
                spec,
                rounds=2,
                target_epsilon=2.0,
                architectures={"tanh-net": load_builder(f"{builder}:relu_net")},
                **TRAINING,
            )
        assert "hong-kong" in str(info.value)
        assert "shenzhen" in str(info.value)
        assert releases(fed) == before
        result = fed.train(
            spec,
            rounds=2,
            target_epsilon=2.0,
            architectures={"tanh-net": load_builder(f"{builder}:tanh_net")},
            **TRAINING,
        )
        assert [r.answered for r in result.history] == [("hong-kong", "shenzhen")] * 2
        assert any(isinstance(m, torch.nn.Tanh) for m in result.model.modules())
        # The buffer the weights do not carry holds what its constructor set, as at the
        # nodes (a review found it left on "meta", so the model could not run).
        assert torch.equal(result.model.scale, torch.full((1,), 0.5))
        result.model.eval()
        assert result.model(torch.zeros(3, result.model.norm.num_features)).shape == (3, 1)
        _assert_receipts_verify(local, result.history[-1].nodes)


def _raw_train(
    local: LocalFederation,
    node: str,
    weights: dict[str, npt.NDArray[np.float32]],
    *,
    tensor_digest: str | None = None,
    config: TrainConfig = _RAW_CONFIG,
) -> grpc.RpcError:
    """Send one Train stream through the generated stub; return the error it ends with."""
    assert local.identity is not None
    headers = wire.tensor_headers(weights)
    config_msg = wire.train_config_to_proto(config, tensors=headers)
    if tensor_digest is not None:
        config_msg.tensor_digest = tensor_digest
    messages = [pb.TrainRequest(config=config_msg)]
    messages += [pb.TrainRequest(chunk=c) for c in wire.iter_tensor_chunks(weights)]
    channel = grpc.secure_channel(
        local.processes[node].address,
        pki.channel_credentials(local.identity),
        options=[("grpc.ssl_target_name_override", node)],
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        for _ in pb_grpc.NodeStub(channel).Train(iter(messages), timeout=60):
            pass
    return info.value


def _good_weights() -> dict[str, npt.NDArray[np.float32]]:
    return initial_arrays(SPEC, input_dim=input_dim(SPEC, CREDIT_SCHEMA), seed=1)


def test_shape_mismatch_is_invalid_argument_and_charges_nothing(
    trained_fed: LocalFederation,
) -> None:
    fed = _fed(trained_fed)
    before = releases(fed)
    weights = _good_weights()
    weights["0.weight"] = np.zeros((16, len(FEATURES) + 1), dtype=np.float32)
    error = _raw_train(trained_fed, "hong-kong", weights)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'0.weight' must have shape [16, 6]" in (error.details() or "")
    assert releases(fed) == before


def test_an_unknown_tensor_digest_is_invalid_argument_and_charges_nothing(
    trained_fed: LocalFederation,
) -> None:
    fed = _fed(trained_fed)
    before = releases(fed)
    error = _raw_train(trained_fed, "hong-kong", _good_weights(), tensor_digest="md5")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor_digest must be one of blake3, sha256; got 'md5'" in (error.details() or "")
    assert releases(fed) == before


def test_a_job_cannot_be_redeclared_under_its_id_and_nothing_is_charged(
    trained_fed: LocalFederation,
) -> None:
    # One round of a 2-round job, then the same job id declared as a 1-round job (say, to
    # run "round 0 of 1" again and again past max_rounds): refused before any weights.
    fed = _fed(trained_fed)
    result = fed.train(SPEC, rounds=2, target_epsilon=2.0, **{**TRAINING, "local_steps": 1})
    redeclared = dataclasses.replace(
        _RAW_CONFIG,
        job_id=result.job_id,
        total_rounds=1,
        sample_rate=TRAINING["sample_rate"],
        learning_rate=TRAINING["learning_rate"],
    )
    before = releases(fed)
    error = _raw_train(trained_fed, "hong-kong", _good_weights(), config=redeclared)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert f"train job {result.job_id} was started here with total_rounds=2" in details
    assert releases(fed) == before


@contextmanager
def _training_slot_held(
    local: LocalFederation,
    node: str,
    job_id: str,
    *,
    expect: grpc.StatusCode | None = grpc.StatusCode.INVALID_ARGUMENT,
) -> Iterator[None]:
    """Hold ``node``'s one training slot with a Train call that withholds its weights.

    On exit the holder's stream ends without weights: refused INVALID_ARGUMENT (``expect``;
    None: any error), uncharged. The node cancels it after its read limit (10 s).
    """
    process = local.processes[node]
    assert local.identity is not None
    weights = _good_weights()
    config = dataclasses.replace(_RAW_CONFIG, job_id=job_id)
    opening = pb.TrainRequest(
        config=wire.train_config_to_proto(config, tensors=wire.tensor_headers(weights))
    )
    done = threading.Event()

    def withhold_weights() -> Iterator[pb.TrainRequest]:
        yield opening
        done.wait(60)

    channel = grpc.secure_channel(
        process.address,
        pki.channel_credentials(local.identity),
        options=[("grpc.ssl_target_name_override", node)],
    )
    with channel:
        holder = pb_grpc.NodeStub(channel).Train(withhold_weights(), timeout=60)
        try:
            _wait_for_log(process, f"job {job_id} round 0", "the node never took the slot")
            yield
        finally:
            done.set()
        with pytest.raises(grpc.RpcError) as info:
            for _ in holder:
                pass
    if expect is not None:
        assert info.value.code() is expect  # type: ignore[attr-defined]


def _wait_for_log(process: NodeProcess, text: str, why: str, *, after: int = 0) -> None:
    """Wait (up to 20 s) until ``text`` is in the node's log past its first ``after`` chars."""
    deadline = time.monotonic() + 20
    while text not in process.log_path.read_text(errors="replace")[after:]:
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_a_training_while_the_slot_is_held_is_refused_busy_and_charges_nothing(
    trained_fed: LocalFederation,
) -> None:
    # Each node trains one round at a time. A second Train waits for the slot for half the
    # time left before its deadline, then hears NodeBusyError (retry), not a spent budget.
    fed = _fed(trained_fed)
    before = releases(fed)
    with (
        _training_slot_held(trained_fed, "shenzhen", "slot-holder"),
        pytest.raises(NodeBusyError, match="busy training .*nothing was charged"),
    ):
        fed.clients["shenzhen"].train(
            dataclasses.replace(_RAW_CONFIG, job_id="second"),
            _good_weights(),
            on_result=lambda _: lambda *_: None,
            timeout_s=6.0,  # the node answers busy after 3 s
        )
    # Neither the holder (its stream ended without weights) nor the refused call charged.
    assert releases(fed) == before


def test_a_call_cancelled_while_waiting_for_the_slot_gives_up_its_place(
    trained_fed: LocalFederation,
) -> None:
    # A caller that gives up while it waits (Ctrl-C, a coordinator's own round deadline)
    # must not keep a node thread for the rest of the wait (30 s here), nor take the slot
    # when it frees, ahead of a caller still waiting.
    fed = _fed(trained_fed)
    before = releases(fed)
    process = trained_fed.processes["hong-kong"]
    assert trained_fed.identity is not None
    weights = _good_weights()
    config = dataclasses.replace(_RAW_CONFIG, job_id="gave-up")
    messages = [
        pb.TrainRequest(
            config=wire.train_config_to_proto(config, tensors=wire.tensor_headers(weights))
        )
    ]
    messages += [pb.TrainRequest(chunk=c) for c in wire.iter_tensor_chunks(weights)]
    with _training_slot_held(trained_fed, "hong-kong", "slot-holder-2"):
        mark = len(process.log_path.read_text(errors="replace"))
        channel = grpc.secure_channel(
            process.address,
            pki.channel_credentials(trained_fed.identity),
            options=[("grpc.ssl_target_name_override", "hong-kong")],
        )
        with channel:
            waiting = pb_grpc.NodeStub(channel).Train(iter(messages), timeout=60)
            _wait_for_log(process, "waiting for the training slot", "never waited", after=mark)
            waiting.cancel()
            _wait_for_log(
                process,
                f"job gave-up round 0 for {trained_fed.consumer!r} ended while waiting",
                "the node kept waiting for a caller that had gone",
                after=mark,
            )
    # The slot went back to nobody: the cancelled call never took it, nothing was charged.
    assert (
        f"job gave-up round 0 for {trained_fed.consumer!r}: training slot taken"
        not in (process.log_path.read_text(errors="replace")[mark:])
    )
    assert releases(fed) == before


def test_a_round_made_for_another_schema_is_refused_and_charges_nothing(
    trained_fed: LocalFederation,
) -> None:
    # The coordinator sends the digest of the schema its job encodes records with; a node
    # whose operator changed a bound since would encode them otherwise: refused, uncharged.
    fed = _fed(trained_fed)
    before = releases(fed)
    moved = DatasetSchema(
        "credit",
        tuple(
            dataclasses.replace(c, upper=c.upper + 1.0) if c.name == "age" else c
            for c in CREDIT_SCHEMA.columns
        ),
    )
    config = dataclasses.replace(_RAW_CONFIG, schema_sha256=moved.contract_digest())
    error = _raw_train(trained_fed, "shenzhen", _good_weights(), config=config)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "changed a column's bounds, type or domain" in (error.details() or "")
    assert releases(fed) == before
    # The digest of the schema the node holds goes through (as the coordinator sends it).
    config = dataclasses.replace(_RAW_CONFIG, schema_sha256=CREDIT_SCHEMA.contract_digest())
    fed.clients["shenzhen"].train(
        dataclasses.replace(config, job_id="digest-ok"),
        _good_weights(),
        on_result=lambda _: lambda *_: None,
        timeout_s=60,
    )


def test_a_stream_that_goes_on_after_its_weights_is_refused_and_charges_nothing(
    trained_fed: LocalFederation,
) -> None:
    # Found by review: frames after the declared weights were never read, so a duplicate
    # chunk, an undeclared tensor or a second config was served and charged.
    fed = _fed(trained_fed)
    before = releases(fed)
    weights = _good_weights()
    config = dataclasses.replace(_RAW_CONFIG, job_id="goes-on")
    opening = pb.TrainRequest(
        config=wire.train_config_to_proto(config, tensors=wire.tensor_headers(weights))
    )
    chunks = [pb.TrainRequest(chunk=c) for c in wire.iter_tensor_chunks(weights)]
    assert trained_fed.identity is not None
    channel = grpc.secure_channel(
        trained_fed.processes["shenzhen"].address,
        pki.channel_credentials(trained_fed.identity),
        options=[("grpc.ssl_target_name_override", "shenzhen")],
    )
    stream = iter([opening, *chunks, chunks[-1]])  # the last chunk twice
    with channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.NodeStub(channel).Train(stream, timeout=60))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "ends after its declared weights" in (info.value.details() or "")  # type: ignore[attr-defined]
    assert releases(fed) == before


def test_weights_withheld_mid_stream_lose_the_training_slot_after_the_read_limit(
    trained_fed: LocalFederation,
) -> None:
    # Found by review: a caller that sent its config and then no weights held the node's
    # one training slot, which every consumer shares, for all of max_request_s (300 s).
    # Each message of the stream now has the read limit (10 s by default).
    process = trained_fed.processes["hong-kong"]
    mark = len(process.log_path.read_text(errors="replace"))
    with _training_slot_held(trained_fed, "hong-kong", "withholder", expect=None):
        _wait_for_log(
            process,
            "cancelled train by",  # the read limit's watchdog: "request not received within"
            "the node kept the slot for a caller that stopped sending",
            after=mark,
        )
        fed = _fed(trained_fed)
        fed.clients["hong-kong"].train(
            dataclasses.replace(_RAW_CONFIG, job_id="after-withholder"),
            _good_weights(),
            on_result=lambda _: lambda *_: None,
            timeout_s=60,
        )


def test_nan_weights_are_invalid_argument_and_charge_nothing(
    trained_fed: LocalFederation,
) -> None:
    fed = _fed(trained_fed)
    weights = _good_weights()
    # A round that succeeds leaves its buffers to the next round of the same layout.
    fed.clients["shenzhen"].train(
        dataclasses.replace(_RAW_CONFIG, job_id="nan-job"),
        weights,
        on_result=lambda _: lambda *_: None,
        timeout_s=60,
    )
    before = releases(fed)
    weights["2.weight"][0, 3] = np.nan
    for _ in range(2):
        error = _raw_train(trained_fed, "shenzhen", weights)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or infinite" in (error.details() or "")
    assert releases(fed) == before
    # The first refused round received into those buffers, and a refused round gives back
    # nothing (they may hold part of a NaN model): the second received into new ones.
    log = trained_fed.processes["shenzhen"].log_path.read_text(errors="replace")
    into = re.findall(r"train job raw-job round 0 .* bytes into (.*)", log)
    assert into[-2:] == ["the last round's buffers", "new buffers"]


# ---------------------------------------------------------------- budget, failures, resume


@pytest.fixture
def budget_fed(tmp_path: Path) -> Iterator[LocalFederation]:
    """Two TLS nodes with a budget of epsilon 12 per node, at most 8 per release."""
    local = LocalFederation.synthetic(
        rows=500, epsilon=12.0, max_epsilon_per_release=8.0, workdir=tmp_path / "fed"
    )
    local.start()
    yield local
    local.stop()


def test_budget_refuses_a_job_it_cannot_afford_and_charges_nothing(
    budget_fed: LocalFederation,
) -> None:
    fed = _fed(budget_fed)
    fed.analyze(Count("credit"), epsilon=8.0)
    before = releases(fed)
    # 6 fits the per-release cap (8), but the job composed with the 8 spent passes 12:
    # refused before round 0 spends anything.
    with pytest.raises(BudgetExhaustedError, match="remaining_epsilon=4") as info:
        fed.train(SPEC, rounds=3, target_epsilon=6.0, **TRAINING)
    assert info.value.remaining_epsilon == pytest.approx(4.0)
    assert releases(fed) == before
    with pytest.raises(BudgetExhaustedError, match="per-release cap of 8"):
        fed.train(SPEC, rounds=3, target_epsilon=9.0, **TRAINING)
    assert releases(fed) == before


@pytest.fixture(scope="module")
def fragile_module_fed() -> Iterator[LocalFederation]:
    local = LocalFederation.synthetic(rows=2000, epsilon=100.0, max_epsilon_per_release=10.0)
    local.start()
    yield local
    local.stop()


@pytest.fixture
def fragile_fed(fragile_module_fed: LocalFederation) -> Iterator[LocalFederation]:
    """Two TLS nodes that tests kill; any node killed is restarted after the test."""
    yield fragile_module_fed
    for name, proc in list(fragile_module_fed.processes.items()):
        if proc.process.poll() is not None:
            fragile_module_fed.restart(name)


def _when_checkpointed(directory: Path, round_index: int, action: threading.Event) -> None:
    """Set ``action`` once the checkpoint of ``round_index`` is written."""
    path = directory / "checkpoint.json"
    while not action.wait(0.05):
        try:
            if json.loads(path.read_text())["round"] >= round_index:
                action.set()
        except (OSError, ValueError, KeyError):
            continue


def _kill_after_round(
    local: LocalFederation, node: str, directory: Path, round_index: int
) -> threading.Thread:
    def watch() -> None:
        reached = threading.Event()
        _when_checkpointed(directory, round_index, reached)
        local.processes[node].kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_node_killed_mid_run_is_recorded_and_the_run_goes_on(
    fragile_fed: LocalFederation, tmp_path: Path
) -> None:
    fed = _fed(fragile_fed)
    watcher = _kill_after_round(fragile_fed, "shenzhen", tmp_path / "ckpt", 0)
    result = fed.train(
        SPEC,
        rounds=4,
        target_epsilon=2.0,
        min_nodes=1,
        checkpoint_dir=tmp_path / "ckpt",
        **TRAINING,
    )
    watcher.join(timeout=30)
    assert result.history[0].answered == ("hong-kong", "shenzhen")
    last = result.history[-1]
    assert last.answered == ("hong-kong",)
    assert last.missing == ("shenzhen",)
    assert "shenzhen" in dict(last.failures)
    assert all("hong-kong" in r.answered for r in result.history)


def test_a_node_busy_when_the_job_starts_joins_once_its_schema_is_checked(
    fragile_fed: LocalFederation,
) -> None:
    # Withheld calls hold every one of the consumer's slots at shenzhen when the job starts,
    # so its Describe is refused busy: its schema is unchecked and round 0 goes without it.
    # Once they are let go, the next round describes shenzhen first (its receipts then carry
    # its key, from that Describe) and trains there.
    identity = fragile_fed.identity
    assert identity is not None
    addresses = {name: proc.address for name, proc in fragile_fed.processes.items()}
    credentials = pki.channel_credentials(identity)
    options = [("grpc.ssl_target_name_override", "shenzhen")]
    until = threading.Event()

    def withheld() -> Iterator[bytes]:
        until.wait(60)
        yield from ()

    def release(record: RoundRecord) -> None:
        if record.round == 0:
            until.set()
            deadline = time.monotonic() + 30
            while not all(call.done() for call in held):
                assert time.monotonic() < deadline, "the withheld calls never ended"
                time.sleep(0.05)

    with grpc.secure_channel(addresses["shenzhen"], credentials, options=options) as channel:
        call = channel.stream_unary("/federation.v1.Node/Describe", request_serializer=None)
        held: list[grpc.Future] = []
        try:
            with closing(
                NodeClient("shenzhen", addresses["shenzhen"], identity=identity, busy_retries=0)
            ) as probe:
                held = hold_slots(
                    lambda: call.future(withheld(), timeout=60),
                    4,  # the consumer's max_concurrent_requests
                    probe,
                    within_s=20,
                    problem="the calls never took the slots",
                )
            with Coordinator.from_addresses(addresses, identity=identity) as fed:
                fed.clients["shenzhen"].busy_retries = 0  # refused at once, while still held
                result = fed.train(
                    SPEC, rounds=3, target_epsilon=2.0, min_nodes=1, on_round=release, **TRAINING
                )
        finally:
            until.set()
    first, *later = result.history
    assert first.answered == ("hong-kong",)
    assert "too many concurrent requests" in dict(first.failures)["shenzhen"]
    joined = [n for r in later for n in r.nodes if n.node == "shenzhen"]
    assert joined, "shenzhen never joined after its slots were freed"
    assert all(n.receipt.get("node_key", "").startswith("-----BEGIN") for n in joined)


def test_checkpoint_then_resume_continues_the_same_job(
    fragile_fed: LocalFederation, tmp_path: Path
) -> None:
    directory = tmp_path / "ckpt"
    fed = _fed(fragile_fed)
    watcher = _kill_after_round(fragile_fed, "shenzhen", directory, 1)
    with pytest.raises(NodeUnavailableError, match="shenzhen"):
        fed.train(SPEC, rounds=4, target_epsilon=2.0, checkpoint_dir=directory, **TRAINING)
    watcher.join(timeout=30)
    saved = json.loads((directory / "checkpoint.json").read_text())
    done = saved["round"] + 1
    assert 2 <= done < 4

    fragile_fed.restart("shenzhen")
    fed = _fed(fragile_fed)
    # Not the same job: refused before any round (the nodes chose their noise for it).
    for changed, message in (
        ({"rounds": 5}, "is for a job of 4 rounds"),
        ({"server_lr": 0.5}, "used server_lr 1.0"),
        ({"resume": False}, "already holds a training checkpoint"),
    ):
        arguments: dict[str, Any] = {
            "rounds": 4, "target_epsilon": 2.0, "checkpoint_dir": directory, "resume": True,
            **TRAINING, **changed,
        }  # fmt: skip
        with pytest.raises(InvalidRequestError, match=message):
            fed.train(SPEC, **arguments)
    assert json.loads((directory / "checkpoint.json").read_text()) == saved
    arguments = {"rounds": 4, "target_epsilon": 2.0, "checkpoint_dir": directory, **TRAINING}
    # Another job writing there now (it holds the directory's lock): refused, uncharged.
    before = releases(fed)
    with checkpoint_lock(directory), pytest.raises(InvalidRequestError, match="in use by"):
        fed.train(SPEC, resume=True, **arguments)
    assert releases(fed) == before
    # The nodes' schema changed since the job started (here: the checkpoint's record of it
    # edited): records would become inputs differently in the rounds left.
    edited = json.loads(json.dumps(saved))
    age = next(c for c in edited["schema"]["columns"] if c["name"] == "age")
    age["upper"] = age["upper"] * 2
    (directory / "checkpoint.json").write_text(json.dumps(edited))
    with pytest.raises(InvalidRequestError, match="schema of dataset 'credit' changed"):
        fed.train(SPEC, resume=True, **arguments)
    # Written under other optimizer defaults (betas, tau): its moments are another's.
    edited = json.loads(json.dumps(saved))
    edited["optimizer"]["beta1"] = 0.5
    (directory / "checkpoint.json").write_text(json.dumps(edited))
    with pytest.raises(InvalidRequestError, match="used server optimizer settings"):
        fed.train(SPEC, resume=True, **arguments)
    (directory / "checkpoint.json").write_text(json.dumps(saved))
    # The digest is chosen per run, not per job: the resumed rounds commit with SHA-256.
    result = fed.train(
        SPEC,
        rounds=4,
        target_epsilon=2.0,
        checkpoint_dir=directory,
        resume=True,
        tensor_digest="sha256",
        **TRAINING,
    )
    assert isinstance(result, TrainingResult)
    assert result.job_id == saved["job_id"]
    assert [r.round for r in result.history] == [0, 1, 2, 3]
    assert [r.to_dict() for r in result.history[:done]] == saved["history"]
    assert result.history[-1].answered == ("hong-kong", "shenzhen")
    # Each node reports the job's spend from its own ledger: every charged round of the
    # job, the one that failed (hong-kong trained it while shenzhen was down) included.
    last = {n.node: n.job_epsilon for n in result.history[-1].nodes}
    for name, reported in last.items():
        ledger = Ledger(fragile_fed.state_dir(name) / "ledger.sqlite")
        try:
            (consumer, charged), *_ = ledger._connect().execute(
                "SELECT consumer, COUNT(*) FROM charges WHERE operation = 'train'"
                " AND json_extract(details, '$.job_id') = ? GROUP BY consumer",
                (result.job_id,),
            )
            composed = ledger.job_spend(consumer, result.job_id).epsilon_at(1e-7)
        finally:
            ledger.close()
        assert reported == pytest.approx(composed, rel=1e-9), name
        assert charged >= (5 if name == "hong-kong" else 4), name
    assert last["hong-kong"] > 2.0  # the retried round is counted, not hidden
    released = [[n.receipt["released"] for n in r.nodes] for r in result.history]
    versions = [{p["version"] for p in r if isinstance(p, dict)} for r in released]
    assert versions == [{2}] * done + [{1}] * (4 - done)
    _assert_receipts_verify(fragile_fed, [n for r in result.history for n in r.nodes])


def test_a_checkpoint_that_cannot_be_written_names_the_paid_round(
    trained_fed: LocalFederation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # numpy scalars are plain numbers in the checkpoint (an np.int64 used to fail its
    # serialisation after the nodes had charged the round).
    fed = _fed(trained_fed)
    settings = {**TRAINING, "local_steps": np.int64(2), "learning_rate": np.float32(2.0)}
    result = fed.train(
        SPEC, rounds=1, target_epsilon=1.0, checkpoint_dir=tmp_path / "a", **settings
    )
    assert (
        json.loads((tmp_path / "a" / "checkpoint.json").read_text())["config"]["local_steps"] == 2
    )
    assert result.history[0].answered == ("hong-kong", "shenzhen")
    real = training_module.save_checkpoint
    calls = []

    def full_disk(*args: Any, **kwargs: Any) -> Path:
        calls.append(kwargs["round_index"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(training_module, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left") as info:
        fed.train(SPEC, rounds=3, target_epsilon=1.0, checkpoint_dir=tmp_path / "b", **settings)
    (note,) = info.value.__notes__
    assert note.startswith("round 2 of 3 was charged at hong-kong, shenzhen and applied")
    assert "runs this round again, charged again" in note
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["round"] == 0


# ---------------------------------------------------------------- the command line


def test_train_command_prints_rounds_and_saves_a_loadable_model(
    trained_fed: LocalFederation, tmp_path: Path
) -> None:
    pki_dir = trained_fed.workdir / "pki"
    lines = [
        "[tls]",
        f'ca = "{pki_dir / "ca.pem"}"',
        f'cert = "{pki_dir / "local-researcher.pem"}"',
        f'key = "{pki_dir / "local-researcher.key"}"',
    ]
    for name, proc in trained_fed.processes.items():
        lines += ["", "[[nodes]]", f'name = "{name}"', f'address = "{proc.address}"']
    config = tmp_path / "federation.toml"
    config.write_text("\n".join(lines) + "\n")
    out = tmp_path / "model.safetensors"
    (tmp_path / "mine.py").write_text(EVALUATE_FILE)
    proc = subprocess.run(
        [
            sys.executable, "-m", "federation", "train", "--config", str(config),
            "--model", "mlp", "--hidden", "8", "--dataset", "credit",
            "--features", "age,income,debt_ratio", "--target", "defaulted",
            "--rounds", "2", "--target-epsilon", "1", "--sample-rate", "0.05",
            "--local-steps", "2", "--metrics-epsilon", "0.2", "--server-optimizer", "fedadam",
            "--tensor-digest", "sha256", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--evaluate", "mine.py:evaluate", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["round", "nodes", "ε", "hong-kong"]
    assert [row.split()[:2] for row in table[1:3]] == [["1", "2"], ["2", "2"]]
    assert "own auc" in table[0]  # --evaluate: the coordinator's own data, each round
    assert "training" in proc.stderr  # the progress bar
    sidecar = json.loads((tmp_path / "model.safetensors.json").read_text())
    spec = ModelSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in sidecar["spec"].items()}
    )
    model = build_model(spec, input_dim=sidecar["input_dim"])
    model.load_state_dict(safetensors.torch.load_file(out))
    # --tensor-digest reached the nodes: every round's receipts commit with SHA-256.
    checkpoint = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    released = [n["receipt"]["released"] for r in checkpoint["history"] for n in r["nodes"]]
    assert len(released) == 4
    assert all(p["version"] == 1 and "sha256" in p["update"][0] for p in released)
    assert [sorted(r["evaluation"]) for r in checkpoint["history"]] == [
        ["accuracy", "auc", "loss"]
    ] * 2


# What a consumer writes for `federation train --evaluate mine.py:evaluate`: its own
# records, encoded as the nodes encode theirs.
EVALUATE_FILE = """
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.metrics import evaluator
from federation.models import encode_features

_own = synthetic_credit(jurisdiction="hong-kong", rows=500, seed=3)
_x = encode_features(_own, features=("age", "income", "debt_ratio"), schema=CREDIT_SCHEMA)
evaluate = evaluator(_x, _own["defaulted"])
"""


# ---------------------------------------------------------------- training device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nodes_train_on_cuda_when_their_config_says_so() -> None:
    local = LocalFederation.synthetic(
        rows=3000, epsilon=50.0, max_epsilon_per_release=20.0, device="cuda"
    )
    with local as fed:
        result = fed.train(SPEC, rounds=3, target_epsilon=4.0, **TRAINING)
        logs = [process.log_path.read_text() for process in local.processes.values()]
    assert all(r.answered == ("hong-kong", "shenzhen") for r in result.history)
    assert all("DP-SGD on device cuda" in log for log in logs)
    assert held_out_auc(result.model) > 0.6


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_node_refuses_to_start_on_a_device_it_lacks() -> None:
    local = LocalFederation.synthetic(rows=500, device="cuda")
    try:
        # One line of cause, not torch's paragraph of linker hints.
        refused = r"node\.device: .*'cuda' is not available: torch .* sees no CUDA device"
        with pytest.raises(NodeUnavailableError, match=refused):
            local.start()
    finally:
        local.stop()
