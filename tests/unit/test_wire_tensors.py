"""Tensor streams of federation.wire: chunk then reassemble is bit-exact; bad streams refused."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from _samples import GAUSSIAN_NOISE, train_result
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federation._proto.v1 import node_pb2 as pb
from federation.errors import InvalidRequestError
from federation.models import ModelSpec
from federation.training import TrainConfig
from federation.wire import (
    ChunkView,
    TensorAssembler,
    TensorHeader,
    TensorReader,
    TrainMetric,
    assemble_tensors,
    decode_chunk_frame,
    encode_chunk_frame,
    fits,
    iter_tensor_chunks,
    parse_train_request,
    tensor_header_from_proto,
    tensor_header_to_proto,
    tensor_headers,
    train_request_frames,
    train_result_from_proto,
    train_result_to_proto,
)

Arrays = dict[str, npt.NDArray[np.float32]]

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)
# Any float32 bit pattern: NaN payloads, signed zeros, infinities, subnormals.
any_floats = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
arrays_strategy = st.dictionaries(
    st.text(st.characters(codec="utf-8", categories=("L", "N")), min_size=1, max_size=12),
    hnp.arrays(np.float32, shapes, elements=any_floats),
    max_size=5,
)


def _wire(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    return [pb.TensorChunk.FromString(c.SerializeToString()) for c in chunks]


def _bits(array: npt.NDArray[np.float32]) -> bytes:
    return array.tobytes()


@settings(max_examples=40, deadline=None)
@given(arrays_strategy, st.integers(min_value=1, max_value=40))
def test_chunk_then_reassemble_is_bit_exact(arrays: Arrays, words: int) -> None:
    headers = tensor_headers(arrays)
    headers = tuple(tensor_header_from_proto(tensor_header_to_proto(h)) for h in headers)
    chunks = _wire(list(iter_tensor_chunks(arrays, chunk_bytes=4 * words)))
    assert all(0 < len(c.data) <= 4 * words for c in chunks)
    out = assemble_tensors(headers, chunks, require_finite=False)
    assert list(out) == list(arrays)
    for name, array in arrays.items():
        assert out[name].dtype == np.float32
        assert out[name].shape == array.shape
        assert _bits(out[name]) == _bits(array)


def test_non_contiguous_and_big_endian_inputs_travel_as_little_endian_c_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"t": base.T, "b": base.astype(">f4").astype(np.float32)}
    out = assemble_tensors(tensor_headers(arrays), iter_tensor_chunks(arrays, chunk_bytes=8))
    np.testing.assert_array_equal(out["t"], base.T)
    assert out["t"].flags.c_contiguous


def test_reader_hands_out_element_offsets_for_accumulation() -> None:
    arrays = {"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), dtype=np.float32)}
    reader = TensorReader(tensor_headers(arrays))
    total = {name: np.zeros(a.size, dtype=np.float32) for name, a in arrays.items()}
    for chunk in iter_tensor_chunks(arrays, chunk_bytes=12):
        name, offset, values = reader.read(chunk)
        total[name][offset : offset + values.size] += 2 * values
    reader.finish()
    np.testing.assert_array_equal(total["a"], 2 * arrays["a"])
    assert reader.received_bytes == 64


# ---------------------------------------------------------------- refusals


def _header(name: str = "w", shape: tuple[int, ...] = (4,)) -> TensorHeader:
    return TensorHeader(name=name, shape=shape)


def _chunk(name: str = "w", offset: int = 0, values: tuple[float, ...] = (1.0,)) -> pb.TensorChunk:
    return pb.TensorChunk(name=name, offset=offset, data=np.array(values, "<f4").tobytes())


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.TensorHeader(name="w", dtype="float64", shape=[2], total_bytes=16), "dtype"),
        (pb.TensorHeader(name="w", dtype="float32", shape=[-1], total_bytes=0), "non-negative"),
        (pb.TensorHeader(name="w", dtype="float32", shape=[3], total_bytes=16), "total_bytes"),
        (pb.TensorHeader(name="", dtype="float32", shape=[1], total_bytes=4), "tensor name"),
        (pb.TensorHeader(name="w", dtype="float32", shape=[1] * 9, total_bytes=4), "at most 8"),
    ],
)
def test_malformed_header_is_refused(msg: pb.TensorHeader, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        tensor_header_from_proto(msg)


def test_headers_over_the_size_cap_or_repeated_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="at most 1000"):
        TensorReader([_header(shape=(251,))], max_total_bytes=1000)
    with pytest.raises(InvalidRequestError, match="twice"):
        TensorReader([_header(), _header()])
    huge = _header(shape=(2**40, 2**40))
    with pytest.raises(InvalidRequestError, match="accepts at most"):
        TensorAssembler([huge])


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([_chunk(name="x")], "do not declare"),
        ([_chunk(offset=4)], "expected 0"),
        ([_chunk(), _chunk(offset=0)], "expected 4"),
        ([_chunk(values=(1.0,) * 5)], "past the declared 16"),
        ([pb.TensorChunk(name="w", offset=0, data=b"")], "positive multiple of 4"),
        ([pb.TensorChunk(name="w", offset=0, data=b"abcdef")], "positive multiple of 4"),
        ([_chunk(values=(1.0, math.nan))], "NaN or infinite"),
        ([_chunk(values=(math.inf,))], "NaN or infinite"),
    ],
)
def test_malformed_chunk_is_refused(chunks: list[pb.TensorChunk], message: str) -> None:
    assembler = TensorAssembler([_header()])
    *good, bad = chunks
    for chunk in good:
        assembler.add(chunk)
    with pytest.raises(InvalidRequestError, match=message):
        assembler.add(bad)


def test_incomplete_stream_is_refused() -> None:
    assembler = TensorAssembler([_header(), _header("v", (0,)), _header("u", (1,))])
    assembler.add(_chunk(values=(1.0, 2.0, 3.0, 4.0)))
    with pytest.raises(InvalidRequestError, match="'u' at 0 of 4 bytes"):
        assembler.finish()


def test_sender_refuses_other_dtypes_and_odd_chunk_sizes() -> None:
    with pytest.raises(InvalidRequestError, match="float32"):
        list(iter_tensor_chunks({"w": np.zeros(3)}))
    with pytest.raises(InvalidRequestError, match="multiple of 4"):
        list(iter_tensor_chunks({"w": np.zeros(3, np.float32)}, chunk_bytes=6))


# ---------------------------------------------------------------- train result


@pytest.mark.parametrize(
    "field", ["metric", "cost.epsilon", "budget.spent_epsilon", "receipt.issued_at"]
)
def test_a_train_result_with_a_non_finite_number_is_refused(field: str) -> None:
    # It would crash the coordinator's receipt check (canonical JSON has no NaN) after the
    # node's update had been summed; refusing it here drops the node before that.
    result = train_result(metrics=(TrainMetric("loss", 0.5, GAUSSIAN_NOISE),))
    msg = train_result_to_proto(result, tensors=(_header(),))
    if field == "metric":
        msg.metrics[0].value = float("nan")
    elif field == "cost.epsilon":
        msg.cost.epsilon = float("inf")
    elif field == "budget.spent_epsilon":
        msg.budget.spent_epsilon = float("nan")
    else:
        msg.receipt.issued_at = float("inf")
    with pytest.raises(InvalidRequestError, match="must be finite"):
        train_result_from_proto(msg)


def test_train_result_round_trips() -> None:
    result = train_result(metrics=(TrainMetric("loss", 0.5, GAUSSIAN_NOISE),))
    headers = (_header(), _header("v", (2, 3)))
    msg = pb.TrainResult.FromString(
        train_result_to_proto(result, tensors=headers).SerializeToString()
    )
    assert train_result_from_proto(msg) == (result, headers)


# ---------------------------------------------------------------- the zero-copy frame path


names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=20)


@settings(max_examples=100, deadline=None)
@given(names, st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=64))
def test_chunk_frames_are_exactly_protobufs_bytes(name: str, offset: int, data: bytes) -> None:
    expected = pb.TrainRequest(
        chunk=pb.TensorChunk(name=name, offset=offset, data=data)
    ).SerializeToString()
    frame = encode_chunk_frame(name, offset, np.frombuffer(data, dtype=np.uint8))
    assert frame == expected
    assert pb.TrainResponse.FromString(frame).chunk.data == data  # same field in both
    view = decode_chunk_frame(frame)
    assert view is not None
    assert (view.name, view.offset, bytes(view.data)) == (name, offset, data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=40))
def test_decoding_any_bytes_agrees_with_protobuf_or_defers_to_it(frame: bytes) -> None:
    view = decode_chunk_frame(frame)
    if view is None:
        return  # the caller parses with protobuf
    msg = pb.TrainRequest.FromString(frame)
    assert msg.WhichOneof("item") == "chunk"
    assert (msg.chunk.name, msg.chunk.offset, msg.chunk.data) == (
        view.name,
        view.offset,
        bytes(view.data),
    )


def test_non_canonical_chunk_encodings_take_the_protobuf_path() -> None:
    # Fields out of order: valid protobuf, not the fast path's layout; parsed all the same.
    inner = b"\x1a\x04abcd\x0a\x01w"
    frame = b"\x12" + bytes([len(inner)]) + inner
    assert decode_chunk_frame(frame) is None
    chunk = parse_train_request(frame)
    assert isinstance(chunk, ChunkView)
    assert (chunk.name, chunk.offset, bytes(chunk.data)) == ("w", 0, b"abcd")


def test_train_streams_round_trip_through_frames() -> None:
    spec = ModelSpec("mlp", "credit", ("age", "income"), "defaulted", hidden=(3,))
    config = TrainConfig(
        spec=spec,
        round=1,
        total_rounds=3,
        target_epsilon=2.0,
        delta=1e-7,
        sample_rate=0.01,
        local_steps=5,
        learning_rate=0.5,
        clip_norm=1.0,
        job_id="job-1",
        metrics_epsilon=0.1,
        probe_logits=(0.5, -1.25, 3.0, 0.0, -0.375, 1e-3, 7.5, -2.0),
    )
    weights = {
        "0.weight": np.arange(6, dtype=np.float32).reshape(3, 2),
        "0.bias": np.ones(3, np.float32),
    }
    frames = list(train_request_frames(config, weights, chunk_bytes=8))
    opening = parse_train_request(frames[0])
    assert opening == (config, tensor_headers(weights))
    out = assemble_tensors(tensor_headers(weights), [parse_train_request(f) for f in frames[1:]])  # type: ignore[misc]
    for name, array in weights.items():
        assert _bits(out[name]) == _bits(array)


@pytest.mark.parametrize(
    ("frame", "message"),
    [(b"", "empty Train request"), (b"\xff\xff", "undecodable"), (b"\x0a\x00", "has no model")],
)
def test_malformed_train_requests_are_invalid(frame: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_train_request(frame)


def test_an_assembler_can_receive_into_buffers_it_is_given() -> None:
    sent = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
    headers = tensor_headers(sent)
    into = {"w": np.full((3, 4), 7, np.float32), "b": np.zeros(5, np.float32)}
    assert fits(into, headers)
    assembler = TensorAssembler(headers, into=into)
    for chunk in iter_tensor_chunks(sent, chunk_bytes=8):
        assembler.add(chunk)
    got = assembler.finish()
    assert all(got[name] is into[name] for name in sent)  # in place, no new memory
    assert all(np.array_equal(got[name], sent[name]) for name in sent)
    # Views of one buffer fit as long as they do not overlap.
    one = np.zeros(17, np.float32)
    assert fits({"w": one[:12].reshape(3, 4), "b": one[12:]}, headers)


@pytest.mark.parametrize(
    "into",
    [
        {"w": np.zeros((3, 4), np.float32)},  # a tensor missing
        {"w": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32), "x": np.zeros(1)},
        {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)},  # wrong shape
        {"w": np.zeros((3, 4), np.float64), "b": np.zeros(5, np.float32)},  # wrong dtype
        {"w": np.zeros((4, 3), np.float32).T, "b": np.zeros(5, np.float32)},  # not C order
        {"w": np.frombuffer(bytes(48), np.float32).reshape(3, 4), "b": np.zeros(5, np.float32)},
        {"w": (one := np.zeros(17, np.float32))[:12].reshape(3, 4), "b": one[8:13]},
    ],
    ids=["missing", "extra", "shape", "dtype", "strided", "read-only", "overlapping"],
)
def test_buffers_that_do_not_fit_are_not_received_into(into: Arrays) -> None:
    headers = (TensorHeader("w", (3, 4)), TensorHeader("b", (5,)))
    assert not fits(into, headers)
    with pytest.raises(ValueError, match="do not fit"):
        TensorAssembler(headers, into=into)
