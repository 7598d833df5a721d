"""Federation: privacy-preserving federated analytics and learning across jurisdictions.

Nodes keep raw records in their jurisdiction and release only differentially private
statistics; a ``Coordinator`` asks them and combines the answers.
"""

import importlib
import logging
import typing

from federation.coordinator import Coordinator, Estimate, GroupResult, NodeSpend, QueryResult
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
    NodeBusyError,
    NodeInternalError,
    NodeUnavailableError,
    PolicyError,
    SchemaMismatchError,
    UnauthenticatedError,
)
from federation.filters import parse_filter
from federation.local import LocalFederation
from federation.queries import (
    Count,
    Histogram,
    Mean,
    Mechanism,
    Quantile,
    Sum,
)
from federation.releases import Budgets, BudgetStatus, NodeDescription
from federation.schema import Column, ColumnType, DatasetSchema

if typing.TYPE_CHECKING:
    from federation.coordinator.training import (
        RoundRecord,
        TrainingResult,
        load_model,
        load_schema,
    )
    from federation.models import ModelSpec

__version__ = "0.1.0"

# A library stays quiet unless the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BudgetExhaustedError",
    "BudgetStatus",
    "Budgets",
    "Column",
    "ColumnType",
    "ConfigError",
    "Coordinator",
    "Count",
    "DatasetSchema",
    "Estimate",
    "FederationError",
    "GroupResult",
    "Histogram",
    "InvalidRequestError",
    "LocalFederation",
    "Mean",
    "Mechanism",
    "ModelSpec",
    "NodeBusyError",
    "NodeDescription",
    "NodeInternalError",
    "NodeSpend",
    "NodeUnavailableError",
    "PolicyError",
    "Quantile",
    "QueryResult",
    "RoundRecord",
    "SchemaMismatchError",
    "Sum",
    "TrainingResult",
    "UnauthenticatedError",
    "__version__",
    "load_model",
    "load_schema",
    "parse_filter",
]

# Training names load torch (seconds): imported on first use, so `import federation` stays fast.
_LAZY = {
    "ModelSpec": "federation.models",
    "RoundRecord": "federation.coordinator.training",
    "TrainingResult": "federation.coordinator.training",
    "load_model": "federation.coordinator.training",
    "load_schema": "federation.coordinator.training",
}


def __getattr__(name: str) -> object:
    """Import a training name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'federation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
