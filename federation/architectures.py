"""Architectures beyond the built-ins, which a node allows only where its policy names them.

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

import math
from types import MappingProxyType

from torch import nn

from federation.errors import InvalidRequestError
from federation.models import MAX_HIDDEN_LAYERS, MODEL_REGISTRY, ModelBuilder, ModelSpec

__all__ = ["EXTENDED_REGISTRY", "WIDE_MLP", "WIDE_MLP_MAX_PARAMETERS", "parameter_count"]

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
