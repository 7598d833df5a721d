"""Convert domain values to and from the protocol (the only module that does).

Paired ``*_to_proto`` / ``*_from_proto`` functions; the ``from`` side validates, because on
a node it reads what a possibly hostile caller sent: malformed input raises
``InvalidRequestError`` (INVALID_ARGUMENT), never anything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from federation._proto.v1 import node_pb2 as pb
from federation.errors import InvalidRequestError
from federation.queries import (
    All,
    Any,
    Comparison,
    Count,
    Filter,
    FilterValue,
    Histogram,
    Mean,
    Mechanism,
    Not,
    Operator,
    Quantile,
    Query,
    Sum,
)
from federation.releases import (
    BudgetStatus,
    GroupRelease,
    Measurement,
    NodeDescription,
    NoiseInfo,
    Receipt,
    Release,
)
from federation.schema import Column, ColumnType, DatasetSchema, check_schema_digest
from federation.training import (
    LEGACY_TENSOR_DIGEST,
    TrainConfig,
    TrainMetric,
    TrainResult,
    check_tensor_digest,
)

if TYPE_CHECKING:
    from federation.models import ModelSpec

__all__ = [
    "AnalyzeRequest",
    "CHUNK_BYTES",
    "ChunkView",
    "MAX_TENSOR_BYTES",
    "TRAIN_METHOD",
    "TensorAssembler",
    "TensorHeader",
    "TensorReader",
    "TrainConfig",
    "TrainMetric",
    "TrainResult",
    "analyze_request_from_proto",
    "analyze_request_to_proto",
    "assemble_tensors",
    "budget_from_proto",
    "budget_to_proto",
    "check_tensor_headers",
    "decode_chunk_frame",
    "description_from_proto",
    "description_to_proto",
    "encode_chunk_frame",
    "filter_from_proto",
    "filter_to_proto",
    "fits",
    "iter_chunk_frames",
    "iter_tensor_chunks",
    "model_spec_from_proto",
    "model_spec_to_proto",
    "parse_train_request",
    "parse_train_response",
    "query_from_proto",
    "query_to_proto",
    "release_from_proto",
    "release_to_proto",
    "schema_from_proto",
    "schema_to_proto",
    "tensor_header_from_proto",
    "tensor_header_to_proto",
    "tensor_headers",
    "train_config_from_proto",
    "train_config_to_proto",
    "train_request_frames",
    "train_response_frames",
    "train_result_from_proto",
    "train_result_to_proto",
]

K = TypeVar("K")

MAX_FILTER_NODES = 256
MAX_FILTER_DEPTH = 32
MAX_IN_VALUES = 1024

_COLUMN_TYPES = {
    ColumnType.INT: pb.COLUMN_TYPE_INT,
    ColumnType.FLOAT: pb.COLUMN_TYPE_FLOAT,
    ColumnType.BOOL: pb.COLUMN_TYPE_BOOL,
    ColumnType.CATEGORY: pb.COLUMN_TYPE_CATEGORY,
}
_OPERATORS = {
    Operator.EQ: pb.OPERATOR_EQ,
    Operator.NE: pb.OPERATOR_NE,
    Operator.LT: pb.OPERATOR_LT,
    Operator.LE: pb.OPERATOR_LE,
    Operator.GT: pb.OPERATOR_GT,
    Operator.GE: pb.OPERATOR_GE,
    Operator.IN: pb.OPERATOR_IN,
}
_MECHANISMS = {Mechanism.LAPLACE: pb.MECHANISM_LAPLACE, Mechanism.GAUSSIAN: pb.MECHANISM_GAUSSIAN}
_KINDS: dict[type, pb.QueryKind] = {
    Count: pb.QUERY_KIND_COUNT,
    Sum: pb.QUERY_KIND_SUM,
    Mean: pb.QUERY_KIND_MEAN,
    Histogram: pb.QUERY_KIND_HISTOGRAM,
    Quantile: pb.QUERY_KIND_QUANTILE,
}


def _reverse(table: Mapping[K, int], value: int, what: str) -> K:
    for key, code in table.items():
        if code == value:
            return key
    raise InvalidRequestError(f"{what}: unknown or unspecified value {value}")


# ------------------------------------------------------------------ schema


def schema_to_proto(schema: DatasetSchema) -> pb.DatasetSchema:
    """Convert a dataset schema to its message."""
    return pb.DatasetSchema(
        name=schema.name,
        description=schema.description,
        columns=[
            pb.Column(
                name=c.name,
                type=_COLUMN_TYPES[c.type],
                has_bounds=c.has_bounds,
                lower=c.lower if c.lower is not None else 0.0,
                upper=c.upper if c.upper is not None else 0.0,
                domain=list(c.domain) if c.type is ColumnType.CATEGORY else [],
                description=c.description,
            )
            for c in schema.columns
        ],
    )


def schema_from_proto(msg: pb.DatasetSchema) -> DatasetSchema:
    """Convert a dataset schema message back to a value."""
    columns = []
    for c in msg.columns:
        ctype = _reverse(_COLUMN_TYPES, c.type, f"column {c.name!r} type")
        columns.append(
            Column(
                name=c.name,
                type=ctype,
                lower=c.lower if c.has_bounds else None,
                upper=c.upper if c.has_bounds else None,
                domain=tuple(c.domain),
                description=c.description,
            )
        )
    return DatasetSchema(name=msg.name, columns=tuple(columns), description=msg.description)


# ------------------------------------------------------------------ filters


def _value_to_proto(value: FilterValue) -> pb.Value:
    if isinstance(value, bool):
        return pb.Value(flag=value)
    if isinstance(value, str):
        return pb.Value(text=value)
    return pb.Value(number=float(value))


def _value_from_proto(msg: pb.Value, column: str) -> FilterValue:
    kind = msg.WhichOneof("kind")
    if kind == "flag":
        return bool(msg.flag)
    if kind == "text":
        return str(msg.text)
    if kind == "number":
        if not math.isfinite(msg.number):
            raise InvalidRequestError(f"filter value for {column!r} must be finite")
        return float(msg.number)
    raise InvalidRequestError(f"filter comparison on {column!r} has an empty value")


def filter_to_proto(expr: Filter) -> pb.Filter:
    """Convert a filter expression tree to its message."""
    if isinstance(expr, Comparison):
        return pb.Filter(
            comparison=pb.Comparison(
                column=expr.column,
                op=_OPERATORS[expr.op],
                values=[_value_to_proto(v) for v in expr.values],
            )
        )
    if isinstance(expr, All):
        return pb.Filter(all=pb.FilterList(items=[filter_to_proto(i) for i in expr.items]))
    if isinstance(expr, Any):
        return pb.Filter(any=pb.FilterList(items=[filter_to_proto(i) for i in expr.items]))
    return pb.Filter(negate=filter_to_proto(expr.item))


def filter_from_proto(msg: pb.Filter) -> Filter:
    """Convert a filter message to an expression tree, enforcing size and depth limits.

    Raises:
        InvalidRequestError: empty node, unknown operator, too many nodes or too deep.
    """
    budget = [MAX_FILTER_NODES]
    return _filter_from_proto(msg, depth=1, budget=budget)  # the root is level 1


def _filter_from_proto(msg: pb.Filter, *, depth: int, budget: list[int]) -> Filter:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidRequestError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidRequestError(f"filter has more than {MAX_FILTER_NODES} nodes")
    kind = msg.WhichOneof("node")
    if kind == "comparison":
        c = msg.comparison
        op = _reverse(_OPERATORS, c.op, f"filter operator on {c.column!r}")
        if len(c.values) > MAX_IN_VALUES:
            raise InvalidRequestError(
                f"filter on {c.column!r} lists {len(c.values)} values; at most {MAX_IN_VALUES}"
            )
        values = tuple(_value_from_proto(v, c.column) for v in c.values)
        return Comparison(column=c.column, op=op, values=values)
    if kind in ("all", "any"):
        items_msg = msg.all.items if kind == "all" else msg.any.items
        if not items_msg:
            raise InvalidRequestError(f"filter '{kind}' node has no items")
        items = tuple(_filter_from_proto(i, depth=depth + 1, budget=budget) for i in items_msg)
        return All(items) if kind == "all" else Any(items)
    if kind == "negate":
        return Not(_filter_from_proto(msg.negate, depth=depth + 1, budget=budget))
    raise InvalidRequestError("filter has an empty node")


# ------------------------------------------------------------------ queries


def query_to_proto(query: Query) -> pb.Query:
    """Convert a query to its message."""
    msg = pb.Query(kind=_KINDS[type(query)], dataset=query.dataset)
    if query.where is not None:
        msg.where.CopyFrom(filter_to_proto(query.where))
    if query.group_by:
        msg.group_by = query.group_by
    if isinstance(query, Count):
        return msg
    msg.column = query.column
    if query.bounds is not None:
        msg.has_bounds = True
        msg.lower, msg.upper = query.bounds
    if isinstance(query, Histogram | Quantile):
        msg.bins = query.bins
    if isinstance(query, Quantile):
        msg.quantiles.extend(query.quantiles)
    return msg


def query_from_proto(msg: pb.Query) -> Query:
    """Convert a query message to a value (validating what a value can check alone)."""
    kind = _reverse(_KINDS, msg.kind, "query kind")
    where = filter_from_proto(msg.where) if msg.HasField("where") else None
    group_by = msg.group_by or None
    if kind is Count:
        return Count(dataset=msg.dataset, where=where, group_by=group_by)
    if not msg.column:
        raise InvalidRequestError("query needs a column")
    bounds = (msg.lower, msg.upper) if msg.has_bounds else None
    common = {"dataset": msg.dataset, "column": msg.column, "where": where, "group_by": group_by}
    if kind is Sum:
        return Sum(**common, bounds=bounds)  # type: ignore[arg-type]
    if kind is Mean:
        return Mean(**common, bounds=bounds)  # type: ignore[arg-type]
    if kind is Histogram:
        return Histogram(**common, bounds=bounds, bins=msg.bins or 10)  # type: ignore[arg-type]
    return Quantile(
        **common,  # type: ignore[arg-type]
        bounds=bounds,
        bins=msg.bins or 256,
        quantiles=tuple(msg.quantiles) or (0.5,),
    )


@dataclass(frozen=True, slots=True)
class AnalyzeRequest:
    """A query and the privacy parameters the consumer asks to spend on it."""

    query: Query
    epsilon: float
    delta: float
    mechanism: Mechanism
    # DatasetSchema.contract_digest of the dataset as the coordinator agreed it; "" = none.
    schema_sha256: str = ""


def analyze_request_to_proto(request: AnalyzeRequest) -> pb.AnalyzeRequest:
    """Convert an analyze request to its message."""
    return pb.AnalyzeRequest(
        query=query_to_proto(request.query),
        epsilon=request.epsilon,
        delta=request.delta,
        mechanism=_MECHANISMS[request.mechanism],
        schema_sha256=request.schema_sha256,
    )


def analyze_request_from_proto(msg: pb.AnalyzeRequest) -> AnalyzeRequest:
    """Convert an analyze request message to a value.

    Raises:
        InvalidRequestError: missing query, unknown mechanism or a malformed query.
    """
    if not msg.HasField("query"):
        raise InvalidRequestError("analyze request has no query")
    mechanism = (
        Mechanism.LAPLACE
        if msg.mechanism == pb.MECHANISM_UNSPECIFIED
        else _reverse(_MECHANISMS, msg.mechanism, "mechanism")
    )
    return AnalyzeRequest(
        query=query_from_proto(msg.query),
        epsilon=msg.epsilon,
        delta=msg.delta,
        mechanism=mechanism,
        schema_sha256=check_schema_digest(msg.schema_sha256),
    )


# ------------------------------------------------------------------ releases


def budget_to_proto(status: BudgetStatus) -> pb.BudgetStatus:
    """Convert a budget status to its message."""
    return pb.BudgetStatus(
        total=pb.Budget(epsilon=status.epsilon, delta=status.delta),
        spent_epsilon=status.spent_epsilon,
        remaining_epsilon=status.remaining_epsilon,
        releases=status.releases,
        max_epsilon_per_release=status.max_epsilon_per_release,
        max_delta_per_release=status.max_delta_per_release,  # None: left unset
    )


def budget_from_proto(msg: pb.BudgetStatus) -> BudgetStatus:
    """Convert a budget status message to a value."""
    return BudgetStatus(
        epsilon=msg.total.epsilon,
        delta=msg.total.delta,
        spent_epsilon=msg.spent_epsilon,
        remaining_epsilon=msg.remaining_epsilon,
        releases=msg.releases,
        max_epsilon_per_release=msg.max_epsilon_per_release,
        max_delta_per_release=(
            msg.max_delta_per_release if msg.HasField("max_delta_per_release") else None
        ),
    )


def _noise_to_proto(noise: NoiseInfo) -> pb.Noise:
    return pb.Noise(
        mechanism=_MECHANISMS[noise.mechanism],
        scale=noise.scale,
        sensitivity=noise.sensitivity,
        granularity=noise.granularity,
    )


def _noise_from_proto(msg: pb.Noise) -> NoiseInfo:
    mechanism = _reverse(_MECHANISMS, msg.mechanism, "noise mechanism")
    return NoiseInfo(
        mechanism=mechanism,
        scale=msg.scale,
        sensitivity=msg.sensitivity,
        granularity=msg.granularity,
    )


def release_to_proto(release: Release) -> pb.AnalyzeResponse:
    """Convert a node's release to its response message."""
    return pb.AnalyzeResponse(
        groups=[
            pb.GroupRelease(
                group=g.group,
                measurements=[
                    pb.Measurement(
                        name=m.name,
                        values=list(m.values),
                        noise=_noise_to_proto(m.noise),
                        center=m.center,
                    )
                    for m in g.measurements
                ],
            )
            for g in release.groups
        ],
        bin_labels=list(release.bin_labels),
        bin_edges=list(release.bin_edges),
        cost=pb.Cost(epsilon=release.cost_epsilon, delta=release.cost_delta),
        budget=budget_to_proto(release.budget),
        receipt=_receipt_to_proto(release.receipt),
    )


