"""Supervisor errors: one line each, what is wrong and what to do. Shared by server and client."""

from __future__ import annotations


class SupervisorError(Exception):
    """A request the supervisor refused or could not carry out (HTTP 400)."""

    status = 400


class NotFound(SupervisorError):
    status = 404

    def __init__(self, process_id: str, message: str = "") -> None:
        super().__init__(message or f"no process {process_id!r}; `list` shows the deployed ones")
        self.process_id = process_id


class Conflict(SupervisorError):
    """The request contradicts the current state (running, CID held)."""

    status = 409


class Unreachable(SupervisorError):
    status = 503

    def __init__(self, socket: str, detail: str) -> None:
        super().__init__(
            f"supervisor at {socket} is unreachable ({detail}); start it with "
            f"`python -m pydstack.actors.supervisor --socket {socket} --state-dir DIR`"
        )
        self.socket = socket


def from_status(status: int, message: str, process_id: str = "") -> SupervisorError:
    """Rebuild the server's error on the client side from its HTTP status."""
    if status == 409:
        return Conflict(message)
    if status == 404:
        return NotFound(process_id, message)
    return SupervisorError(message)
