"""``CvmBackend`` on QEMU: one work dir per CVM, the QEMU process owned by the supervisor.

Work dir ``<vms_dir>/<vm_id>/``::

    manifest.json   the CvmSpec            disk.qcow2   the VM's disk (on the image's hda)
    shared/         9p host share (app-compose.json, sys-config, encrypted env...)
    qmp.sock        QMP                     serial.log   console (rotated by the supervisor)
    events.log      guest events (virtio-serial org.pydstack.events), JSON lines
    boot.offset     size of events.log when the current run started
    stop-requested  present while a stop/kill asked for is in effect (stopped, not exited)

The QEMU process is the supervisor's, under the id ``vm_id``, so it outlives the VMM; the
backend keeps no state of its own that the work dir and the supervisor do not hold.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import msgspec

from pydstack.actors.supervisor import NotFound, ProcessConfig, ProcessInfo, SupervisorClient
from pydstack.actors.supervisor import SupervisorError as _SvError
from pydstack.adapters.cvm import CvmError, CvmNotFound, CvmSpec, CvmStatus, GuestEvent

from . import disk as qdisk
from .argv import (
    Disk,
    HostShare,
    Network,
    Platform,
    PortForward,
    QemuSpec,
    build_argv,
    mrconfigid_for_compose,
)
from .image import Image, ImageError, images_dir
from .qmp import Qmp, QmpError

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_NOTE = msgspec.json.encode({"kind": "cvm", "backend": "qemu"}).decode()
GIB = 1024**3


class QemuBackendConfig(msgspec.Struct, frozen=True, kw_only=True):
    vms_dir: Path
    images: Path | None = None  # default: images_dir()
    platform: Platform = "tcg"
    qemu: str = "qemu-system-x86_64"
    network: Network = Network()
    cmdline_extra: str = ""
    qgs_port: int | None = None
    vsock: bool = True  # False where /dev/vhost-vsock is missing: the CID is still reserved
    kill_grace_s: float = 5.0  # SIGTERM grace when QMP is unusable


class QemuBackend:
    """Usage::

    backend = QemuBackend(QemuBackendConfig(vms_dir=d), SupervisorClient(sock))
    await backend.create(CvmSpec(vm_id="vm1", image="pydstack-dev", vcpu=2, memory_mb=2048))
    await backend.start("vm1")
    """

    kind = "qemu"

    def __init__(self, config: QemuBackendConfig, supervisor: SupervisorClient) -> None:
        self.config = config
        self.sv = supervisor

    # ---- paths and manifest ----------------------------------------------------------------

    def workdir(self, vm_id: str) -> Path:
        if not _ID.match(vm_id):
            raise CvmError(f"vm_id {vm_id!r}: letters, digits, '_', '.', '-' (at most 64)")
        return self.config.vms_dir / vm_id

    def _manifest(self, vm_id: str) -> CvmSpec:
        path = self.workdir(vm_id) / "manifest.json"
        try:
            return msgspec.json.decode(path.read_bytes(), type=CvmSpec)
        except FileNotFoundError:
            raise CvmNotFound(vm_id) from None

    def _image(self, name: str) -> Image:
        try:
            return Image.load((self.config.images or images_dir()) / name)
        except ImageError as e:
            raise CvmError(f"image {name!r}: {e}") from None

    # ---- lifecycle -------------------------------------------------------------------------

    async def create(self, spec: CvmSpec) -> CvmStatus:
        wd = self.workdir(spec.vm_id)
        image = self._image(spec.image)
        shared = wd / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        files = dict(spec.shared_files)
        if spec.app_compose:
            files["app-compose.json"] = spec.app_compose
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise CvmError(f"shared_files: {name!r} must be a plain file name")
            (shared / name).write_bytes(data)
        disk_path = wd / "disk.qcow2"
        try:
            if not disk_path.exists():
                await qdisk.create(disk_path, spec.disk_gb * GIB, backing=image.hda)
            elif spec.disk_gb:
                await qdisk.resize(disk_path, spec.disk_gb * GIB)
        except qdisk.DiskError as e:
            raise CvmError(f"{spec.vm_id}: {e}") from None
        tmp = wd / "manifest.json.tmp"
        tmp.write_bytes(msgspec.json.encode(spec))
        tmp.replace(wd / "manifest.json")
        return await self.status(spec.vm_id)

    def qemu_spec(self, spec: CvmSpec) -> QemuSpec:
        """The QEMU command line's input for this CVM on this host (pure apart from reads)."""
        wd, image, cfg = self.workdir(spec.vm_id), self._image(spec.image), self.config
        cmdline = " ".join(x for x in (image.info.cmdline or "", cfg.cmdline_extra) if x)
        return QemuSpec(
            vm_id=spec.vm_id,
            platform=cfg.platform,
            qemu=cfg.qemu,
            vcpu=spec.vcpu,
            memory_mb=spec.memory_mb,
            kernel=str(image.kernel),
            initrd=str(image.initrd),
            cmdline=cmdline,
            bios=str(image.bios) if image.bios and cfg.platform == "tdx" else "",
            rootfs=Disk(path=str(image.rootfs), format="raw", readonly=True)
            if image.rootfs
            else None,
            disk=Disk(path=str(wd / "disk.qcow2")),
            cid=spec.cid if cfg.vsock else None,
            share=HostShare(path=str(wd / "shared"), readonly=image.info.shared_ro),
            network=cfg.network,
            ports=tuple(
                PortForward(
                    protocol="udp" if p.protocol == "udp" else "tcp",
                    host_address=p.host_address,
                    host_port=p.host_port,
                    vm_port=p.vm_port,
                )
                for p in spec.ports
            ),
            mrconfigid=mrconfigid_for_compose(spec.app_compose)
            if cfg.platform == "tdx" and spec.app_compose
            else None,
            qgs_port=cfg.qgs_port if cfg.platform == "tdx" else None,
            qmp_socket=str(wd / "qmp.sock"),
            serial_log=str(wd / "serial.log"),
            events_log=str(wd / "events.log"),
        )

    async def start(self, vm_id: str) -> CvmStatus:
        """Start with the current manifest; a running CVM is left as it is."""
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        if await self._running(vm_id):
            return await self.status(vm_id)
        argv = build_argv(self.qemu_spec(spec))
        events = wd / "events.log"
        (wd / "boot.offset").write_text(str(events.stat().st_size if events.exists() else 0))
        (wd / "stop-requested").unlink(missing_ok=True)
        proc = ProcessConfig(
            id=vm_id, name=spec.name or vm_id, command=argv[0], args=tuple(argv[1:]),
            cwd=str(wd), cid=spec.cid, note=_NOTE, logs=(str(wd / "serial.log"),),
            stdout=str(wd / "qemu.stdout.log"), stderr=str(wd / "qemu.stderr.log"),
            pidfile=str(wd / "qemu.pid"), stop_timeout_s=self.config.kill_grace_s,
        )  # fmt: skip
        try:
            await self.sv.deploy(proc)
        except _SvError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        return await self.status(vm_id)

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if not await self._running(vm_id):
            return await self.status(vm_id)
        (wd / "stop-requested").write_text(f"stop {time.time_ns()}\n")
        try:
            async with await Qmp.connect(wd / "qmp.sock", timeout_s=3) as q:
                reason = await q.shutdown(timeout_s)
            (wd / "stop-requested").write_text(f"stop {time.time_ns()} {reason}\n")
        except QmpError:
            pass  # no QMP: fall through to signals
        for _ in range(100):  # QEMU exits right after the guest's power-off or the quit
            if not await self._running(vm_id):
                break
            await asyncio.sleep(0.1)
        else:
            await self.sv.stop(vm_id, timeout_s=self.config.kill_grace_s)
        return await self.status(vm_id)

    async def kill(self, vm_id: str) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if await self._running(vm_id):
            (wd / "stop-requested").write_text(f"kill {time.time_ns()}\n")
            await self.sv.kill(vm_id)
        return await self.status(vm_id)

    async def remove(self, vm_id: str) -> None:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        await self.kill(vm_id)
        try:
            await self.sv.remove(vm_id)
        except NotFound:
            pass
        await asyncio.to_thread(shutil.rmtree, wd, ignore_errors=True)

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
        events, _ = self._read_events(wd, self._boot_offset(wd))
        base = CvmStatus(vm_id=spec.vm_id, state="created", cid=spec.cid, ports=spec.ports)
        if info is None:
            return base
        st = info.state
        state = st.status
        stop_note = wd / "stop-requested"
        reason = st.reason
        if state == "exited" and stop_note.exists():
            state, reason = "stopped", f"stopped on request ({stop_note.read_text().strip()})"
        return msgspec.structs.replace(
            base,
            state=state,
            pid=st.pid,
            exit_code=st.exit_code,
            reason=reason,
            started_at_ns=st.started_at_ns,
            stopped_at_ns=st.stopped_at_ns,
            adopted=st.adopted,
            boot_stage=events[-1].stage if events else "",
        )

    def _boot_offset(self, wd: Path) -> int:
        try:
            return int((wd / "boot.offset").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _read_events(self, wd: Path, offset: int) -> tuple[list[GuestEvent], int]:
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

    async def events(self, vm_id: str, offset: int = 0) -> tuple[list[GuestEvent], int]:
        self._manifest(vm_id)
        return self._read_events(self.workdir(vm_id), offset)

    async def list(self) -> list[CvmStatus]:
        processes = {p.config.id: p for p in await self.sv.list() if p.config.note == _NOTE}
        out: list[CvmStatus] = []
        root = self.config.vms_dir
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if (d / "manifest.json").is_file():
                spec = self._manifest(d.name)
                out.append(self._status(spec, d, processes.pop(d.name, None)))
        for orphan in processes.values():  # a QEMU whose work dir is gone: kill or remove it
            st = orphan.state
            out.append(
                CvmStatus(vm_id=orphan.config.id, state=st.status, cid=orphan.config.cid,
                          pid=st.pid, reason="work dir missing", adopted=st.adopted)
            )  # fmt: skip
        return out
