"""Every app with its VMs, key decisions and gateway registrations, folded from the log. Pure.

What ``pydstack app ls`` and ``pydstack app info`` show. Usage::

    cat = AppCatalog()
    for subject, applied in events:          # stream order
        cat.take(subject, applied)
    info = cat.info("5bb4…")                 # AppInfo | None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from pydstack.core.events import (
    BootInfo,
    CvmRecycled,
    CvmRegistered,
    CvmRemoved,
    KeyDenied,
    KeyIssued,
    KeyRequested,
)
from pydstack.core.projections import App, Applied, Projections, Vm, fold, route


class KeyRow(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    time_ns: int
    request_id: str
    outcome: Literal["issued", "denied"]
    backend: str = ""
    reason: str = ""
    boot_info: BootInfo | None = None


class GatewayRow(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    time_ns: int
    cluster: str
    instance_id: str
    tunnel_ip: str
    compose_hash: str
    status: Literal["active", "recycled", "removed"] = "active"


class AppInfo(msgspec.Struct, frozen=True, kw_only=True):
    app: App
    vms: tuple[Vm, ...]
    keys: tuple[KeyRow, ...]
    gateways: tuple[GatewayRow, ...]


@dataclass
class AppCatalog:
    keys: dict[str, list[KeyRow]] = field(default_factory=dict)  # app_id -> decisions
    gateways: dict[str, dict[str, GatewayRow]] = field(default_factory=dict)  # app -> iid -> row
    _folded: list[Applied] = field(default_factory=list)
    _request_app: dict[str, str] = field(default_factory=dict)
    _instance_app: dict[str, str] = field(default_factory=dict)
    _proj: Projections | None = None

    def take(self, subject: str, a: Applied) -> None:
        e = a.event
        if route(e) is not None:
            self._folded.append(a)
            self._proj = None
            return
        match e:
            case KeyRequested():
                self._request_app.setdefault(e.request_id, e.app_id)
            case KeyIssued() | KeyDenied():
                app_id = self._request_app.get(e.request_id) or (
                    e.boot_info.app_id if e.boot_info is not None else "")  # fmt: skip
                if app_id:
                    issued = isinstance(e, KeyIssued)
                    row = KeyRow(seq=a.seq, time_ns=a.time_ns, request_id=e.request_id,
                                 outcome="issued" if issued else "denied",
                                 backend=e.backend if isinstance(e, KeyIssued) else "",
                                 reason=e.reason if isinstance(e, KeyDenied) else "",
                                 boot_info=e.boot_info)  # fmt: skip
                    self.keys.setdefault(app_id, []).append(row)
            case CvmRegistered() if subject == f"dstack.cvm.{e.instance_id}":
                self._instance_app[e.instance_id] = e.app_id
                self.gateways.setdefault(e.app_id, {})[e.instance_id] = GatewayRow(
                    seq=a.seq, time_ns=a.time_ns, cluster=e.cluster or "default",
                    instance_id=e.instance_id, tunnel_ip=e.tunnel_ip, compose_hash=e.compose_hash,
                )  # fmt: skip
            case CvmRecycled() | CvmRemoved() if e.instance_id in self._instance_app:
                rows = self.gateways[self._instance_app[e.instance_id]]
                status: Literal["recycled", "removed"] = (
                    "recycled" if isinstance(e, CvmRecycled) else "removed")  # fmt: skip
                rows[e.instance_id] = msgspec.structs.replace(rows[e.instance_id], status=status)
            case _:
                pass

    @property
    def projections(self) -> Projections:
        if self._proj is None:
            self._proj = fold(self._folded)
        return self._proj

    def apps(self) -> list[App]:
        """Every app ever registered, oldest first (removed ones too: ``App.removed``)."""
        return sorted(self.projections.apps.values(), key=lambda a: (a.registered_ns, a.app_id))

    def vms_of(self, app_id: str) -> list[Vm]:
        vms = (v for v in self.projections.vms.values() if v.app_id == app_id)
        return sorted(vms, key=lambda v: (v.requested_ns, v.vm_id))

    def info(self, app_id: str) -> AppInfo | None:
        app = self.projections.apps.get(app_id)
        if app is None:
            return None
        return AppInfo(app=app, vms=tuple(self.vms_of(app_id)),
                       keys=tuple(self.keys.get(app_id, ())),
                       gateways=tuple(self.gateways.get(app_id, {}).values()))  # fmt: skip
