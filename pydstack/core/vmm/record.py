"""The VMM's fold of one VM: the shared ``Vm`` projection plus what the VMM alone needs.

``VmRecord`` adds to :class:`pydstack.core.projections.Vm` the inputs of the work dir
(compose bytes, env, user config, resources after updates), how the last stop was asked for,
whether an operator start came after the last exit, and the restart track::

    rec = None
    for a in history:
        rec = record.apply(rec, a)
"""

from __future__ import annotations

import hashlib
from typing import Final

from msgspec import Struct
from msgspec.structs import replace

from pydstack.core.events import (
    AppRegistered,
    AppUpgraded,
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRequested,
    VmResources,
    VmRestartExhausted,
    VmRestartScheduled,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
    VmUpdated,
    VmUpdateRejected,
    VmUpdateRequested,
)
from pydstack.core.projections import Applied, Vm, vms

from .restart import RestartTrack

EVENT_BUFFER: Final = 20  # guest events GetInfo shows (dstack's event_buffer_size)


class GuestEvent(Struct, frozen=True):
    """dstack's ``GuestEvent``: ``boot.progress`` / ``boot.error``, its body, ms since epoch."""

    event: str
    body: str
    timestamp: int


class VmRecord(Struct, frozen=True, kw_only=True):
    vm: Vm
    compose: bytes = b""  # raw app-compose.json (empty: look it up in the app's composes)
    compose_hash: str = ""
    encrypted_env: bytes = b""
    user_config: str = ""
    kms_urls: tuple[str, ...] = ()  # the VM's own sys-config override (empty: the host's)
    gateway_urls: tuple[str, ...] = ()
    resources: VmResources
    image: str = ""
    ports: tuple[PortMap, ...] = ()  # granted by placement, then by updates
    stop_force: bool = False
    start_requested_seq: int = 0
    exited_seq: int = 0
    restart: RestartTrack = RestartTrack()
    updates: dict[str, VmUpdateRequested] = {}  # undecided update requests by event id
    events: tuple[GuestEvent, ...] = ()  # the last EVENT_BUFFER guest reports
    tee: str = ""  # VmStarted.tee of its last start: "tdx", "simulated", "" (older logs)


def _reset(t: RestartTrack) -> RestartTrack:
    return replace(t, attempts=0, due_ns=0, exhausted=False)


def apply(rec: VmRecord | None, a: Applied) -> VmRecord | None:
    """Fold one event of ``dstack.vm.<id>``; the wrapped ``Vm`` uses the shared fold."""
    vm = vms.apply(rec.vm if rec else None, a)
    if vm is None:
        return None
    if rec is None:
        e = a.event
        assert isinstance(e, VmRequested)
        return VmRecord(
            vm=vm, compose=e.compose, user_config=e.user_config, encrypted_env=e.encrypted_env,
            compose_hash=hashlib.sha256(e.compose).hexdigest() if e.compose else e.compose_hash,
            resources=e.resources, image=e.image, ports=e.ports, kms_urls=e.kms_urls,
            gateway_urls=e.gateway_urls,
        )  # fmt: skip
    rec = replace(rec, vm=vm)
    t, tr = a.time_ns, rec.restart
    match a.event:
        case VmBootProgress(stage=stage, detail=detail) | VmBootError(stage=stage, error=detail):
            kind = "boot.error" if isinstance(a.event, VmBootError) else "boot.progress"
            body = f"{stage}: {detail}" if detail else stage
            seen = (*rec.events, GuestEvent(kind, body, t // 1_000_000))[-EVENT_BUFFER:]
            return replace(rec, events=seen)
        case VmStarted() as e:
            tr = replace(tr, started_ns=t, due_ns=0)
            if e.attempt == 0 and not e.adopted:
                tr = _reset(tr)
            return replace(rec, restart=tr, tee=e.tee or rec.tee)
        case VmExited():
            run = t - tr.started_ns if tr.started_ns else 0
            return replace(rec, exited_seq=a.seq, restart=replace(tr, exited_ns=t, last_run_ns=run))
        case VmRestartScheduled() as e:
            return replace(rec, restart=replace(tr, attempts=e.attempt, due_ns=e.due_ns))
        case VmRestartExhausted():
            return replace(rec, restart=replace(tr, exhausted=True, due_ns=0))
        case VmStartRequested():
            return replace(rec, start_requested_seq=a.seq, restart=_reset(tr))
        case VmStopRequested() as e:
            return replace(rec, stop_force=e.force, restart=_reset(tr))
        case VmStopped():
            return replace(rec, restart=_reset(tr))
        case VmScheduled():
            return replace(rec, ports=vm.ports)
        case VmUpdateRequested() as e:
            return replace(rec, updates={**rec.updates, a.id: e})
        case VmUpdated() as e:
            req = rec.updates.get(e.request)
            rest = {k: v for k, v in rec.updates.items() if k != e.request}
            rec = replace(rec, updates=rest)
            if req is None:
                return rec
            return replace(
                rec,
                compose=req.compose or rec.compose,
                compose_hash=e.compose_hash or rec.compose_hash,
                encrypted_env=rec.encrypted_env if req.encrypted_env is None else req.encrypted_env,
                user_config=rec.user_config if req.user_config is None else req.user_config,
                resources=e.resources or rec.resources,
                ports=rec.ports if e.ports is None else e.ports,
                image=e.image or rec.image,
                kms_urls=rec.kms_urls if req.kms_urls is None else req.kms_urls,
                gateway_urls=rec.gateway_urls if req.gateway_urls is None else req.gateway_urls,
            )
        case VmUpdateRejected() as e:
            return replace(rec, updates={k: v for k, v in rec.updates.items() if k != e.request})
        case _:
            return rec


def app_composes(composes: dict[str, bytes], a: Applied) -> dict[str, bytes]:
    """Collect ``compose_hash -> raw compose`` from the app aggregates (registered, upgraded)."""
    match a.event:
        case AppRegistered(compose_hash=h, compose=c) | AppUpgraded(compose_hash=h, compose=c):
            if c and h not in composes:
                return {**composes, h: c}
    return composes