def release_from_proto(msg: pb.AnalyzeResponse) -> Release:
    """Convert an analyze response message to a release value."""
    return Release(
        groups=tuple(
            GroupRelease(
                group=g.group,
                measurements=tuple(
                    Measurement(
                        name=m.name,
                        values=tuple(m.values),
                        noise=_noise_from_proto(m.noise),
                        center=m.center,
                    )
                    for m in g.measurements
                ),
            )
            for g in msg.groups
        ),
        bin_labels=tuple(msg.bin_labels),
        bin_edges=tuple(msg.bin_edges),
        cost_epsilon=msg.cost.epsilon,
        cost_delta=msg.cost.delta,
        budget=budget_from_proto(msg.budget),
        receipt=_receipt_from_proto(msg.receipt),
    )


def description_to_proto(desc: NodeDescription) -> pb.DescribeResponse:
    """Convert a node description to its response message."""
    return pb.DescribeResponse(
        node_name=desc.node_name,
        jurisdiction=desc.jurisdiction,
        software_version=desc.software_version,
        datasets=[schema_to_proto(s) for s in desc.datasets],
        consumer=desc.consumer,
        budget=budget_to_proto(desc.budget),
        allowed_operations=list(desc.allowed_operations),
        receipt_key_pem=desc.receipt_key_pem,
        receipt_key_id=desc.receipt_key_id,
    )


