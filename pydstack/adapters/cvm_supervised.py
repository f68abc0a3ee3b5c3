"""What the CVM backends share: a CVM is one work dir plus one process owned by the supervisor.

A subclass (``QemuBackend``, ``SandboxBackend``) says how to create, start and stop its process;
this base knows the work dir and observes the CVM from it and from the supervisor, so both
backends report states, reasons and guest events the same way::

    <vms_dir>/<vm_id>/manifest.json   the CvmSpec
                      shared/         host-shared files (app-compose.json, .sys-config.json...)
                      events.log      guest events, JSON lines (``GuestEvent``)
                      boot.offset     size of events.log when the current run started
                      stop-requested  present while a stop/kill asked for is in effect

The supervisor process id is the ``vm_id``; its ``note`` marks which backend owns it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import ClassVar

import msgspec

from pydstack.adapters.supervisor import NotFound, ProcessInfo, SupervisorClient, Unreachable

from .cvm import (
    APP_COMPOSE,
    LEGACY_SHARED_NAMES,
    SHARED_NAMES,
    CvmError,
    CvmNotFound,
    CvmSpec,
    CvmStatus,
    GuestEvent,
)

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SHARED_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # dstack's are dotted: .sys-config.json


def process_note(backend: str) -> str:
    """The supervisor ``note`` of a CVM process of ``backend`` (how ``list`` finds its own)."""
    return msgspec.json.encode({"kind": "cvm", "backend": backend}).decode()


class SupervisedCvms:
    note: ClassVar[str]  # process_note(kind), set by each backend

    def __init__(self, vms_dir: Path, supervisor: SupervisorClient) -> None:
        self.vms_dir = vms_dir
        self.sv = supervisor

    # ---- work dir ----------------------------------------------------------------------------

    def workdir(self, vm_id: str) -> Path:
        if not _ID.match(vm_id):
            raise CvmError(f"vm_id {vm_id!r}: letters, digits, '_', '.', '-' (at most 64)")
        return self.vms_dir / vm_id

    def _manifest(self, vm_id: str) -> CvmSpec:
        try:
            return msgspec.json.decode(
                (self.workdir(vm_id) / "manifest.json").read_bytes(), type=CvmSpec
            )
        except FileNotFoundError:
            raise CvmNotFound(vm_id) from None

    def _write_shared(self, spec: CvmSpec) -> Path:
        """The host-shared files of ``spec`` into ``<wd>/shared`` (dstack's names); one of
        those names the spec no longer has is removed, so an update that drops the encrypted
        env or user config leaves none behind. Returns that dir."""
        shared = self.workdir(spec.vm_id) / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        files = dict(spec.shared_files)
        if spec.app_compose:
            files[APP_COMPOSE] = spec.app_compose
        for name in files:
            if not _SHARED_NAME.match(name) or name in (".", ".."):
                raise CvmError(f"shared_files: {name!r} must be a plain file name")
        for name in (*SHARED_NAMES, *LEGACY_SHARED_NAMES):
            if name not in files:
                (shared / name).unlink(missing_ok=True)
        for name, data in files.items():
            (shared / name).write_bytes(data)
        return shared

    def _write_manifest(self, spec: CvmSpec) -> None:
        wd = self.workdir(spec.vm_id)
        tmp = wd / "manifest.json.tmp"
        tmp.write_bytes(msgspec.json.encode(spec))
        tmp.replace(wd / "manifest.json")  # atomic: a reader never sees half a manifest

    def _begin_run(self, wd: Path) -> None:
        """Before a start: guest events count from here, and no stop is in effect."""
        events = wd / "events.log"
        (wd / "boot.offset").write_text(str(events.stat().st_size if events.exists() else 0))
        (wd / "stop-requested").unlink(missing_ok=True)

    def _note_stop(self, wd: Path, what: str, detail: str = "") -> None:
        """A stop or kill was asked for: the process's end is "stopped", not "exited"."""
        words = (what, str(time.time_ns()), detail) if detail else (what, str(time.time_ns()))
        (wd / "stop-requested").write_text(" ".join(words) + "\n")

    # ---- observation -------------------------------------------------------------------------

    async def _info(self, vm_id: str) -> ProcessInfo | None:
        try:
            return await self.sv.info(vm_id)
        except NotFound:
            return None

    async def _running(self, vm_id: str) -> bool:
        info = await self._info(vm_id)
        return info is not None and info.running

    async def status(self, vm_id: str) -> CvmStatus:
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        return self._status(spec, wd, await self._info(vm_id))

    def _status(self, spec: CvmSpec, wd: Path, info: ProcessInfo | None) -> CvmStatus:
        events, _ = read_events(wd, boot_offset(wd))
        base = CvmStatus(vm_id=spec.vm_id, state="created", cid=spec.cid, ports=spec.ports)
        if info is None:
            return base
        st = info.state
        state, reason = st.status, st.reason
        note = wd / "stop-requested"
        if state == "exited" and note.exists():
            state, reason = "stopped", f"stopped on request ({note.read_text().strip()})"
        elif state == "exited" and events and events[-1].stage == "error":
            reason = f"{reason}: {events[-1].detail}" if reason else events[-1].detail
        return msgspec.structs.replace(
            base, state=state, pid=st.pid, exit_code=st.exit_code, reason=reason,
            started_at_ns=st.started_at_ns, stopped_at_ns=st.stopped_at_ns, adopted=st.adopted,
            boot_stage=events[-1].stage if events else "",
        )  # fmt: skip

    async def events(self, vm_id: str, offset: int = 0) -> tuple[list[GuestEvent], int]:
        self._manifest(vm_id)
        return read_events(self.workdir(vm_id), offset)

    async def list(self) -> list[CvmStatus]:
        try:
            listed = await self.sv.list()
        except Unreachable as exc:  # the VMM relaunches it; until then nothing is observed
            raise CvmError(str(exc)) from None
        processes = {p.config.id: p for p in listed if p.config.note == self.note}
        out: list[CvmStatus] = []
        root = self.vms_dir
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if (d / "manifest.json").is_file():
                out.append(self._status(self._manifest(d.name), d, processes.pop(d.name, None)))
        for orphan in processes.values():  # a process whose work dir is gone: kill or remove it
            st = orphan.state
            out.append(
                CvmStatus(vm_id=orphan.config.id, state=st.status, cid=orphan.config.cid,
                          pid=st.pid, reason="work dir missing", adopted=st.adopted)
            )  # fmt: skip
        return out


def boot_offset(wd: Path) -> int:
    try:
        return int((wd / "boot.offset").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def read_events(wd: Path, offset: int) -> tuple[list[GuestEvent], int]:
    """Guest events in ``<wd>/events.log`` from byte ``offset``, and the offset after them."""
    try:
        with (wd / "events.log").open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a partial last line waits for the next call
    out: list[GuestEvent] = []
    for line in data[:end].splitlines():
        try:
            out.append(msgspec.json.decode(line, type=GuestEvent))
        except msgspec.DecodeError:
            continue  # noise on the port (e.g. a guest writing before its service)
    return out, offset + end
