"""SQLite read models (sqlite-utils) fed by the pure folds of ``pydstack.core.projections``."""

from ._readmodel import SCHEMA, BatchResult, ReadModel, StoredMessage

__all__ = ["SCHEMA", "BatchResult", "ReadModel", "StoredMessage"]
