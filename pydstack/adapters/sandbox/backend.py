"""``CvmBackend`` on network namespaces: a CVM is a namespace with its own docker engine and
the guest agent on the simulated TDX backend, run by the supervisor so it outlives the VMM.

Work dir ``<vms_dir>/<vm_id>/`` (as the QEMU backend's, so the VMM cannot tell them apart)::

    manifest.json  the CvmSpec            sandbox.json   how to run it (namespace, sockets)
    shared/        host-shared files      events.log     guest stages, JSON lines
    docker/        the engine's data root console.log    guest + container output
    stop-requested present while a stop/kill asked for is in effect (stopped, not exited)

Namespace ``pds-<sha1(vms_dir/vm_id)[:10]>``; sockets under ``<run_root>/<same id>/``.
Usage::

    backend = SandboxBackend(SandboxConfig(vms_dir=d, images=img), SupervisorClient(sock))
    await backend.create(CvmSpec(vm_id="vm1", image="sandbox-busybox", vcpu=1, memory_mb=256))
    await backend.start("vm1")
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import msgspec

from pydstack.actors.supervisor import NotFound, ProcessConfig, ProcessInfo, SupervisorClient
from pydstack.actors.supervisor import SupervisorError as _SvError
from pydstack.adapters.cvm import CvmError, CvmNotFound, CvmSpec, CvmStatus, GuestEvent

from . import _netns
from .guest import SandboxRun
from .images import SandboxImage, list_images, load_image

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_NOTE = msgspec.json.encode({"kind": "cvm", "backend": "sandbox"}).decode()


class SandboxConfig(msgspec.Struct, frozen=True, kw_only=True):
    vms_dir: Path
    images: Path
    run_root: Path = Path("/run/pydstack-sandbox")
    dev_pki: Path | None = None  # a shared simulator PKI (e.g. `up`'s DATA/dev-pki)
    stop_grace_s: float = 10.0
    dockerd: str = "dockerd"


class SandboxBackend:
    kind = "sandbox"

    def __init__(self, config: SandboxConfig, supervisor: SupervisorClient) -> None:
        self.config = config
        self.sv = supervisor

    def workdir(self, vm_id: str) -> Path:
        if not _ID.match(vm_id):
            raise CvmError(f"vm_id {vm_id!r}: letters, digits, '_', '.', '-' (at most 64)")
        return self.config.vms_dir / vm_id

    def _short(self, vm_id: str) -> str:
        return hashlib.sha1(str(self.workdir(vm_id).absolute()).encode()).hexdigest()[:10]

    def netns(self, vm_id: str) -> str:
        return f"pds-{self._short(vm_id)}"

    def _manifest(self, vm_id: str) -> CvmSpec:
        try:
            return msgspec.json.decode(
                (self.workdir(vm_id) / "manifest.json").read_bytes(), type=CvmSpec
            )
        except FileNotFoundError:
            raise CvmNotFound(vm_id) from None

    def images(self) -> list[SandboxImage]:
        return list_images(self.config.images)

    def log_path(self, vm_id: str) -> Path:
        """The CVM's console (guest and app output); not part of the CvmBackend protocol."""
        return self.workdir(vm_id) / "console.log"

    # ---- lifecycle -------------------------------------------------------------------------

    async def create(self, spec: CvmSpec) -> CvmStatus:
        wd = self.workdir(spec.vm_id)
        try:
            load_image(self.config.images, spec.image)
        except (FileNotFoundError, msgspec.DecodeError):
            raise CvmError(f"image {spec.image!r} is not in {self.config.images}") from None
        shared = wd / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        files = dict(spec.shared_files)
        if spec.app_compose:
            files["app-compose.json"] = spec.app_compose
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise CvmError(f"shared_files: {name!r} must be a plain file name")
            (shared / name).write_bytes(data)
        run = SandboxRun(
            netns=self.netns(spec.vm_id),
            run_dir=str(self.config.run_root / self._short(spec.vm_id)),
            images=str(self.config.images.absolute()),
            dev_pki=str(self.config.dev_pki or ""), dockerd=self.config.dockerd,
        )  # fmt: skip
        (wd / "sandbox.json").write_bytes(msgspec.json.encode(run))
        tmp = wd / "manifest.json.tmp"
        tmp.write_bytes(msgspec.json.encode(spec))
        tmp.replace(wd / "manifest.json")
        await asyncio.to_thread(_netns.ensure, run.netns)
        return await self.status(spec.vm_id)

    async def start(self, vm_id: str) -> CvmStatus:
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        if await self._running(vm_id):
            return await self.status(vm_id)
        await asyncio.to_thread(_netns.ensure, self.netns(vm_id))
        events = wd / "events.log"
        (wd / "boot.offset").write_text(str(events.stat().st_size if events.exists() else 0))
        (wd / "stop-requested").unlink(missing_ok=True)
        proc = ProcessConfig(
            id=vm_id, name=spec.name or vm_id, command=sys.executable,
            args=("-m", "pydstack.adapters.sandbox.guest", str(wd.absolute())),
            cwd=str(wd), cid=spec.cid, note=_NOTE, stdout=str(wd / "console.log"),
            stderr=str(wd / "guest.stderr.log"), stop_timeout_s=self.config.stop_grace_s,
        )  # fmt: skip
        try:
            await self.sv.deploy(proc)
        except _SvError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        return await self.status(vm_id)

    async def _finish(self, vm_id: str) -> None:
        """Whatever the guest left in its namespace (a killed guest leaves its engine)."""
        await asyncio.to_thread(_netns.kill_all, self.netns(vm_id))

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if await self._running(vm_id):
            (wd / "stop-requested").write_text(f"stop {time.time_ns()}\n")
            try:
                await self.sv.stop(vm_id, timeout_s=timeout_s)
            except NotFound:
                pass
        await self._finish(vm_id)
        return await self.status(vm_id)

    async def kill(self, vm_id: str) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if await self._running(vm_id):
            (wd / "stop-requested").write_text(f"kill {time.time_ns()}\n")
            await self.sv.kill(vm_id)
        await self._finish(vm_id)
        return await self.status(vm_id)

    async def remove(self, vm_id: str) -> None:
        self._manifest(vm_id)
        await self.kill(vm_id)
        try:
            await self.sv.remove(vm_id)
        except NotFound:
            pass
        await self._cleanup(vm_id)

    async def _cleanup(self, vm_id: str) -> None:
        wd, rd = self.workdir(vm_id), self.config.run_root / self._short(vm_id)
        ns = self.netns(vm_id)

        def clean() -> None:
            _netns.kill_all(ns)
            _netns.unmount_under(wd / "docker", rd)
            _netns.delete(ns)
            shutil.rmtree(wd, ignore_errors=True)
            shutil.rmtree(rd, ignore_errors=True)
            for relay in rd.parent.glob(f"{rd.name}.out*.sock"):  # the guest's HostRelay
                relay.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the last CVM gone: no empty dir left in /run
                rd.parent.rmdir()

        await asyncio.to_thread(clean)

    # ---- observation -----------------------------------------------------------------------

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
        events, _ = _read_events(wd, _boot_offset(wd))
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
        return _read_events(self.workdir(vm_id), offset)

    async def list(self) -> list[CvmStatus]:
        processes = {p.config.id: p for p in await self.sv.list() if p.config.note == _NOTE}
        out: list[CvmStatus] = []
        root = self.config.vms_dir
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if (d / "manifest.json").is_file():
                out.append(self._status(self._manifest(d.name), d, processes.pop(d.name, None)))
        for orphan in processes.values():
            st = orphan.state
            out.append(
                CvmStatus(vm_id=orphan.config.id, state=st.status, cid=orphan.config.cid,
                          pid=st.pid, reason="work dir missing", adopted=st.adopted)
            )  # fmt: skip
        return out


def _boot_offset(wd: Path) -> int:
    try:
        return int((wd / "boot.offset").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _read_events(wd: Path, offset: int) -> tuple[list[GuestEvent], int]:
    try:
        with (wd / "events.log").open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out: list[GuestEvent] = []
    for line in data[:end].splitlines():
        try:
            out.append(msgspec.json.decode(line, type=GuestEvent))
        except msgspec.DecodeError:
            continue
    return out, offset + end