def description_from_proto(msg: pb.DescribeResponse) -> NodeDescription:
    """Convert a describe response message to a node description."""
    return NodeDescription(
        node_name=msg.node_name,
        jurisdiction=msg.jurisdiction,
        software_version=msg.software_version,
        datasets=tuple(schema_from_proto(s) for s in msg.datasets),
        consumer=msg.consumer,
        budget=budget_from_proto(msg.budget),
        allowed_operations=tuple(msg.allowed_operations),
        receipt_key_pem=msg.receipt_key_pem,
        receipt_key_id=msg.receipt_key_id,
    )


# ------------------------------------------------------------------ tensors
#
# A tensor travels as a TensorHeader (name, dtype, shape, total_bytes) in the first message of
# a stream, then as TensorChunk messages: raw little-endian C-order bytes, offsets contiguous
# per tensor, each chunk a few MiB so no message nears gRPC's limits whatever the model size.

TENSOR_DTYPE = "float32"
TENSOR_ITEMSIZE = 4
CHUNK_BYTES = 2 * 1024 * 1024
"""Default chunk payload: well under a node's default 4 MiB message cap, with headroom."""
MAX_TENSOR_BYTES = 4 * 1024**3
"""Default cap on the declared bytes of one stream (all its tensors together)."""
MAX_TENSORS = 4096
MAX_TENSOR_NDIM = 8
MAX_TENSOR_NAME = 256

