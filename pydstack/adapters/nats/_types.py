"""Value types of the event store: versions, stored records, commit parts, stream settings."""

from __future__ import annotations

import os
import random
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


# Ids need uniqueness, not secrecy: a private generator seeded from os.urandom (and reseeded
# in a forked child) is ~10x cheaper than uuid4's syscall, and nobody else can seed it (tests
# that seed the global `random` must not make ids repeat, or the server would dedupe them).
_ids: Final = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_event_id() -> str:
    """Time-ordered unique id (UUIDv7 layout, 32 hex digits), so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = _ids.getrandbits(74)
    value = (
        (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    )
    return f"{value:032x}"
