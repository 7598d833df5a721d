"""Declarative model specs, shared by node and coordinator: math only, never data.

A consumer names a model by architecture and hyper-parameters (``ModelSpec``); whoever needs
the module builds it from an allow-list of builders (``MODEL_REGISTRY``), never from code or
bytes the other side sent. Weights cross the wire as named float32 arrays
(``state_to_arrays`` / ``arrays_to_state``); the receiving side checks every name, shape,
dtype and value before loading them.

Built-in architectures (both end in one logit for a bool target):

- ``logistic``: ``Linear(d, 1)``; weight names ``weight`` (1, d) and ``bias`` (1,).
- ``mlp``: ``Linear(d, h1), ReLU, ..., Linear(hk, 1)`` as an ``nn.Sequential``; weight
  names ``0.weight``, ``0.bias``, ``2.weight``, ... (ReLUs take the odd indices).

Inputs are ``input_dim(spec, schema)`` wide: one column per numeric or bool feature (scaled
to [0, 1] by the public bounds at the node), and a one-hot block over the public domain per
category feature, in feature order.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from federation.errors import InvalidRequestError
from federation.schema import ColumnType, DatasetSchema

__all__ = [
    "MAX_HIDDEN_LAYERS",
    "MAX_HIDDEN_WIDTH",
    "MODEL_REGISTRY",
    "PROBE_ROWS",
    "PROBE_TOLERANCE",
    "ModelBuilder",
    "ModelSpec",
    "all_finite",
    "arrays_to_state",
    "build_model",
    "check_arrays",
    "encode_features",
    "has_unsaved_buffers",
    "initial_arrays",
    "input_dim",
    "probe_difference",
    "probe_inputs",
    "probe_logits",
    "state_shapes",
    "state_to_arrays",
    "state_views",
]

MAX_HIDDEN_WIDTH = 4096
MAX_HIDDEN_LAYERS = 8
_MAX_FEATURES = 1024
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

ModelBuilder = Callable[["ModelSpec", int], nn.Module]
"""Builds a module for ``(spec, input_dim)``; raises ``InvalidRequestError`` on bad specs."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model described by name and hyper-parameters, plus the data it trains on.

    Attributes:
        architecture: ``"logistic"``, ``"mlp"`` or a name the node operator registered.
        dataset: dataset name at the node.
        features: input columns, in order (numeric, bool or category), distinct.
        target: the bool label column, not among the features.
        hidden: hidden layer widths (``mlp``); empty for ``logistic``.

    Raises:
        InvalidRequestError: a field is malformed (the message names it).
    """

    architecture: str
    dataset: str
    features: tuple[str, ...]
    target: str
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.features, str):  # "age" would be the columns a, g, e
            raise InvalidRequestError(
                f"model.features must be a list of column names; got the string "
                f"{self.features!r} (write [{self.features!r}])"
            )
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if not _NAME_RE.fullmatch(self.architecture):
            raise InvalidRequestError(
                f"model.architecture must be 1-64 letters, digits, '-' or '_'; "
                f"got {self.architecture!r}"
            )
        if not self.dataset:
            raise InvalidRequestError("model.dataset must name a dataset; got ''")
        if not 1 <= len(self.features) <= _MAX_FEATURES:
            raise InvalidRequestError(
                f"model.features must list 1-{_MAX_FEATURES} columns; got {len(self.features)}"
            )
        if len(set(self.features)) != len(self.features):
            raise InvalidRequestError(
                f"model.features lists a column twice; got {list(self.features)}"
            )
        if not self.target:
            raise InvalidRequestError("model.target must name a bool column; got ''")
        if self.target in self.features:
            raise InvalidRequestError(
                f"model.target {self.target!r} is also a feature; a label cannot be an input"
            )
        for width in self.hidden:
            if isinstance(width, bool) or not isinstance(width, int):
                raise InvalidRequestError(
                    f"model.hidden must be integers; got {list(self.hidden)!r}"
                )


def _check_hidden(hidden: tuple[int, ...]) -> None:
    if not 1 <= len(hidden) <= MAX_HIDDEN_LAYERS:
        raise InvalidRequestError(
            f"model.hidden must list 1-{MAX_HIDDEN_LAYERS} layer widths for mlp; "
            f"got {len(hidden)} ({list(hidden)})"
        )
    for width in hidden:
        if not 1 <= width <= MAX_HIDDEN_WIDTH:
            raise InvalidRequestError(
                f"model.hidden widths must be 1-{MAX_HIDDEN_WIDTH}; got {width} in {list(hidden)}"
            )


def _logistic(spec: ModelSpec, dim: int) -> nn.Module:
    if spec.hidden:
        raise InvalidRequestError(
            f"model.hidden must be empty for logistic; got {list(spec.hidden)} (use mlp)"
        )
    return nn.Linear(dim, 1)


def _mlp(spec: ModelSpec, dim: int) -> nn.Module:
    _check_hidden(spec.hidden)
    layers: list[nn.Module] = []
    width = dim
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


MODEL_REGISTRY: Mapping[str, ModelBuilder] = MappingProxyType({"logistic": _logistic, "mlp": _mlp})
"""The built-in architectures. A node may pass its own mapping (built-ins plus
operator-registered names from its config) wherever a ``registry`` is taken; a request
never adds to it."""


def build_model(
    spec: ModelSpec, *, input_dim: int, registry: Mapping[str, ModelBuilder] = MODEL_REGISTRY
) -> nn.Module:
    """Build the module ``spec`` names from ``registry`` (float32, on the current device).

    Parameters are initialised from torch's global generator; build under
    ``torch.device("meta")`` to check a spec without allocating, or use ``initial_arrays``
    for seeded initial weights.

    Args:
        spec: the declarative model.
        input_dim: width of the input, ``input_dim(spec, schema)``, >= 1.
        registry: architecture name -> builder; the built-ins by default.

    Raises:
        InvalidRequestError: unknown architecture, or hyper-parameters out of range
            (``mlp``: 1-8 hidden layers of width 1-4096; ``logistic``: no hidden layers),
            or a registered builder that refuses the spec (any exception it raises) or
            returns something other than a module.
    """
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise InvalidRequestError(f"input_dim must be an integer >= 1; got {input_dim!r}")
    builder = registry.get(spec.architecture)
    if builder is None:
        known = ", ".join(sorted(registry))
        raise InvalidRequestError(
            f"model.architecture {spec.architecture!r} is not known here; known: {known}"
        )
    try:
        model = builder(spec, input_dim)
    except InvalidRequestError:
        raise
    except Exception as err:  # an operator's builder refusing the hyper-parameters it got
        # (any other FederationError too: a builder's BudgetExhaustedError must not read
        # as this consumer's budget running out)
        raise InvalidRequestError(
            f"architecture {spec.architecture!r} cannot be built with hidden "
            f"{list(spec.hidden)} and {input_dim} inputs: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise InvalidRequestError(
            f"architecture {spec.architecture!r} built a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def input_dim(spec: ModelSpec, schema: DatasetSchema) -> int:
    """Return the model's input width: 1 per numeric/bool feature, |domain| per category.

    Raises:
        InvalidRequestError: a feature is not a column of ``schema``.
    """
    width = 0
    for name in spec.features:
        column = schema.column(name)
        width += len(column.domain) if column.type is ColumnType.CATEGORY else 1
    return width


def state_to_arrays(module: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Return the module's state as named float32, C-contiguous numpy copies.

    Shapes are kept, 0-d included (BatchNorm's ``num_batches_tracked``):
    ``np.ascontiguousarray`` would make a scalar 1-d, and the node would refuse it.
    """
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy(order="C")
        for name, tensor in module.state_dict().items()
    }