_LITTLE_F32 = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """Layout of one float32 tensor that follows as chunks."""

    name: str
    shape: tuple[int, ...]
    dtype: str = TENSOR_DTYPE

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > MAX_TENSOR_NAME or not self.name.isprintable():
            raise InvalidRequestError(
                f"tensor name must be 1-{MAX_TENSOR_NAME} printable characters; "
                f"got {self.name[:MAX_TENSOR_NAME]!r}"
            )
        if self.dtype != TENSOR_DTYPE:
            raise InvalidRequestError(
                f"tensor {self.name!r}: dtype must be {TENSOR_DTYPE!r}; got {self.dtype[:32]!r}"
            )
        if len(self.shape) > MAX_TENSOR_NDIM or any(d < 0 for d in self.shape):
            raise InvalidRequestError(
                f"tensor {self.name!r}: shape must have at most {MAX_TENSOR_NDIM} "
                f"non-negative dimensions; got {list(self.shape)[:16]}"
            )

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        """Number of bytes of the tensor's data."""
        return self.size * TENSOR_ITEMSIZE


def tensor_headers(arrays: Mapping[str, npt.NDArray[np.float32]]) -> tuple[TensorHeader, ...]:
    """Describe ``arrays`` (float32, in mapping order) as tensor headers.

    Raises:
        InvalidRequestError: an array is not float32.
    """
    headers = []
    for name, array in arrays.items():
        if array.dtype != np.float32:
            raise InvalidRequestError(f"tensor {name!r}: dtype must be float32; got {array.dtype}")
        headers.append(TensorHeader(name=name, shape=tuple(int(d) for d in array.shape)))
    return tuple(headers)


def tensor_header_to_proto(header: TensorHeader) -> pb.TensorHeader:
    """Convert a tensor header to its message."""
    return pb.TensorHeader(
        name=header.name,
        dtype=header.dtype,
        shape=list(header.shape),
        total_bytes=header.total_bytes,
    )


def tensor_header_from_proto(msg: pb.TensorHeader) -> TensorHeader:
    """Convert a tensor header message to a value, checking its declared size.

    Raises:
        InvalidRequestError: not float32, a negative dimension, or ``total_bytes`` differs
            from the shape's element count times 4.
    """
    header = TensorHeader(name=msg.name, shape=tuple(msg.shape), dtype=msg.dtype)
    if header.total_bytes != msg.total_bytes:
        raise InvalidRequestError(
            f"tensor {header.name!r}: total_bytes {msg.total_bytes} does not match shape "
            f"{list(header.shape)} of float32 ({header.total_bytes} bytes)"
        )
    return header


def check_tensor_headers(
    headers: Sequence[TensorHeader], *, max_total_bytes: int = MAX_TENSOR_BYTES
) -> int:
    """Check a stream's headers as a whole; return its total bytes.

    Raises:
        InvalidRequestError: too many tensors, a name used twice, or more bytes in total
            than ``max_total_bytes``.
    """
    if len(headers) > MAX_TENSORS:
        raise InvalidRequestError(f"stream declares {len(headers)} tensors; at most {MAX_TENSORS}")
    names = [h.name for h in headers]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidRequestError(f"stream declares tensor {twice!r} twice")
    total = sum(h.total_bytes for h in headers)
    if total > max_total_bytes:
        raise InvalidRequestError(
            f"stream declares {total} bytes of tensors; this receiver accepts at most "
            f"{max_total_bytes}"
        )
    return total


