"""All read models at once, in memory: what ``pydstack replay`` shows and tests compare.

Each event belongs to exactly one aggregate (its subject), so :func:`route` names the read
model and the key it folds into, and the per-aggregate folds do the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from pydstack.core.events import (
    AnyEvent,
    AppComposeRevoked,
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
)

from . import apps, hosts, vms
from ._applied import Applied

Model = Literal["apps", "vms", "hosts"]

_MODEL: Final[dict[type, Model]] = {
    **dict.fromkeys((AppRegistered, AppUpgraded, AppRemoved, AppComposeRevoked), "apps"),
    **dict.fromkeys(
        (
            VmRequested, VmScheduled, VmRejected, VmStartRequested, VmStopRequested,
            VmRemoveRequested, VmStarted, VmBootProgress, VmBootError, VmExited, VmStopped,
            VmRemoved,
        ),
        "vms",
    ),
    **dict.fromkeys((HostJoined, HostHeartbeat, HostLeft, HostVmPlaced, HostVmReleased), "hosts"),
}  # fmt: skip
_KEY: Final[dict[Model, str]] = {"apps": "app_id", "vms": "vm_id", "hosts": "host_id"}


def route(event: AnyEvent) -> tuple[Model, str] | None:
    """``(read model, aggregate id)`` an event folds into, or None if no read model uses it."""
    model = _MODEL.get(type(event))
    if model is None:
        return None
    key: str = getattr(event, _KEY[model])
    return model, key


@dataclass(slots=True)
class Projections:
    """Every app, VM and host, and the stream sequence folded so far.

    The dicts are replaced per call of :func:`fold`, never changed in place afterwards.
    """

    apps: dict[str, apps.App] = field(default_factory=dict)
    vms: dict[str, vms.Vm] = field(default_factory=dict)
    hosts: dict[str, hosts.Host] = field(default_factory=dict)
    seq: int = 0


def fold(events: Iterable[Applied], start: Projections | None = None) -> Projections:
    """Fold events (ascending ``seq``) onto ``start`` (left untouched) and return the result.

    Events at or below ``start.seq`` are skipped, so feeding a redelivered prefix is harmless.
    """
    prev = start or Projections()
    out = Projections(dict(prev.apps), dict(prev.vms), dict(prev.hosts), prev.seq)
    for a in events:
        if a.seq <= out.seq:
            continue
        out.seq = a.seq
        target = route(a.event)
        if target is None:
            continue
        model, key = target
        if model == "vms":
            vm = vms.apply(out.vms.get(key), a)
            if vm is not None:
                out.vms[key] = vm
        elif model == "hosts":
            host = hosts.apply(out.hosts.get(key), a)
            if host is not None:
                out.hosts[key] = host
        else:
            app = apps.apply(out.apps.get(key), a)
            if app is not None:
                out.apps[key] = app
    return out