def has_unsaved_buffers(module: nn.Module) -> bool:
    """Whether ``module`` has a buffer its state dict (the weights on the wire) leaves out.

    Such a (non-persistent) buffer only its constructor sets: a module holding one is built
    for real, not on ``meta``, wherever it is rebuilt from weights.
    """
    saved = set(module.state_dict())
    return any(name not in saved for name, _ in module.named_buffers())


def state_views(module: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Return the module's state as named float32 arrays, sharing memory where possible.

    CPU float32 contiguous tensors come back as numpy views of the module's own storage
    (no copy: later writes to the module show through); anything else is copied as in
    ``state_to_arrays``.
    """
    arrays: dict[str, npt.NDArray[np.float32]] = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous():
            arrays[name] = tensor.numpy()
        else:
            # .to() copies a device or float64 tensor; asarray(order="C") copies a strided
            # CPU one (and keeps a 0-d shape, which ascontiguousarray would make 1-d):
            # either way the array owns its memory, and only one copy is made.
            arrays[name] = np.asarray(tensor.to("cpu", torch.float32).numpy(), order="C")
    return arrays


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Return the shape of every named tensor of the module's state (works on ``meta``)."""
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def check_arrays(
    shapes: Mapping[str, tuple[int, ...]], arrays: Mapping[str, npt.NDArray[np.generic]]
) -> None:
    """Check that ``arrays`` has exactly the expected names and shapes, float32, finite.

    Raises:
        InvalidRequestError: a missing or unexpected name, a wrong shape or dtype, or a
            NaN / infinite value (the message names the tensor, never a value).
    """
    missing = sorted(set(shapes) - set(arrays))
    unexpected = sorted(set(arrays) - set(shapes))
    if missing or unexpected:
        raise InvalidRequestError(
            f"weights must be exactly {sorted(shapes)}; missing {missing}, unexpected {unexpected}"
        )
    for name, shape in shapes.items():
        array = arrays[name]
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise InvalidRequestError(f"weight {name!r} must be float32; got {got}")
        if tuple(array.shape) != tuple(shape):
            raise InvalidRequestError(
                f"weight {name!r} must have shape {list(shape)}; got {list(array.shape)}"
            )
        if not all_finite(array):
            raise InvalidRequestError(f"weight {name!r} contains NaN or infinite values")


_FINITE_BLOCK = 1 << 16


def all_finite(array: npt.NDArray[np.generic]) -> bool:
    """Whether every value of ``array`` is finite, checked block by block.

    ``np.isfinite(array).all()`` allocates a bool array as large as ``array`` (100 MB for
    a 100M-parameter model), whose fresh pages cost more than the check itself, each
    round; blocks of 64k values stay in cache.
    """
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        return bool(np.isfinite(array).all())  # reshape would copy it: check it whole
    flat = array.reshape(-1, order="A")  # a view, in memory order
    return all(
        bool(np.isfinite(flat[start : start + _FINITE_BLOCK]).all())
        for start in range(0, flat.size, _FINITE_BLOCK)
    )


def arrays_to_state(module: nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Load checked named float32 arrays into ``module`` (copied in; device kept).

    Everything is checked before anything is written, so a rejected call leaves the module
    as it was. Tensors are copied one at a time, so memory peaks at one extra tensor (none
    for writable arrays).

    Raises:
        InvalidRequestError: see ``check_arrays``.
    """
    state = module.state_dict()
    check_arrays({name: tuple(t.shape) for name, t in state.items()}, arrays)
    with torch.no_grad():
        for name, target in state.items():
            array = arrays[name]
            # from_numpy shares memory, and warns on read-only arrays: copy those first.
            source = torch.from_numpy(array if array.flags.writeable else array.copy())
            target.copy_(source)


def initial_arrays(
    spec: ModelSpec,
    *,
    input_dim: int,
    seed: int,
    registry: Mapping[str, ModelBuilder] = MODEL_REGISTRY,
) -> dict[str, npt.NDArray[np.float32]]:
    """Return seeded initial weights for ``spec`` (torch's default initialisation).

    The global torch generator is forked and restored, so callers' streams are untouched.

    Raises:
        InvalidRequestError: see ``build_model``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_model(spec, input_dim=input_dim, registry=registry)
    return state_to_arrays(module)


def encode_features(
    columns: Mapping[str, npt.NDArray[np.generic]],
    *,
    features: tuple[str, ...],
    schema: DatasetSchema,
) -> npt.NDArray[np.float32]:
    """Encode records as model inputs, exactly as nodes do for training.

    The encoding is public (it depends on the schema only): numeric columns scaled to
    [0, 1] by their public bounds (clamped), bools as 0/1, categories one-hot over the
    public domain. A consumer uses it to apply a trained model to its own records.

    Args:
        columns: column name -> values; categories as domain strings or int codes.
        features: the model's input columns, in order.
        schema: the dataset's public schema.

    Raises:
        InvalidRequestError: a feature without public bounds, or a category value outside
            the public domain.
    """
    rows = len(next(iter(columns.values()))) if columns else 0
    width = sum(
        len(schema.column(f).domain) if schema.column(f).type is ColumnType.CATEGORY else 1
        for f in features
    )
    out = np.zeros((rows, width), dtype=np.float32)
    at = 0
    for name in features:
        column = schema.column(name)
        values = np.asarray(columns[name])
        if column.type is ColumnType.CATEGORY:
            codes = _category_codes(values, column.domain, name)
            out[np.arange(rows), at + codes] = 1.0
            at += len(column.domain)
            continue
        if column.type.is_numeric:
            if column.lower is None or column.upper is None:
                raise InvalidRequestError(f"feature {name!r} has no public bounds")
            lower, upper = column.lower, column.upper
            clamped = np.clip(values.astype(np.float64), lower, upper)
            out[:, at] = (clamped - lower) / (upper - lower)
        else:
            out[:, at] = values.astype(np.float32)
        at += 1
    return out


def _category_codes(
    values: npt.NDArray[np.generic], domain: tuple[str, ...], name: str
) -> npt.NDArray[np.int64]:
    if np.issubdtype(values.dtype, np.integer):
        codes = values.astype(np.int64)
    else:
        lookup = {value: code for code, value in enumerate(domain)}
        try:
            codes = np.fromiter((lookup[str(v)] for v in values), np.int64, len(values))
        except KeyError as err:
            raise InvalidRequestError(
                f"feature {name!r} has a value outside its public domain"
            ) from err
    if codes.size and (codes.min() < 0 or codes.max() >= len(domain)):
        raise InvalidRequestError(f"feature {name!r} has a code outside its public domain")
    return codes


# ------------------------------------------------------------------ function probe

PROBE_ROWS = 8
PROBE_TOLERANCE = 1e-2
"""Largest relative difference of two builds' probe logits taken as the same function."""


def probe_inputs(input_dim: int) -> npt.NDArray[np.float32]:
    """``PROBE_ROWS`` public rows of ``input_dim`` values in [0, 1), the same everywhere.

    [0, 1) is where encoded records lie (``encode_features`` scales every feature there),
    so a forward that is finite on records (``x.sqrt()``) is finite on these. They come
    from SHAKE-256 of a fixed label (not from a seeded generator, whose stream a library
    update may change), so a coordinator and a node compute them identically without
    exchanging them. They are made-up values, never records.
    """
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise InvalidRequestError(f"input_dim must be an integer >= 1; got {input_dim!r}")
    count = PROBE_ROWS * input_dim
    raw = hashlib.shake_256(f"federation-probe-v2:{input_dim}".encode()).digest(4 * count)
    unit = np.frombuffer(raw, dtype="<u4").astype(np.float64) / 2.0**32
    return unit.astype(np.float32).reshape(PROBE_ROWS, input_dim)


def probe_logits(module: nn.Module, input_dim: int, *, isolate: bool = True) -> tuple[float, ...]:
    """The module's outputs on :func:`probe_inputs`, in eval mode, without gradients.

    A coordinator sends these with a round of an operator-registered architecture; the
    node computes its own build's on the same weights and refuses the round, before any
    charge, when they differ (``probe_difference``): two builders with the same tensor
    names and shapes but another forward (Tanh for ReLU) would otherwise be averaged as
    one model. With ``isolate`` the forward runs on copies of the parameters and buffers,
    so what it writes there never reaches the module's; without, on the module itself
    (for a module that is a copy already, or cannot write: no second copy of a large
    model). The module is left in eval mode.
    """
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.from_numpy(probe_inputs(input_dim)).to(device)
    module.eval()
    with torch.no_grad():
        if isolate:
            params = {name: p.detach().clone() for name, p in module.named_parameters()}
            buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
            out = torch.func.functional_call(module, (params, buffers), (x,))
        else:
            out = module(x)
    if not isinstance(out, torch.Tensor):
        raise InvalidRequestError(f"the model returned {type(out).__name__}, not a tensor")
    return tuple(float(v) for v in out.detach().reshape(-1).double().cpu().tolist())


def probe_difference(expected: Sequence[float], got: Sequence[float]) -> float:
    """The largest difference of ``got`` from ``expected``, relative to ``expected``'s scale.

    ``inf`` when the counts differ or a value is not finite. Below
    :data:`PROBE_TOLERANCE` counts as the same function: float32 results of the same
    forward on other hardware (another BLAS, TF32 on a GPU) differ by far less, two
    different forwards by far more.
    """
    if len(expected) != len(got) or not all(math.isfinite(v) for v in (*expected, *got)):
        return math.inf
    if not expected:
        return 0.0
    scale = max(abs(v) for v in expected) + 1e-3
    return max(abs(a - b) for a, b in zip(expected, got, strict=True)) / scale
