"""Value types of the event store: versions, stored records, commit parts, stream settings."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydstack.core.events import Event

DEFAULT_STREAM: Final = "DSTACK"


@dataclass(frozen=True, slots=True)
class Version:
    """Where an aggregate stands: stream sequence of its last event and that event's hash."""

    seq: int = 0
    hash: bytes = b""


NEW: Final = Version()


@dataclass(frozen=True, slots=True)
class Recorded:
    """One message as stored: its stream sequence, subject, exact bytes and server time."""

    seq: int
    subject: str
    data: bytes
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One aggregate's part of a commit."""

    subject: str
    events: Sequence[Event]
    expected: Version
    event_ids: Sequence[str] | None = None


@dataclass(frozen=True, slots=True)
class StreamSettings:
    name: str = DEFAULT_STREAM
    replicas: int = 1
    duplicate_window_s: float = 120.0
    # An audit log should refuse deletes and purges; tests that simulate tampering turn it off.
    deny_delete: bool = True


# Ids come from the OS's CSPRNG (``secrets``): JetStream de-duplicates on them (Nats-Msg-Id), so
# an id anyone can predict is an id anyone can burn, making the server drop the real event as a
# duplicate. A seeded Mersenne Twister was ~0.6 us cheaper per id and predictable after 624
# outputs; an append costs ~50 us of CPU, so this is ~1%.


def new_event_id() -> str:
    """Time-ordered unique id (UUIDv7 layout, 32 hex digits), so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = secrets.randbits(74)
    value = (
        (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    )
    return f"{value:032x}"