def iter_tensor_chunks(
    arrays: Mapping[str, npt.NDArray[np.float32]], *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of ``arrays`` (in mapping order, as ``tensor_headers`` describes them).

    Each chunk copies at most ``chunk_bytes`` out of its array and nothing else is copied,
    so a sender holds one chunk beyond the arrays themselves. Empty tensors send no chunk.

    Raises:
        InvalidRequestError: ``chunk_bytes`` is not a positive multiple of 4, or an array is
            not float32.
    """
    if chunk_bytes <= 0 or chunk_bytes % TENSOR_ITEMSIZE:
        raise InvalidRequestError(
            f"chunk_bytes must be a positive multiple of 4; got {chunk_bytes}"
        )
    tensor_headers(arrays)  # dtype check before the first chunk
    for name, array in arrays.items():
        flat = np.ascontiguousarray(array, dtype=_LITTLE_F32).reshape(-1)
        raw = flat.view(np.uint8)
        for start in range(0, raw.size, chunk_bytes):
            yield pb.TensorChunk(
                name=name, offset=start, data=raw[start : start + chunk_bytes].tobytes()
            )


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk whose ``data`` may be a zero-copy view into the message's bytes."""

    name: str
    offset: int
    data: bytes | memoryview


# ``TrainRequest.chunk`` and ``TrainResponse.chunk`` are both field 2: one chunk encoding
# serves both directions. The fast path below writes and reads exactly the bytes protobuf
# would (tests compare them); it exists because protobuf copies a chunk's payload three or
# four times in Python, which at hundreds of MB per round costs seconds.
_CHUNK_TAG = b"\x12"  # field 2, length-delimited
_NAME_TAG = 0x0A  # TensorChunk.name: field 1, length-delimited
_OFFSET_TAG = 0x10  # TensorChunk.offset: field 2, varint
_DATA_TAG = 0x1A  # TensorChunk.data: field 3, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, at: int) -> tuple[int, int]:
    """Return (value, next index); (-1, at) if the varint is malformed or over 64 bits."""
    value = 0
    for shift in range(0, 64, 7):
        if at >= len(buf):
            return -1, at
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, at) if value < 2**64 else (-1, at)
    return -1, at


def encode_chunk_frame(name: str, offset: int, data: npt.NDArray[np.uint8]) -> bytes:
    """Serialize ``{TrainRequest,TrainResponse}(chunk=TensorChunk(name, offset, data))``.

    The bytes equal protobuf's ``SerializeToString`` of that message; ``data`` is copied once.
    """
    head = bytearray()
    name_bytes = name.encode()
    if name_bytes:
        head += bytes((_NAME_TAG,)) + _varint(len(name_bytes)) + name_bytes
    if offset:
        head += bytes((_OFFSET_TAG,)) + _varint(offset)
    if data.size:
        head += bytes((_DATA_TAG,)) + _varint(data.size)
    return b"".join((_CHUNK_TAG, _varint(len(head) + data.size), head, data.data))


