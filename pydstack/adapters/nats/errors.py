"""Errors of the event store: one line each, saying what is wrong and what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every event-store failure."""


class Unreachable(StoreError):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(
            f"NATS server at {url} is unreachable ({detail}); start it with `pydstack up` "
            "or pass --nats URL"
        )
        self.url = url


class StreamMissing(StoreError):
    def __init__(self, stream: str) -> None:
        super().__init__(
            f"stream {stream!r} does not exist on this server; run `pydstack up` once "
            "(or `pydstack init`) to create it"
        )
        self.stream = stream


class PermissionDenied(StoreError):
    def __init__(self, subject: str, detail: str = "") -> None:
        super().__init__(
            f"publish to {subject} refused by the server: this identity may not write it"
            + (f" ({detail})" if detail else "")
        )
        self.subject = subject


class ConflictError(StoreError):
    """Someone appended to the aggregate after we folded it: re-read, decide again, retry."""

    def __init__(self, subject: str, expected: int, detail: str = "") -> None:
        super().__init__(
            f"{subject} moved past sequence {expected}"
            + (f" ({detail})" if detail else "")
            + "; re-read the aggregate and decide again"
        )
        self.subject = subject
        self.expected = expected


class StoreClosed(StoreError):
    """The connection was closed under a call (the store shut down, or reconnecting gave up)."""

    def __init__(self, url: str, action: str) -> None:
        super().__init__(
            f"{action} failed: the connection to NATS at {url} is closed; "
            "the process is shutting down, or reconnect with a new store"
        )


class NoLeader(StoreError):
    """The stream stayed without a leader (or unanswering) for the whole ride-out deadline."""

    def __init__(self, action: str, waited_s: float, detail: str) -> None:
        super().__init__(
            f"{action}: the stream still has no leader after {waited_s:g} s ({detail}); check "
            "that a majority of the NATS servers are up, then run the command again"
        )
        self.action = action
        self.waited_s = waited_s
