"""Architectures beyond the built-ins, which a node allows only where its policy names them.

An operator registers its own in the node config (``[architectures]``, a name and where
its builder is: ``"package.module:function"`` or ``"file.py:function"``); the node imports
that code itself, at start, from its own disk: nothing a coordinator sends is ever run.
A coordinator that trains one passes the same builder (``train(architectures=...)``,
``federation train --architecture NAME=TARGET``) to build the global model it averages
into. :func:`load_builder` resolves a target for both.

``wide-mlp`` is ``mlp`` without the 4096-unit width cap, up to ``WIDE_MLP_MAX_PARAMETERS``
parameters: it exists to move models of hundreds of millions of parameters (the transfer
benchmark). Every node knows it, but ``plan_training`` refuses it with PERMISSION_DENIED
unless the consumer's ``allowed_models`` lists ``"wide-mlp"``, which no default policy does:
an operator opts in per consumer, knowing such a model takes gigabytes of node memory.

>>> from federation.models import ModelSpec
>>> spec = ModelSpec("wide-mlp", "credit", ("age",), "defaulted", hidden=(5000, 10))
>>> parameter_count(spec, input_dim=1)
60021
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from torch import nn

from federation.errors import ConfigError, InvalidRequestError
from federation.models import MAX_HIDDEN_LAYERS, MODEL_REGISTRY, ModelBuilder, ModelSpec

__all__ = [
    "EXTENDED_REGISTRY",
    "WIDE_MLP",
    "WIDE_MLP_MAX_PARAMETERS",
    "load_builder",
    "load_callable",
    "parameter_count",
    "registry_with",
]

WIDE_MLP = "wide-mlp"
WIDE_MLP_MAX_PARAMETERS = 2**31 - 1  # 8 GiB of float32: past every gRPC limit, on purpose
_WIDE_MAX_LAYERS = 4 * MAX_HIDDEN_LAYERS


def parameter_count(spec: ModelSpec, *, input_dim: int) -> int:
    """Return the number of parameters of an ``mlp``/``wide-mlp`` (or ``logistic``) spec."""
    widths = [input_dim, *spec.hidden, 1]
    return sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))


def _wide_mlp(spec: ModelSpec, dim: int) -> nn.Module:
    if not 1 <= len(spec.hidden) <= _WIDE_MAX_LAYERS or min(spec.hidden) < 1:
        raise InvalidRequestError(
            f"model.hidden must list 1-{_WIDE_MAX_LAYERS} widths >= 1 for {WIDE_MLP}; "
            f"got {list(spec.hidden)}"
        )
    count = parameter_count(spec, input_dim=dim)
    if count > WIDE_MLP_MAX_PARAMETERS:
        raise InvalidRequestError(
            f"{WIDE_MLP} with hidden {list(spec.hidden)} has {count} parameters; at most "
            f"{WIDE_MLP_MAX_PARAMETERS} ({math.ceil(WIDE_MLP_MAX_PARAMETERS * 4 / 2**30)} GiB)"
        )
    layers: list[nn.Module] = []
    width = dim
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


EXTENDED_REGISTRY: MappingProxyType[str, ModelBuilder] = MappingProxyType(
    {**MODEL_REGISTRY, WIDE_MLP: _wide_mlp}
)
"""The built-ins plus ``wide-mlp``: what nodes serve and the coordinator builds from."""

_ARCHITECTURE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_builder(target: str, *, base_dir: Path | None = None) -> ModelBuilder:
    """Import a model builder: ``"package.module:function"`` or ``"path/file.py:function"``.

    A relative file path is taken from ``base_dir`` (a node config's folder). The builder is
    called as ``builder(spec, input_dim)`` and returns a ``torch.nn.Module`` whose last
    output is one logit per record; it should refuse (raise) hyper-parameters it does not
    support, sizes included. A file is loaded on its own: what it imports must be
    installed (its folder is not put on the import path; use the module form for a
    package of several files).

    Raises:
        ConfigError: a malformed target, a module or file that does not import, or a
            name there that is not a callable taking ``(spec, input_dim)``.
    """
    return load_callable(target, base_dir=base_dir, call="(spec, input_dim)", args=2)  # type: ignore[return-value]


def load_callable(
    target: str, *, base_dir: Path | None = None, call: str, args: int
) -> Callable[..., object]:
    """Import ``"package.module:function"`` or ``"path/file.py:function"`` (see
    ``load_builder``), checking that it can be called with ``args`` positional arguments
    (``call`` names them in the error).

    Raises:
        ConfigError: a malformed target, a module or file that does not import, or a
            name there that is not such a callable.
    """
    where, _, attribute = target.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ConfigError(f"{target!r} is not 'package.module:function' or 'file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            # A private module name per file: two files may share a stem.
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
            spec = importlib.util.spec_from_file_location(f"_federation_arch_{digest}", path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"{target!r}: cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            # Registered while it runs, as an import would: dataclasses and pickling look
            # a module up by name.
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[spec.name]
                raise
        elif _MODULE.fullmatch(where):
            module = importlib.import_module(where)
        else:
            raise ConfigError(f"{target!r}: {where!r} is neither a module name nor a .py file")
    except ConfigError:
        raise
    except Exception as err:  # the operator's own code: whatever it raises on import
        raise ConfigError(f"{target!r} does not import: {type(err).__name__}: {err}") from err
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{target!r}: {attribute!r} is not a function in {where}")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (some C callables): call-time
        return function  # type: ignore[no-any-return]
    try:
        signature.bind(*([None] * args))
    except TypeError as err:
        raise ConfigError(
            f"{target!r}: {attribute}{signature} cannot be called as {attribute}{call}: {err}"
        ) from None
    return function  # type: ignore[no-any-return]


def registry_with(extra: Mapping[str, ModelBuilder] | None) -> Mapping[str, ModelBuilder]:
    """The built-ins (``EXTENDED_REGISTRY``) plus ``extra``, which may not redefine them.

    Raises:
        InvalidRequestError: a name that is not one, or that a built-in already has (what
            ``"mlp"`` builds must be the same everywhere).
    """
    if not extra:
        return EXTENDED_REGISTRY
    for name in extra:
        if not _ARCHITECTURE_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"architecture names are 1-64 letters, digits, '-' or '_'; got {name!r}"
            )
        if name in EXTENDED_REGISTRY:
            raise InvalidRequestError(f"architecture {name!r} is built in; choose another name")
    return MappingProxyType({**EXTENDED_REGISTRY, **extra})