def iter_chunk_frames(
    arrays: Mapping[str, npt.NDArray[np.float32]], *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Yield the chunks ``iter_tensor_chunks`` would, already serialized as stream messages."""
    if chunk_bytes <= 0 or chunk_bytes % TENSOR_ITEMSIZE:
        raise InvalidRequestError(
            f"chunk_bytes must be a positive multiple of 4; got {chunk_bytes}"
        )
    tensor_headers(arrays)
    for name, array in arrays.items():
        raw = np.ascontiguousarray(array, dtype=_LITTLE_F32).reshape(-1).view(np.uint8)
        for start in range(0, raw.size, chunk_bytes):
            yield encode_chunk_frame(name, start, raw[start : start + chunk_bytes])


def decode_chunk_frame(frame: bytes) -> ChunkView | None:
    """Read a serialized stream message that is one chunk in canonical form, zero-copy.

    Returns None for any other message or encoding (parse those with protobuf); a
    returned view equals what protobuf would parse.
    """
    if frame[:1] != _CHUNK_TAG:
        return None
    size, at = _read_varint(frame, 1)
    if size < 0 or at + size != len(frame):
        return None
    name = ""
    if at < len(frame) and frame[at] == _NAME_TAG:
        length, at = _read_varint(frame, at + 1)
        if length < 0 or at + length > len(frame):
            return None
        try:
            name = frame[at : at + length].decode()
        except UnicodeDecodeError:
            return None
        at += length
    offset = 0
    if at < len(frame) and frame[at] == _OFFSET_TAG:
        offset, at = _read_varint(frame, at + 1)
        if offset < 0:
            return None
    if at == len(frame):
        return ChunkView(name=name, offset=offset, data=b"")
    if frame[at] != _DATA_TAG:
        return None
    length, at = _read_varint(frame, at + 1)
    if length < 0 or at + length != len(frame):
        return None
    return ChunkView(name=name, offset=offset, data=memoryview(frame)[at:])


class TensorReader:
    """Check a stream of chunks against its headers and hand out each chunk's values.

    ``read`` returns a zero-copy float32 view of one chunk's bytes with its element offset;
    the caller copies or accumulates it where it belongs. Every rule is checked before a
    value is handed out, so a malformed stream is refused before it is used:
    known names only, offsets contiguous per tensor starting at 0, no chunk past the
    declared size, no empty chunk, and (with ``require_finite``) no NaN or infinity.
    ``finish`` checks that every tensor arrived whole.
    """

    def __init__(
        self,
        headers: Sequence[TensorHeader],
        *,
        max_total_bytes: int = MAX_TENSOR_BYTES,
        require_finite: bool = True,
    ) -> None:
        """Check ``headers`` and start expecting offset 0 of each tensor.

        Raises:
            InvalidRequestError: see ``check_tensor_headers``.
        """
        self.total_bytes = check_tensor_headers(headers, max_total_bytes=max_total_bytes)
        self.headers = {h.name: h for h in headers}
        self.require_finite = require_finite
        self.received = dict.fromkeys(self.headers, 0)
        self.received_bytes = 0

    @property
    def is_complete(self) -> bool:
        """Whether every declared byte has arrived (then ``finish`` passes)."""
        return self.received_bytes == self.total_bytes

    def read(self, chunk: pb.TensorChunk | ChunkView) -> tuple[str, int, npt.NDArray[np.float32]]:
        """Check one chunk; return its tensor name, element offset and values (read-only).

        Raises:
            InvalidRequestError: the chunk breaks a rule of the stream (see the class).
        """
        header = self.headers.get(chunk.name)
        if header is None:
            raise InvalidRequestError(
                f"chunk for tensor {chunk.name[:MAX_TENSOR_NAME]!r}, which the stream's headers "
                "do not declare"
            )
        expected = self.received[header.name]
        data = chunk.data  # one access: a protobuf bytes field may copy on every access
        size = len(data)
        if chunk.offset != expected:
            raise InvalidRequestError(
                f"tensor {header.name!r}: chunk at byte offset {chunk.offset}; expected "
                f"{expected} (chunks of a tensor arrive in order, without gaps)"
            )
        if size == 0 or size % TENSOR_ITEMSIZE:
            raise InvalidRequestError(
                f"tensor {header.name!r}: chunk of {size} bytes; chunks carry a positive "
                "multiple of 4 bytes"
            )
        if expected + size > header.total_bytes:
            raise InvalidRequestError(
                f"tensor {header.name!r}: chunk ends at byte {expected + size}, past the "
                f"declared {header.total_bytes}"
            )
        values = np.frombuffer(data, dtype=_LITTLE_F32)
        if self.require_finite and not np.isfinite(values).all():
            raise InvalidRequestError(
                f"tensor {header.name!r} holds a NaN or infinite value (near element "
                f"{expected // TENSOR_ITEMSIZE}); weights must be finite"
            )
        self.received[header.name] = expected + size
        self.received_bytes += size
        return header.name, expected // TENSOR_ITEMSIZE, values

    def finish(self) -> None:
        """Check that every declared tensor arrived whole.

        Raises:
            InvalidRequestError: the stream ended early (the message names a short tensor).
        """
        for name, header in self.headers.items():
            if self.received[name] != header.total_bytes:
                raise InvalidRequestError(
                    f"stream ended with tensor {name!r} at {self.received[name]} of "
                    f"{header.total_bytes} bytes"
                )


class TensorAssembler:
    """Reassemble a chunk stream into float32 arrays, writing each chunk in place.

    Buffers are allocated once from the headers (``np.empty``: pages are committed only as
    chunks fill them), or taken from ``into``, and each chunk is copied straight into its
    slot: no list of chunks, no second full copy.
    """

    def __init__(
        self,
        headers: Sequence[TensorHeader],
        *,
        max_total_bytes: int = MAX_TENSOR_BYTES,
        require_finite: bool = True,
        into: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        """Check ``headers`` and allocate one buffer per tensor (or use ``into``'s).

        ``into``, if given, must hold a writable C-contiguous float32 array of each header's
        name and shape (``fits``); its contents are overwritten.

        Raises:
            InvalidRequestError: see ``check_tensor_headers``.
            ValueError: ``into`` does not fit ``headers``.
        """
        self._reader = TensorReader(
            headers, max_total_bytes=max_total_bytes, require_finite=require_finite
        )
        if into is None:
            self._arrays = {h.name: np.empty(h.shape, dtype=np.float32) for h in headers}
        elif fits(into, headers):
            self._arrays = {h.name: into[h.name] for h in headers}
        else:
            raise ValueError("TensorAssembler(into=...): the arrays do not fit the headers")
        self._flat = {name: a.reshape(-1) for name, a in self._arrays.items()}

    @property
    def received_bytes(self) -> int:
        """Bytes of tensor data received so far."""
        return self._reader.received_bytes

    @property
    def is_complete(self) -> bool:
        """Whether every declared byte has arrived."""
        return self._reader.is_complete

    def add(self, chunk: pb.TensorChunk | ChunkView) -> None:
        """Check one chunk and copy it into place.

        Raises:
            InvalidRequestError: the chunk breaks a rule of the stream (see ``TensorReader``).
        """
        name, offset, values = self._reader.read(chunk)
        self._flat[name][offset : offset + values.size] = values

    def finish(self) -> dict[str, npt.NDArray[np.float32]]:
        """Return the arrays, in header order, once every tensor is complete.

        Raises:
            InvalidRequestError: a tensor is incomplete.
        """
        self._reader.finish()
        return self._arrays


def fits(arrays: Mapping[str, npt.NDArray[np.float32]], headers: Sequence[TensorHeader]) -> bool:
    """Whether ``arrays`` can receive ``headers``' tensors in place (``TensorAssembler(into=)``):
    the same names, for each a writable C-contiguous float32 array of the header's shape, and
    no two sharing memory (one tensor's chunks would overwrite another's).
    """
    return (
        arrays.keys() == {h.name for h in headers}
        and all(
            (a := arrays[h.name]).dtype == np.float32
            and a.shape == h.shape
            and a.flags.c_contiguous
            and a.flags.writeable
            for h in headers
        )
        and _disjoint(arrays.values())
    )


def _disjoint(arrays: Iterable[npt.NDArray[np.float32]]) -> bool:
    """Whether C-contiguous ``arrays`` occupy disjoint memory (empty ones occupy none)."""
    spans = sorted(
        (start, start + a.nbytes)
        for a in arrays
        if a.nbytes
        for start in (a.__array_interface__["data"][0],)
    )
    return all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def assemble_tensors(
    headers: Sequence[TensorHeader],
    chunks: Iterable[pb.TensorChunk | ChunkView],
    *,
    max_total_bytes: int = MAX_TENSOR_BYTES,
    require_finite: bool = True,
) -> dict[str, npt.NDArray[np.float32]]:
    """Reassemble a whole chunk stream (see ``TensorAssembler``)."""
    assembler = TensorAssembler(
        headers, max_total_bytes=max_total_bytes, require_finite=require_finite
    )
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


# ------------------------------------------------------------------ training


_MAX_HIDDEN_WIRE = 64


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    """Convert a model spec to its message."""
    return pb.ModelSpec(
        architecture=spec.architecture,
        hidden=list(spec.hidden),
        dataset=spec.dataset,
        features=list(spec.features),
        target=spec.target,
    )


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    """Convert a model spec message to a value (``ModelSpec`` checks its own fields).

    Raises:
        InvalidRequestError: a malformed field.
    """
    from federation.models import ModelSpec  # torch loads only where models are used

    if len(msg.hidden) > _MAX_HIDDEN_WIRE:
        raise InvalidRequestError(
            f"model.hidden lists {len(msg.hidden)} layers; at most {_MAX_HIDDEN_WIRE}"
        )
    return ModelSpec(
        architecture=msg.architecture,
        dataset=msg.dataset,
        features=tuple(msg.features),
        target=msg.target,
        hidden=tuple(int(h) for h in msg.hidden),
    )


def train_config_to_proto(
    config: TrainConfig, *, tensors: Sequence[TensorHeader]
) -> pb.TrainConfig:
    """Convert a round's config and the layout of the global weights to its message."""
    return pb.TrainConfig(
        model=model_spec_to_proto(config.spec),
        round=config.round,
        total_rounds=config.total_rounds,
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        sample_rate=config.sample_rate,
        local_steps=config.local_steps,
        learning_rate=config.learning_rate,
        clip_norm=config.clip_norm,
        job_id=config.job_id,
        metrics_epsilon=config.metrics_epsilon,
        tensors=[tensor_header_to_proto(h) for h in tensors],
        tensor_digest=config.tensor_digest,
        probe_logits=config.probe_logits,
        schema_sha256=config.schema_sha256,
    )


def train_config_from_proto(
    msg: pb.TrainConfig,
) -> tuple[TrainConfig, tuple[TensorHeader, ...]]:
    """Convert a train config message to a value and the layout of the weights that follow.

    Raises:
        InvalidRequestError: no model, a malformed field or tensor header.
    """
    if not msg.HasField("model"):
        raise InvalidRequestError("train config has no model")
    if len(msg.tensors) > MAX_TENSORS:
        raise InvalidRequestError(f"train config declares {len(msg.tensors)} tensors")
    config = TrainConfig(
        spec=model_spec_from_proto(msg.model),
        round=msg.round,
        total_rounds=msg.total_rounds,
        target_epsilon=msg.target_epsilon,
        delta=msg.delta,
        sample_rate=msg.sample_rate,
        local_steps=msg.local_steps,
        learning_rate=msg.learning_rate,
        clip_norm=msg.clip_norm,
        job_id=msg.job_id,
        metrics_epsilon=msg.metrics_epsilon,
        tensor_digest=check_tensor_digest(msg.tensor_digest or LEGACY_TENSOR_DIGEST),
        probe_logits=tuple(msg.probe_logits),
        schema_sha256=msg.schema_sha256,
    )
    return config, tuple(tensor_header_from_proto(h) for h in msg.tensors)


def _receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    """Convert a signed receipt (Analyze and Train) to its message."""
    return pb.Receipt(
        id=receipt.id,
        node_name=receipt.node_name,
        consumer=receipt.consumer,
        issued_at=receipt.issued_at,
        payload_sha256=receipt.payload_sha256,
        signature=receipt.signature,
        key_id=receipt.key_id,
        sequence=receipt.sequence,
        cost=pb.Cost(epsilon=receipt.epsilon, delta=receipt.delta),
        operation=receipt.operation,
        charge_id=receipt.charge_id,
    )


def _receipt_from_proto(msg: pb.Receipt) -> Receipt:
    """Convert a receipt message to a value (verify it with ``federation.receipts``)."""
    return Receipt(
        id=msg.id,
        node_name=msg.node_name,
        consumer=msg.consumer,
        issued_at=msg.issued_at,
        payload_sha256=msg.payload_sha256,
        signature=msg.signature,
        key_id=msg.key_id,
        sequence=msg.sequence,
        epsilon=msg.cost.epsilon,
        delta=msg.cost.delta,
        operation=msg.operation,
        charge_id=msg.charge_id,
    )


def train_result_to_proto(
    result: TrainResult, *, tensors: Sequence[TensorHeader]
) -> pb.TrainResult:
    """Convert a round's result and the layout of the update that follows to its message."""
    return pb.TrainResult(
        noisy_examples=result.noisy_examples,
        examples_noise=_noise_to_proto(result.examples_noise),
        noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate,
        steps=result.steps,
        cost=pb.Cost(epsilon=result.cost_epsilon, delta=result.cost_delta),
        budget=budget_to_proto(result.budget),
        receipt=_receipt_to_proto(result.receipt),
        metrics=[
            pb.Metric(name=m.name, value=m.value, noise=_noise_to_proto(m.noise))
            for m in result.metrics
        ],
        tensors=[tensor_header_to_proto(h) for h in tensors],
        job_epsilon=result.job_epsilon,
        tensor_digest=result.tensor_digest,
    )


def train_result_from_proto(
    msg: pb.TrainResult,
) -> tuple[TrainResult, tuple[TensorHeader, ...]]:
    """Convert a train result message to a value and the layout of the update that follows.

    Raises:
        InvalidRequestError: a malformed noise description or tensor header, or a
            non-finite number.
    """
    # Every number goes into the signed payload (canonical JSON refuses NaN) and the
    # history: a non-finite one must drop the node here, before its update is summed.
    numbers = {
        name: getattr(msg, name)
        for name in ("noisy_examples", "noise_multiplier", "sample_rate", "job_epsilon")
    }
    numbers.update(
        {
            "cost.epsilon": msg.cost.epsilon,
            "cost.delta": msg.cost.delta,
            "budget.total.epsilon": msg.budget.total.epsilon,
            "budget.total.delta": msg.budget.total.delta,
            "budget.spent_epsilon": msg.budget.spent_epsilon,
            "budget.remaining_epsilon": msg.budget.remaining_epsilon,
            "budget.max_epsilon_per_release": msg.budget.max_epsilon_per_release,
            "receipt.issued_at": msg.receipt.issued_at,
        }
    )
    numbers.update({f"metric {m.name!r}": m.value for m in msg.metrics})
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise InvalidRequestError(f"train result {name} must be finite; got {value!r}")
    if len(msg.tensors) > MAX_TENSORS:
        raise InvalidRequestError(f"train result declares {len(msg.tensors)} tensors")
    result = TrainResult(
        noisy_examples=msg.noisy_examples,
        examples_noise=_noise_from_proto(msg.examples_noise),
        noise_multiplier=msg.noise_multiplier,
        sample_rate=msg.sample_rate,
        steps=msg.steps,
        cost_epsilon=msg.cost.epsilon,
        cost_delta=msg.cost.delta,
        budget=budget_from_proto(msg.budget),
        receipt=_receipt_from_proto(msg.receipt),
        metrics=tuple(
            TrainMetric(name=m.name, value=m.value, noise=_noise_from_proto(m.noise))
            for m in msg.metrics
        ),
        job_epsilon=msg.job_epsilon,
        tensor_digest=check_tensor_digest(msg.tensor_digest or LEGACY_TENSOR_DIGEST),
    )
    return result, tuple(tensor_header_from_proto(h) for h in msg.tensors)


# ------------------------------------------------------------------ Train stream frames
#
# The Train RPC is served and called with raw bytes (no protobuf (de)serializer on the
# channel) so that chunks take the zero-copy path above; config and result messages go
# through protobuf as usual. The bytes on the wire are the .proto contract either way.

TRAIN_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Node'].full_name}/Train"


def train_request_frames(
    config: TrainConfig,
    weights: Mapping[str, npt.NDArray[np.float32]],
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Yield a Train request stream: the config (with the weights' layout), then chunks."""
    headers = tensor_headers(weights)
    config_msg = train_config_to_proto(config, tensors=headers)
    yield pb.TrainRequest(config=config_msg).SerializeToString()
    yield from iter_chunk_frames(weights, chunk_bytes=chunk_bytes)


def train_response_frames(
    result: TrainResult,
    update: Mapping[str, npt.NDArray[np.float32]],
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Yield a Train response stream: the result (with the update's layout), then chunks."""
    headers = tensor_headers(update)
    result_msg = train_result_to_proto(result, tensors=headers)
    yield pb.TrainResponse(result=result_msg).SerializeToString()
    yield from iter_chunk_frames(update, chunk_bytes=chunk_bytes)


def _chunk_view(msg: pb.TensorChunk) -> ChunkView:
    return ChunkView(name=msg.name, offset=msg.offset, data=msg.data)


def parse_train_request(frame: bytes) -> tuple[TrainConfig, tuple[TensorHeader, ...]] | ChunkView:
    """Read one Train request message: a config (and the layout that follows) or a chunk.

    Raises:
        InvalidRequestError: undecodable bytes, an empty message or a malformed config.
    """
    chunk = decode_chunk_frame(frame)
    if chunk is not None:
        return chunk
    try:
        msg = pb.TrainRequest.FromString(frame)
    except DecodeError as err:
        raise InvalidRequestError(f"undecodable Train request message: {err}") from None
    item = msg.WhichOneof("item")
    if item == "config":
        return train_config_from_proto(msg.config)
    if item == "chunk":
        return _chunk_view(msg.chunk)
    raise InvalidRequestError("empty Train request message")


def parse_train_response(frame: bytes) -> tuple[TrainResult, tuple[TensorHeader, ...]] | ChunkView:
    """Read one Train response message: a result (and the layout that follows) or a chunk.

    Raises:
        InvalidRequestError: undecodable bytes, an empty message or a malformed result.
    """
    chunk = decode_chunk_frame(frame)
    if chunk is not None:
        return chunk
    try:
        msg = pb.TrainResponse.FromString(frame)
    except DecodeError as err:
        raise InvalidRequestError(f"undecodable Train response message: {err}") from None
    item = msg.WhichOneof("item")
    if item == "result":
        return train_result_from_proto(msg.result)
    if item == "chunk":
        return _chunk_view(msg.chunk)
    raise InvalidRequestError("empty Train response message")
