"""The digest a training receipt commits to for each update tensor, and how the node and
the coordinator agree on it (federation.training, federation.wire, the coordinator's sink)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
import pytest
from _samples import train_result

from federation import receipts, wire
from federation._proto.v1 import node_pb2 as pb
from federation.coordinator._aggregate import RunningSum
from federation.coordinator.client import NodeClient
from federation.coordinator.training import NodeRound, _Failed, _train_node
from federation.errors import InvalidRequestError
from federation.models import ModelSpec
from federation.training import (
    TensorDigest,
    TrainConfig,
    TrainResult,
    payload_version,
    tensor_digests,
    train_payload,
)

# Published known answers for the empty input: BLAKE3 (BLAKE3-team/BLAKE3 test_vectors.json)
# and SHA-256 (FIPS 180-4). They pin the algorithms a verifier in another language recomputes.
_EMPTY = {
    "blake3": "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}
DIGESTS: tuple[TensorDigest, ...] = ("blake3", "sha256")


@pytest.mark.parametrize("digest", DIGESTS)
def test_an_empty_tensor_digests_to_the_published_answer(digest: TensorDigest) -> None:
    assert tensor_digests({"w": np.zeros((0, 3), np.float32)}, digest) == {"w": _EMPTY[digest]}


def test_payload_versions_name_the_digest_of_their_update_entries() -> None:
    assert (payload_version("sha256"), payload_version("blake3")) == (1, 2)


@pytest.mark.parametrize("digest", DIGESTS)
def test_a_tensor_digests_its_little_endian_c_order_bytes_however_it_is_laid_out(
    digest: TensorDigest,
) -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    raw = values.astype("<f4").tobytes(order="C")
    expected = hashlib.sha256(raw) if digest == "sha256" else blake3.blake3(raw)
    strided = np.asfortranarray(values)  # same values, another memory order
    big_endian = values.astype(">f4")
    digests = tensor_digests({"c": values, "f": strided, "be": big_endian}, digest)
    assert set(digests.values()) == {expected.hexdigest()}


def test_one_changed_ulp_changes_the_digest() -> None:
    values = np.random.default_rng(1).standard_normal(300_001).astype(np.float32)
    changed = values.copy()
    changed[-1] = np.nextafter(changed[-1], np.float32(np.inf))
    assert tensor_digests({"w": values}) != tensor_digests({"w": changed})


# ---------------------------------------------------------------- agreeing on the digest


def test_a_config_or_result_without_a_digest_comes_from_an_older_peer_that_used_sha256() -> None:
    spec = ModelSpec("logistic", "credit", ("a",), "y")
    config = TrainConfig(spec, 0, 1, 1.0, 1e-7, 0.1, 1, 0.1, 1.0, "job")
    msg = wire.train_config_to_proto(config, tensors=())
    assert msg.tensor_digest == "blake3"
    msg.ClearField("tensor_digest")  # what a coordinator before payload version 2 sends
    assert wire.train_config_from_proto(msg)[0].tensor_digest == "sha256"
    result_msg = wire.train_result_to_proto(_result("blake3"), tensors=())
    result_msg.ClearField("tensor_digest")  # what a node before payload version 2 sends
    assert wire.train_result_from_proto(result_msg)[0].tensor_digest == "sha256"


def test_an_unknown_digest_is_refused_as_a_bad_request() -> None:
    spec = ModelSpec("logistic", "credit", ("a",), "y")
    config = TrainConfig(spec, 0, 1, 1.0, 1e-7, 0.1, 1, 0.1, 1.0, "job")
    msg = wire.train_config_to_proto(config, tensors=())
    msg.tensor_digest = "md5"
    with pytest.raises(InvalidRequestError, match="tensor_digest must be one of blake3, sha256"):
        wire.train_config_from_proto(msg)
    with pytest.raises(InvalidRequestError, match="tensor_digest"):
        dataclasses.replace(config, tensor_digest="md5")  # type: ignore[arg-type]


def _result(digest: TensorDigest) -> TrainResult:
    return train_result(tensor_digest=digest)


class _StreamedNode:
    """Stands in for a NodeClient: answers ``train`` with the byte frames a node sends, read
    through the client's own reader, after hashing the update with ``digest``. ``legacy``:
    the result names no digest, as a node from before payload version 2 sends it;
    ``tamper``: the signed payload digest is not the one of the update sent."""

    name = "hong-kong"

    def __init__(
        self,
        digest: TensorDigest,
        update: dict[str, npt.NDArray[np.float32]],
        *,
        legacy: bool = False,
        tamper: bool = False,
    ) -> None:
        self.digest, self.update, self.legacy, self.tamper = digest, update, legacy, tamper
        self.asked: TensorDigest | None = None

    def train(
        self,
        config: TrainConfig,
        weights: dict[str, npt.NDArray[np.float32]],
        *,
        on_result: Callable[[TrainResult], Any],
        timeout_s: float,
        group: object = None,
    ) -> TrainResult:
        self.asked = config.tensor_digest
        result = _result(self.digest)  # the node signs what it hashed, and says which
        shapes = {n: a.shape for n, a in self.update.items()}
        payload = train_payload(
            result,
            job_id=config.job_id,
            round=config.round + int(self.tamper),
            shapes=shapes,
            digests=tensor_digests(self.update, self.digest),
        )
        receipt = dataclasses.replace(
            result.receipt, payload_sha256=receipts.payload_sha256(payload)
        )
        headers = wire.tensor_headers(self.update)
        result_msg = wire.train_result_to_proto(
            dataclasses.replace(result, receipt=receipt), tensors=headers
        )
        if self.legacy:
            result_msg.ClearField("tensor_digest")
        frames: Iterator[bytes] = itertools.chain(
            [pb.TrainResponse(result=result_msg).SerializeToString()],
            wire.iter_chunk_frames(self.update, chunk_bytes=4096),
        )
        reader = SimpleNamespace(name=self.name)
        return NodeClient._read_update(reader, frames, headers, on_result)  # type: ignore[arg-type]


def _update() -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(2)
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
    }


def _run_round(node: _StreamedNode, asked: TensorDigest) -> tuple[NodeRound | _Failed, RunningSum]:
    weights = {n: np.zeros_like(a) for n, a in node.update.items()}
    spec = ModelSpec("logistic", "credit", ("a",), "y")
    config = TrainConfig(spec, 0, 1, 1.0, 1e-7, 0.1, 1, 0.1, 1.0, "job", tensor_digest=asked)
    total = RunningSum({n: a.shape for n, a in weights.items()})
    outcome = _train_node(node, config, weights, total, 60.0, "")  # type: ignore[arg-type]
    assert node.asked == asked
    return outcome, total


@pytest.mark.parametrize(
    ("asked", "node_digest", "legacy"),
    [
        ("blake3", "blake3", False),  # both current, the default
        ("sha256", "sha256", False),  # both current, SHA-256 asked for
        ("blake3", "sha256", True),  # a node from before the choice: SHA-256, no name
    ],
)
def test_the_coordinator_hashes_the_update_with_the_digest_the_node_used(
    asked: TensorDigest, node_digest: TensorDigest, legacy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Either way the coordinator's digests of what arrived (over several chunks per tensor)
    # reproduce the payload the node signed, and the round raises no receipt warning.
    update = _update()
    round_, _ = _run_round(_StreamedNode(node_digest, update, legacy=legacy), asked)
    assert isinstance(round_, NodeRound)
    released = round_.receipt["released"]
    assert isinstance(released, dict)
    assert released["version"] == payload_version(node_digest)
    assert [u[node_digest] for u in released["update"]] == list(
        tensor_digests(update, node_digest).values()
    )
    signed = round_.receipt["receipt"]
    assert isinstance(signed, dict)
    assert receipts.payload_sha256(released) == signed["payload_sha256"]
    assert "receipt does not match" not in caplog.text


def test_a_node_that_answers_sha256_with_blake3_is_dropped_before_its_update_is_summed() -> None:
    round_, total = _run_round(_StreamedNode("blake3", _update()), "sha256")
    assert isinstance(round_, _Failed)
    assert "committed to its update with blake3; this job asked for sha256" in str(round_.error)
    assert not round_.contributed
    assert all(not s.any() for s in total.sums.values())
    # Its result had arrived, so the node charged the round: the history keeps that cost,
    # with the receipt but no released values (the update was never taken in).
    assert round_.charged is not None
    assert round_.charged.epsilon == _result("blake3").cost_epsilon
    assert "released" not in round_.charged.receipt
    assert set(receipts.find_receipt_records([round_.charged.receipt])) == set()


def test_a_receipt_that_does_not_match_the_update_is_reported_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    round_, _ = _run_round(_StreamedNode("blake3", _update(), tamper=True), "blake3")
    assert isinstance(round_, NodeRound)  # kept: already summed, and its cost was charged
    assert "node hong-kong round 1: the receipt does not match the update" in caplog.text
