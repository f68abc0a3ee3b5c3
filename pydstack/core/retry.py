"""How often and how long a command retries while the log's stream has no leader.

A JetStream stream elects a new leader within seconds of losing one; meanwhile every append
and most reads fail fast ("no responders") or time out. Commands wait that out with capped
exponential backoff under one deadline instead of asking the user to run them again.

Usage::

    backoff = Backoff(deadline_s=30)
    delay = backoff.delay(attempt=1, elapsed_s=0.02)   # 0.1: sleep, then try again
    backoff.delay(attempt=9, elapsed_s=30.5)           # None: out of time, give up

Pure: the caller measures the time and sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_MAX_DOUBLINGS: Final = 64  # factor ** attempt overflows a float long before any deadline


@dataclass(frozen=True, slots=True)
class Backoff:
    deadline_s: float
    first_s: float = 0.1
    factor: float = 2.0
    cap_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.deadline_s >= 0 and self.first_s > 0 and self.factor >= 1):
            raise ValueError(f"bad backoff {self!r}")
        if self.cap_s < self.first_s:
            raise ValueError(f"backoff cap {self.cap_s} below its first delay {self.first_s}")

    def delay(self, attempt: int, elapsed_s: float) -> float | None:
        """Seconds to sleep after failed try number `attempt` (1: the first), `elapsed_s`
        seconds after the first try began; None once the deadline has passed.

        A delay never reaches past the deadline, so the last try starts at the deadline at
        the latest."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        left = self.deadline_s - elapsed_s
        if left <= 0:
            return None
        grown = self.first_s * self.factor ** min(attempt - 1, _MAX_DOUBLINGS)
        return min(grown, self.cap_s, left)
