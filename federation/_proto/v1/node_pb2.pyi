from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColumnType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_TYPE_UNSPECIFIED: _ClassVar[ColumnType]
    COLUMN_TYPE_INT: _ClassVar[ColumnType]
    COLUMN_TYPE_FLOAT: _ClassVar[ColumnType]
    COLUMN_TYPE_BOOL: _ClassVar[ColumnType]
    COLUMN_TYPE_CATEGORY: _ClassVar[ColumnType]

class Operator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATOR_UNSPECIFIED: _ClassVar[Operator]
    OPERATOR_EQ: _ClassVar[Operator]
    OPERATOR_NE: _ClassVar[Operator]
    OPERATOR_LT: _ClassVar[Operator]
    OPERATOR_LE: _ClassVar[Operator]
    OPERATOR_GT: _ClassVar[Operator]
    OPERATOR_GE: _ClassVar[Operator]
    OPERATOR_IN: _ClassVar[Operator]

class QueryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUERY_KIND_UNSPECIFIED: _ClassVar[QueryKind]
    QUERY_KIND_COUNT: _ClassVar[QueryKind]
    QUERY_KIND_SUM: _ClassVar[QueryKind]
    QUERY_KIND_MEAN: _ClassVar[QueryKind]
    QUERY_KIND_HISTOGRAM: _ClassVar[QueryKind]
    QUERY_KIND_QUANTILE: _ClassVar[QueryKind]

