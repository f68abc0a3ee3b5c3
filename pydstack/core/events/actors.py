"""Events of the actor aggregate, subject ``dstack.actor.<component>``: what happened to a
component of the control plane itself, written by the `up` that runs it (admin role)."""

from __future__ import annotations

from ._base import Event


class ComponentRestarted(Event, tag="ComponentRestarted", frozen=True):
    """`up` restarted a component of its own that crashed (e.g. its embedded nats-server),
    appended once the log was writable again."""

    component: str  # the aggregate id, e.g. "nats-server"
    host: str = ""  # the host id of the `up` that restarted it ("" when it joined no host)
    reason: str = ""  # e.g. "exited with code -9"
    down_ms: int = 0  # from noticing the crash until the component served again
    crashes: int = 0  # its crashes within up's restart window, this one included
