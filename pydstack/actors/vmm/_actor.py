"""The per-host VMM actor: the log's VMs for this host, made real through a ``CvmBackend``.

It joins the host (``HostJoined`` with its capacity, then heartbeats), and on every event for
its VMs, on every poll and at start it folds the log, asks the backend what exists and executes
the pure :func:`pydstack.core.vmm.plan`: start (work dir + backend), adopt what already runs,
stop, remove, record exits, and schedule restarts with dstack's policy. Guest progress is read
from the backend and appended as ``VmBootProgress``/``VmBootError``. Usage::

    vmm = Vmm(store, backend, VmmConfig(host_id="h1", state_dir=d))
    async with vmm, ActorRunner(store, vmm, RuntimeConfig()) as runner:
        await runner.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import msgspec
import structlog

from pydstack.adapters.cvm import CvmBackend, CvmError, CvmNotFound, CvmSpec, CvmStatus
from pydstack.adapters.nats import Change, ConflictError, EventStore, StoreError
from pydstack.core.events import (
    Event,
    HostHeartbeat,
    HostJoined,
    HostVmPlaced,
    HostVmReleased,
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRemoved,
    VmResources,
    VmStarted,
    VmStopped,
    VmUpdated,
    VmUpdateRejected,
    VmUpdateRequested,
    kind_filter,
    subject,
)
from pydstack.core.portmap import PortMapError, check_port_map
from pydstack.core.vmm import (
    Action,
    Adopt,
    Append,
    Discard,
    Observed,
    RecordExited,
    RecordStopped,
    Refused,
    Release,
    Remove,
    RestartPolicy,
    Start,
    Stop,
    VmRecord,
    check_disk,
    check_image_name,
    check_ports,
    check_resources,
    plan,
)
from pydstack.core.vmm.tee import tee_of_platform

from ..runtime import Delivery
from ._images import list_backend_images
from ._view import LogView
from ._workdir import ComposeMissing, build_spec

_log = structlog.get_logger("pydstack.vmm")


@dataclass(frozen=True)
class VmmConfig:
    host_id: str
    state_dir: Path
    name: str = ""  # durable consumer name [default: vmm-<host_id>]
    vcpu: int = 20
    memory_mb: int = 100 * 1024
    cid_start: int = 1000
    cid_count: int = 1000
    port_range: tuple[int, int] = (20000, 29999)
    address: str = ""
    # The operator's word, never a requester's: CVM ports may be forwarded from non-loopback
    # addresses (announced in HostJoined, and checked again here before anything starts).
    allow_public_ports: bool = False
    # Where this host's CVMs run and why (HostJoined.platform): set by `running_vmm` from the
    # backend ("sandbox") or the QEMU platform probe (adapters.qemu.probe); "" unknown.
    platform: str = ""
    platform_reason: str = ""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # The level-triggered net under the event-driven passes (handle), and how soon a guest's
    # own progress (boot stages, an exit), which no event announces, is noticed.
    poll_interval_s: float = 0.5
    heartbeat_interval_s: float = 30.0
    stop_timeout_s: float = 30.0
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()
    gateway_ca: str = ""  # PEM of the CA behind gateway_urls' certificates (sys-config)
    # sys-config's docker_registry (dstack's one mirror, set by the host): `up --registry`'s
    docker_registry: str = ""


def observed(st: CvmStatus) -> Observed:
    return Observed(vm_id=st.vm_id, state=st.state, cid=st.cid, pid=st.pid,
                    exit_code=st.exit_code, reason=st.reason)  # fmt: skip


class Vmm:
    def __init__(self, store: EventStore, backend: CvmBackend, config: VmmConfig) -> None:
        self.store, self.backend, self.config = store, backend, config
        self.view = LogView()
        self.lock = asyncio.Lock()
        self.lifelines: tuple[asyncio.Task[None], ...] = ()  # see failed()
        self.host_subject = subject("host", config.host_id)
        self._task: asyncio.Task[None] | None = None
        self._recovering = True
        # The log position every step of the last pass saw; see handle().
        self._planned = 0
        self._last_restart_check = 0.0
        self._last_heartbeat = 0.0
        self.actions: list[Action] = []  # every action executed (for tests and `vm info`)
        (config.state_dir / "offsets").mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return self.config.name or f"vmm-{self.config.host_id}"

    @property
    def _tee(self) -> str:
        """VmStarted.tee: what this host's CVMs quote with (from its platform)."""
        return tee_of_platform(self.config.platform)

    @property
    def subjects(self) -> Sequence[str]:
        return (kind_filter("vm"), kind_filter("host"), kind_filter("app"))

    async def __aenter__(self) -> Self:
        await self.join()
        self._task = asyncio.create_task(self._poll(), name=f"{self.name}-poll")
        return self

    async def failed(self) -> str:
        """Return (why) when this VMM stopped working by itself: its poll loop, or one of the
        `lifelines` its launcher runs beside it (running_vmm: the runner consuming the log,
        the supervisor watchdog), ended. `up` then rebuilds it (upkeep.KeptComponent); the
        CVMs run on under the supervisor and the new VMM adopts them."""
        assert self._task is not None, "not entered"
        done, _ = await asyncio.wait({self._task, *self.lifelines},
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        task = done.pop()
        exc = None if task.cancelled() else task.exception()
        return f"{task.get_name()} ended" + (f": {exc}" if exc else "")

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- host -----------------------------------------------------------------------------------

    async def join(self) -> None:
        """Append HostJoined when the host is new or its capacity or platform changed."""
        c = self.config
        async with self.lock:
            await self.view.catch_up(self.store)
            h = self.view.hosts.get(c.host_id)
            same = h is not None and not h.left and (h.vcpu, h.memory_mb, h.cid_start,
                   h.cid_count, h.port_range, h.public_ports, h.platform, h.platform_reason
                   ) == (c.vcpu, c.memory_mb, c.cid_start, c.cid_count, c.port_range,
                   c.allow_public_ports, c.platform, c.platform_reason)  # fmt: skip
            if not same:
                joined = HostJoined(
                    host_id=c.host_id, vcpu=c.vcpu, memory_mb=c.memory_mb, address=c.address,
                    cid_start=c.cid_start, cid_count=c.cid_count, port_range=c.port_range,
                    public_ports=c.allow_public_ports, platform=c.platform,
                    platform_reason=c.platform_reason,
                )  # fmt: skip
                await self._append(self.host_subject, [joined])

    # -- the actor protocol ---------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        # Event-driven: a VmScheduled, VmStopRequested, ... is acted on as soon as the runner
        # delivers it, not at the next poll. Compared with what the last pass planned from, not
        # with the view's cursor: a pass's own appends fold whatever landed meanwhile (another
        # VM's VmScheduled) after its plan was made, and those must still get a pass.
        if delivery.seq > self._planned:
            await self.pass_once()

    async def reconcile(self) -> int:
        return await self.pass_once()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.pass_once()
            except (StoreError, CvmError, OSError) as exc:
                _log.warning("vmm pass failed; next poll retries", error=str(exc))
            except Exception as exc:  # the poll must outlive any one bad pass (level-triggered)
                _log.exception("vmm pass failed unexpectedly; next poll retries", error=str(exc))

    async def pass_once(self) -> int:
        """Fold, observe, plan, act; returns how many actions ran."""
        async with self.lock:
            await self.view.catch_up(self.store)
            self._planned = self.view.cursor
            await self._updates()
            obs = {st.vm_id: st for st in await self.backend.list()}
            await self._progress(obs)
            now = time.time_ns()
            host = self.view.hosts.get(self.config.host_id)
            placed = frozenset(host.placements) if host else frozenset()
            actions = plan(
                self.view.on_host(self.config.host_id),
                {v: observed(st) for v, st in obs.items()},
                now_ns=now, policy=self.config.restart, placed=placed,
                recovering=self._recovering,
            )  # fmt: skip
            self._recovering = False
            mono = time.monotonic()
            check = mono - self._last_restart_check >= self.config.restart.interval_s
            if check:
                self._last_restart_check = mono
            else:  # restart decisions are taken on dstack's check interval only
                actions = [
                    a for a in actions if not isinstance(a, Append)
                    and not (isinstance(a, Start) and a.attempt)
                ]  # fmt: skip
            for action in actions:
                try:
                    await self._execute(action)
                except ConflictError:
                    await self.view.catch_up(self.store)  # someone moved it: next pass replans
                self.actions.append(action)
            if mono - self._last_heartbeat >= self.config.heartbeat_interval_s:
                self._last_heartbeat = mono
                running = sum(1 for st in obs.values() if st.state == "running")
                await self._append(
                    self.host_subject,
                    [HostHeartbeat(host_id=self.config.host_id, running_vms=running)],
                )
            if actions:
                _log.info("reconciled", actions=[type(a).__name__ for a in actions])
            return len(actions)

    # -- appends --------------------------------------------------------------------------------

    async def _append(self, subj: str, events: Sequence[Event]) -> None:
        await self.store.append(subj, list(events), self.view.version(subj))
        await self.view.catch_up(self.store)

    # -- guest progress -------------------------------------------------------------------------

    def _offset_path(self, vm_id: str) -> Path:
        return self.config.state_dir / "offsets" / vm_id

    def _offset(self, vm_id: str) -> int:
        try:
            return int(self._offset_path(vm_id).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    async def _progress(self, obs: dict[str, CvmStatus]) -> None:
        for vm_id, rec in self.view.on_host(self.config.host_id).items():
            if vm_id not in obs or rec.vm.state in ("removed",):
                continue
            await self._drain(vm_id)

    async def _drain(self, vm_id: str) -> None:
        try:
            events, end = await self.backend.events(vm_id, self._offset(vm_id))
        except CvmNotFound:
            return
        if not events:
            return
        out: list[Event] = [
            VmBootError(vm_id=vm_id, stage=e.stage, error=e.detail) if e.stage == "error"
            else VmBootProgress(vm_id=vm_id, stage=e.stage, detail=e.detail)
            for e in events
        ]  # fmt: skip
        await self._append(subject("vm", vm_id), out)
        self._offset_path(vm_id).write_text(str(end))

    # -- actions --------------------------------------------------------------------------------

    async def _execute(self, action: Action) -> None:
        vm_subject = subject("vm", action.event.vm_id if isinstance(action, Append)
                             else action.vm_id)  # fmt: skip
        match action:
            case Start(vm_id=vm_id, attempt=attempt):
                await self._start(self.view.vms[vm_id], attempt)
            case Adopt(vm_id=vm_id, pid=pid):
                adopted = VmStarted(vm_id=vm_id, host=self.config.host_id, pid=pid,
                                    adopted=True, tee=self._tee)  # fmt: skip
                await self._append(vm_subject, [adopted])
            case Stop(vm_id=vm_id, force=force):
                if force:
                    await self.backend.kill(vm_id)
                else:
                    await self.backend.stop(vm_id, timeout_s=self.config.stop_timeout_s)
                await self._drain(vm_id)
                await self._append(vm_subject, [VmStopped(vm_id=vm_id)])
            case RecordExited(vm_id=vm_id, reason=reason, exit_code=code):
                await self._drain(vm_id)
                await self._append(vm_subject, [VmExited(vm_id=vm_id, reason=reason,
                                                         exit_code=code)])  # fmt: skip
            case RecordStopped(vm_id=vm_id):
                await self._append(vm_subject, [VmStopped(vm_id=vm_id)])
            case Remove(vm_id=vm_id, present=present):
                if present:
                    with contextlib.suppress(CvmNotFound):
                        await self.backend.remove(vm_id)
                self._offset_path(vm_id).unlink(missing_ok=True)
                await self._remove_records(vm_id)
            case Release(vm_id=vm_id):
                released = HostVmReleased(host_id=self.config.host_id, vm_id=vm_id,
                                          reason="vm removed")  # fmt: skip
                await self._append(self.host_subject, [released])
            case Discard(vm_id=vm_id):
                with contextlib.suppress(CvmNotFound):
                    await self.backend.remove(vm_id)
            case Append(event=event):
                await self._append(vm_subject, [event])

    async def _remove_records(self, vm_id: str) -> None:
        changes = [Change(subject("vm", vm_id), [VmRemoved(vm_id=vm_id)],
                          self.view.version(subject("vm", vm_id)))]  # fmt: skip
        host = self.view.hosts.get(self.config.host_id)
        if host is not None and vm_id in host.placements:
            released = HostVmReleased(host_id=self.config.host_id, vm_id=vm_id,
                                      reason="vm removed")  # fmt: skip
            changes.append(Change(self.host_subject, [released],
                                  self.view.version(self.host_subject)))  # fmt: skip
        await self.store.commit(changes)
        await self.view.catch_up(self.store)

    def _check_ports(self, ports: tuple[PortMap, ...]) -> None:
        """Port maps from the log, checked against this host's own setting before anything
        reaches a backend: the log's HostJoined may say otherwise, the operator decides."""
        for p in ports:
            check_port_map(p, public_allowed=self.config.allow_public_ports)

    def _spec(self, rec: VmRecord) -> CvmSpec:
        c = self.config
        if not rec.image:  # none asked for (`deploy` without --image): the host's only image
            names = [i.name for i in list_backend_images(self.backend)]
            if len(names) == 1:
                rec = msgspec.structs.replace(rec, image=names[0])
        return build_spec(rec, self.view.composes, app_compose=self.view.app_compose,
                          kms_urls=c.kms_urls, gateway_urls=c.gateway_urls,
                          gateway_ca=c.gateway_ca, docker_registry=c.docker_registry)  # fmt: skip

    async def _start(self, rec: VmRecord, attempt: int) -> None:
        vm_id, subj = rec.vm.vm_id, subject("vm", rec.vm.vm_id)
        try:
            self._check_ports(rec.ports)
            spec = self._spec(rec)
            await self.backend.create(spec)
            _, end = await self.backend.events(vm_id, 0)
            self._offset_path(vm_id).write_text(str(end))
            st = await self.backend.start(vm_id)
        except (CvmError, ComposeMissing, OSError, PortMapError) as exc:
            _log.warning("start failed", vm_id=vm_id, error=str(exc))
            failed = VmBootError(vm_id=vm_id, stage="start", error=str(exc))
            await self._append(subj, [failed, VmExited(vm_id=vm_id, reason=f"start failed: {exc}")])
            return
        started = VmStarted(vm_id=vm_id, host=self.config.host_id, pid=st.pid or 0,
                            attempt=attempt, tee=self._tee)  # fmt: skip
        await self._append(subj, [started])
        _log.info("vm started", vm_id=vm_id, pid=st.pid, cid=st.cid, attempt=attempt)

    # -- updates --------------------------------------------------------------------------------

    async def _updates(self) -> None:
        for rec in list(self.view.on_host(self.config.host_id).values()):
            for request_id, req in list(rec.updates.items()):
                await self._update(rec, request_id, req)

    async def _update(self, rec: VmRecord, request_id: str, req: VmUpdateRequested) -> None:
        vm_id, subj = rec.vm.vm_id, subject("vm", rec.vm.vm_id)
        host = self.view.hosts[self.config.host_id]
        res = VmResources(vcpu=req.vcpu or rec.resources.vcpu,
                          memory_mb=req.memory_mb or rec.resources.memory_mb,
                          disk_gb=max(req.disk_gb, rec.resources.disk_gb),
                          gpus=rec.resources.gpus)  # fmt: skip
        ports = rec.ports if req.ports is None else req.ports
        try:
            if req.disk_gb and req.disk_gb < rec.resources.disk_gb:
                raise Refused("disk_size", "the disk can only grow")
            check_disk(req.disk_gb)
            if req.image:  # the log may carry any name: refused here, not at the next start
                check_image_name(req.image)
            check_resources(host, res.vcpu, res.memory_mb, vm_id)
            check_ports(host, ports, vm_id)
            self._check_ports(ports)
        except (Refused, PortMapError) as exc:
            await self._append(subj, [VmUpdateRejected(vm_id=vm_id, reason=str(exc),
                                                       request=request_id)])  # fmt: skip
            return
        updated = VmUpdated(
            vm_id=vm_id, request=request_id, image=req.image,
            compose_hash=hashlib.sha256(req.compose).hexdigest() if req.compose else "",
            resources=res if res != rec.resources else None,
            ports=req.ports,
        )  # fmt: skip
        changes = [Change(subj, [updated], self.view.version(subj))]
        held = host.placements.get(vm_id)
        if held is not None and (res != held.resources or ports != held.ports):
            placed = HostVmPlaced(host_id=host.host_id, vm_id=vm_id, cid=held.cid,
                                  resources=res, ports=ports)  # fmt: skip
            changes.append(Change(self.host_subject, [placed],
                                  self.view.version(self.host_subject)))  # fmt: skip
        await self.store.commit(changes)
        await self.view.catch_up(self.store)
        new = self.view.vms[vm_id]
        with contextlib.suppress(CvmNotFound, CvmError, ComposeMissing):
            st = await self.backend.status(vm_id)
            if st.state != "running":  # a running CVM takes the update at its next start
                await self.backend.create(self._spec(new))