class Mechanism(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MECHANISM_UNSPECIFIED: _ClassVar[Mechanism]
    MECHANISM_LAPLACE: _ClassVar[Mechanism]
    MECHANISM_GAUSSIAN: _ClassVar[Mechanism]
COLUMN_TYPE_UNSPECIFIED: ColumnType
COLUMN_TYPE_INT: ColumnType
COLUMN_TYPE_FLOAT: ColumnType
COLUMN_TYPE_BOOL: ColumnType
COLUMN_TYPE_CATEGORY: ColumnType
OPERATOR_UNSPECIFIED: Operator
OPERATOR_EQ: Operator
OPERATOR_NE: Operator
OPERATOR_LT: Operator
OPERATOR_LE: Operator
OPERATOR_GT: Operator
OPERATOR_GE: Operator
OPERATOR_IN: Operator
QUERY_KIND_UNSPECIFIED: QueryKind
QUERY_KIND_COUNT: QueryKind
QUERY_KIND_SUM: QueryKind
QUERY_KIND_MEAN: QueryKind
QUERY_KIND_HISTOGRAM: QueryKind
QUERY_KIND_QUANTILE: QueryKind
MECHANISM_UNSPECIFIED: Mechanism
MECHANISM_LAPLACE: Mechanism
MECHANISM_GAUSSIAN: Mechanism

class Column(_message.Message):
    __slots__ = ("name", "type", "has_bounds", "lower", "upper", "domain", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ColumnType
    has_bounds: bool
    lower: float
    upper: float
    domain: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ColumnType, str]] = ..., has_bounds: _Optional[bool] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., domain: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class DatasetSchema(_message.Message):
    __slots__ = ("name", "columns", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    description: str
    def __init__(self, name: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("epsilon", "delta")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("total", "spent_epsilon", "remaining_epsilon", "releases", "max_epsilon_per_release", "max_delta_per_release")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPENT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    MAX_EPSILON_PER_RELEASE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELTA_PER_RELEASE_FIELD_NUMBER: _ClassVar[int]
    total: Budget
    spent_epsilon: float
    remaining_epsilon: float
    releases: int
    max_epsilon_per_release: float
    max_delta_per_release: float
    def __init__(self, total: _Optional[_Union[Budget, _Mapping]] = ..., spent_epsilon: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., releases: _Optional[int] = ..., max_epsilon_per_release: _Optional[float] = ..., max_delta_per_release: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node_name", "jurisdiction", "software_version", "datasets", "consumer", "budget", "allowed_operations", "receipt_key_pem", "receipt_key_id")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    JURISDICTION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    jurisdiction: str
    software_version: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetSchema]
    consumer: str
    budget: BudgetStatus
    allowed_operations: _containers.RepeatedScalarFieldContainer[str]
    receipt_key_pem: bytes
    receipt_key_id: str
    def __init__(self, node_name: _Optional[str] = ..., jurisdiction: _Optional[str] = ..., software_version: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetSchema, _Mapping]]] = ..., consumer: _Optional[str] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ..., allowed_operations: _Optional[_Iterable[str]] = ..., receipt_key_pem: _Optional[bytes] = ..., receipt_key_id: _Optional[str] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("number", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("column", "op", "values")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    column: str
    op: Operator
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, column: _Optional[str] = ..., op: _Optional[_Union[Operator, str]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class FilterList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, items: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("comparison", "all", "any", "negate")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ANY_FIELD_NUMBER: _ClassVar[int]
    NEGATE_FIELD_NUMBER: _ClassVar[int]
    comparison: Comparison
    all: FilterList
    any: FilterList
    negate: Filter
    def __init__(self, comparison: _Optional[_Union[Comparison, _Mapping]] = ..., all: _Optional[_Union[FilterList, _Mapping]] = ..., any: _Optional[_Union[FilterList, _Mapping]] = ..., negate: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("kind", "dataset", "column", "where", "group_by", "has_bounds", "lower", "upper", "bins", "quantiles")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    HAS_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    kind: QueryKind
    dataset: str
    column: str
    where: Filter
    group_by: str
    has_bounds: bool
    lower: float
    upper: float
    bins: int
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, kind: _Optional[_Union[QueryKind, str]] = ..., dataset: _Optional[str] = ..., column: _Optional[str] = ..., where: _Optional[_Union[Filter, _Mapping]] = ..., group_by: _Optional[str] = ..., has_bounds: _Optional[bool] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., bins: _Optional[int] = ..., quantiles: _Optional[_Iterable[float]] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("query", "epsilon", "delta", "mechanism", "schema_sha256")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_SHA256_FIELD_NUMBER: _ClassVar[int]
    query: Query
    epsilon: float
    delta: float
    mechanism: Mechanism
    schema_sha256: str
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., mechanism: _Optional[_Union[Mechanism, str]] = ..., schema_sha256: _Optional[str] = ...) -> None: ...

class Noise(_message.Message):
    __slots__ = ("mechanism", "scale", "sensitivity", "granularity")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    mechanism: Mechanism
    scale: float
    sensitivity: float
    granularity: float
    def __init__(self, mechanism: _Optional[_Union[Mechanism, str]] = ..., scale: _Optional[float] = ..., sensitivity: _Optional[float] = ..., granularity: _Optional[float] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("name", "values", "noise", "center")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    noise: Noise
    center: float
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., noise: _Optional[_Union[Noise, _Mapping]] = ..., center: _Optional[float] = ...) -> None: ...

class GroupRelease(_message.Message):
    __slots__ = ("group", "measurements")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    group: str
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    def __init__(self, group: _Optional[str] = ..., measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("epsilon", "delta")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("id", "node_name", "consumer", "issued_at", "payload_sha256", "signature", "key_id", "sequence", "cost", "operation", "charge_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    node_name: str
    consumer: str
    issued_at: float
    payload_sha256: str
    signature: bytes
    key_id: str
    sequence: int
    cost: Cost
    operation: str
    charge_id: str
    def __init__(self, id: _Optional[str] = ..., node_name: _Optional[str] = ..., consumer: _Optional[str] = ..., issued_at: _Optional[float] = ..., payload_sha256: _Optional[str] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., sequence: _Optional[int] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., operation: _Optional[str] = ..., charge_id: _Optional[str] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("groups", "bin_labels", "bin_edges", "cost", "budget", "receipt")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    BIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupRelease]
    bin_labels: _containers.RepeatedScalarFieldContainer[str]
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    cost: Cost
    budget: BudgetStatus
    receipt: Receipt
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupRelease, _Mapping]]] = ..., bin_labels: _Optional[_Iterable[str]] = ..., bin_edges: _Optional[_Iterable[float]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("architecture", "hidden", "dataset", "features", "target")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    hidden: _containers.RepeatedScalarFieldContainer[int]
    dataset: str
    features: _containers.RepeatedScalarFieldContainer[str]
    target: str
    def __init__(self, architecture: _Optional[str] = ..., hidden: _Optional[_Iterable[int]] = ..., dataset: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., target: _Optional[str] = ...) -> None: ...

class TrainConfig(_message.Message):
    __slots__ = ("model", "round", "total_rounds", "target_epsilon", "delta", "sample_rate", "local_steps", "learning_rate", "clip_norm", "job_id", "metrics_epsilon", "tensors", "tensor_digest", "probe_logits", "schema_sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROBE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_SHA256_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    round: int
    total_rounds: int
    target_epsilon: float
    delta: float
    sample_rate: float
    local_steps: int
    learning_rate: float
    clip_norm: float
    job_id: str
    metrics_epsilon: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    tensor_digest: str
    probe_logits: _containers.RepeatedScalarFieldContainer[float]
    schema_sha256: str
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., sample_rate: _Optional[float] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., clip_norm: _Optional[float] = ..., job_id: _Optional[str] = ..., metrics_epsilon: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., tensor_digest: _Optional[str] = ..., probe_logits: _Optional[_Iterable[float]] = ..., schema_sha256: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("config", "chunk")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    config: TrainConfig
    chunk: TensorChunk
    def __init__(self, config: _Optional[_Union[TrainConfig, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value", "noise")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    noise: Noise
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., noise: _Optional[_Union[Noise, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("noisy_examples", "examples_noise", "noise_multiplier", "sample_rate", "steps", "cost", "budget", "receipt", "metrics", "tensors", "job_epsilon", "tensor_digest")
    NOISY_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_NOISE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    JOB_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DIGEST_FIELD_NUMBER: _ClassVar[int]
    noisy_examples: float
    examples_noise: Noise
    noise_multiplier: float
    sample_rate: float
    steps: int
    cost: Cost
    budget: BudgetStatus
    receipt: Receipt
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    job_epsilon: float
    tensor_digest: str
    def __init__(self, noisy_examples: _Optional[float] = ..., examples_noise: _Optional[_Union[Noise, _Mapping]] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., job_epsilon: _Optional[float] = ..., tensor_digest: _Optional[str] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("result", "chunk")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    result: TrainResult
    chunk: TensorChunk
    def __init__(self, result: _Optional[_Union[TrainResult, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...
