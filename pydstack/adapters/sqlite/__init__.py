"""SQLite read models (sqlite-utils) fed by the pure folds of ``pydstack.core.projections``,
and actors' checkpoints."""

from ._checkpoint import CheckpointFile, Snapshot
from ._readmodel import SCHEMA, BatchResult, ReadModel, StoredMessage

__all__ = ["SCHEMA", "BatchResult", "CheckpointFile", "ReadModel", "Snapshot", "StoredMessage"]
