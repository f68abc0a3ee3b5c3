"""The NATS JetStream event store."""

from ..ports import free_port
from ._rideout import riding_out
from .cluster import NatsCluster, read_node
from .errors import (
    ConflictError,
    NoLeader,
    PermissionDenied,
    StoreClosed,
    StoreError,
    StreamMissing,
    Unreachable,
)
from .server import NatsServer, NatsServerConfig, NatsUser, nats_server_binary
from .store import (
    DEFAULT_STREAM,
    NEW,
    Change,
    EventStore,
    Recorded,
    StreamSettings,
    Version,
    new_event_id,
)

__all__ = [
    "DEFAULT_STREAM",
    "NEW",
    "Change",
    "ConflictError",
    "EventStore",
    "NatsCluster",
    "NatsServer",
    "NatsServerConfig",
    "NatsUser",
    "NoLeader",
    "PermissionDenied",
    "Recorded",
    "StoreClosed",
    "StoreError",
    "StreamMissing",
    "StreamSettings",
    "Unreachable",
    "Version",
    "free_port",
    "nats_server_binary",
    "new_event_id",
    "read_node",
    "riding_out",
]  # fmt: skip
