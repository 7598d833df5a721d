"""Federation: privacy-preserving federated analytics and learning across jurisdictions.

Nodes keep raw records in their jurisdiction and release only differentially private
statistics; a ``Coordinator`` asks them and combines the answers.
"""

from federation.coordinator import Coordinator, Estimate, GroupResult, NodeSpend, QueryResult
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
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
from federation.releases import BudgetStatus, NodeDescription
from federation.schema import Column, ColumnType, DatasetSchema

__version__ = "0.1.0"

__all__ = [
    "BudgetExhaustedError",
    "BudgetStatus",
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
    "NodeDescription",
    "NodeInternalError",
    "NodeSpend",
    "NodeUnavailableError",
    "PolicyError",
    "Quantile",
    "QueryResult",
    "SchemaMismatchError",
    "Sum",
    "UnauthenticatedError",
    "__version__",
    "parse_filter",
]
