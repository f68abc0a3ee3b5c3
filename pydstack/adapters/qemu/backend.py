"""``CvmBackend`` on QEMU: one work dir per CVM, the QEMU process owned by the supervisor.

Work dir ``<vms_dir>/<vm_id>/``::

    manifest.json   the CvmSpec            disk.qcow2   the VM's disk (on the image's hda)
    data.qcow2      the data disk (``disk_gb``, else DATA_DISK_GB): the guest keeps it LUKS2
                    with the app's disk key (pydstack_guest.data_disk), so only ciphertext here
    shared/         9p host share (app-compose.json, sys-config, encrypted env...) and
                    platform.json; on a platform with no TEE the simulated TD (dev-pki/,
                    dev-td.json, images/), never on TDX: `write_tee_share`
    run/qmp.sock    QMP                     serial.log   console (rotated by the supervisor)
    events.log      guest events (virtio-serial org.pydstack.events), JSON lines
    boot.offset     size of events.log when the current run started
    stop-requested  present while a stop/kill asked for is in effect (stopped, not exited)

The QEMU process is the supervisor's, under the id ``vm_id``, so it outlives the VMM; the
backend keeps no state of its own that the work dir and the supervisor do not hold. Work dir
and observation are shared with the sandbox backend (``adapters.cvm_supervised``). QEMU runs as
its own unprivileged user (``config.user``), owning only run/, the disks and the two logs; the
work dir and the share it may only read (``adapters.qemu.user``).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec

from pydstack.adapters.cvm import CvmError, CvmSpec, CvmStatus
from pydstack.adapters.cvm_supervised import SupervisedCvms, process_note
from pydstack.adapters.supervisor import NotFound, ProcessConfig, RunAs, SupervisorClient
from pydstack.adapters.supervisor import SupervisorError as _SvError
from pydstack.core.vmm.image_name import image_name_error

from . import disk as qdisk
from .argv import (
    DATA_SERIAL,
    Disk,
    HostShare,
    Network,
    Platform,
    PortForward,
    QemuSpec,
    build_argv,
    mrconfigid_for_compose,
)
from .image import Image, ImageError, image_registration, images_dir, os_image_hash
from .qmp import Qmp, QmpError
from .user import QEMU_USER, AccessError, ensure_user, grant_reach, prepare_workdir

GIB = 1024**3
DATA_DISK_GB = 8  # the data disk of a VM requested without a disk size (sparse)


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
    # No TEE (platform tcg or kvm): the guest simulates its TD and signs quotes with this dev
    # PKI (`up`'s DATA/dev-pki, which its KMS trusts), passed through the host share with the
    # sandbox images (busybox...) its docker engine imports: see `write_tee_share`. Never
    # copied for a TDX platform.
    dev_pki: Path | None = None
    app_images: Path | None = None
    user: str = QEMU_USER  # QEMU runs as this system user (made on first start when missing)


class QemuBackend(SupervisedCvms):
    """Usage::

    backend = QemuBackend(QemuBackendConfig(vms_dir=d), SupervisorClient(sock))
    await backend.create(CvmSpec(vm_id="vm1", image="pydstack-dev", vcpu=2, memory_mb=2048))
    await backend.start("vm1")
    """

    kind = "qemu"
    note = process_note("qemu")

    def __init__(self, config: QemuBackendConfig, supervisor: SupervisorClient) -> None:
        super().__init__(config.vms_dir, supervisor)
        self.config = config

    def _image(self, name: str) -> Image:
        # The name comes from the log, which may carry anything: checked again before the join.
        if (reason := image_name_error(name)) is not None:
            raise CvmError(reason)
        try:
            return Image.load((self.config.images or images_dir()) / name)
        except ImageError as e:
            raise CvmError(f"image {name!r}: {e}") from None

    # ---- lifecycle -------------------------------------------------------------------------

    async def create(self, spec: CvmSpec) -> CvmStatus:
        wd = self.workdir(spec.vm_id)
        image = self._image(spec.image)
        shared = self._write_shared(spec)
        await asyncio.to_thread(self._write_tee_share, shared, image)
        disk_path = wd / "disk.qcow2"
        try:
            if not disk_path.exists():
                await qdisk.create(disk_path, spec.disk_gb * GIB, backing=image.hda)
            elif spec.disk_gb:
                await qdisk.resize(disk_path, spec.disk_gb * GIB)
            await self._data_disk(spec)
        except qdisk.DiskError as e:
            raise CvmError(f"{spec.vm_id}: {e}") from None
        self._write_manifest(spec)
        return await self.status(spec.vm_id)

    async def _data_disk(self, spec: CvmSpec) -> None:
        """Create the data disk (empty: the guest formats it on first boot) or grow it."""
        path = self.workdir(spec.vm_id) / "data.qcow2"
        if not await asyncio.to_thread(path.exists):
            await qdisk.create(path, (spec.disk_gb or DATA_DISK_GB) * GIB)
        elif spec.disk_gb:
            await qdisk.resize(path, spec.disk_gb * GIB)

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
            data_disk=Disk(path=str(wd / "data.qcow2"), serial=DATA_SERIAL),
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
            qmp_socket=str(wd / "run" / "qmp.sock"),
            serial_log=str(wd / "serial.log"),
            events_log=str(wd / "events.log"),
        )

    async def start(self, vm_id: str) -> CvmStatus:
        """Start with the current manifest; a running CVM is left as it is."""
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        if await self._running(vm_id):
            return await self.status(vm_id)
        argv = build_argv(self.qemu_spec(spec))
        # Again at each start: the host's platform may have changed since the VM was created,
        # and a TDX start must not find a dev PKI a TCG run left in the share.
        await asyncio.to_thread(self._write_tee_share, wd / "shared", self._image(spec.image))
        try:
            await self._data_disk(spec)  # a VM created before data disks existed
        except qdisk.DiskError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        try:
            who = await asyncio.to_thread(self._give_qemu_its_files, spec)
        except (AccessError, OSError) as e:
            raise CvmError(f"{vm_id}: {e}") from None
        self._begin_run(wd)
        proc = ProcessConfig(
            id=vm_id, name=spec.name or vm_id, command=argv[0], args=tuple(argv[1:]),
            cwd=str(wd), cid=spec.cid, note=self.note, logs=(str(wd / "serial.log"),),
            stdout=str(wd / "qemu.stdout.log"), stderr=str(wd / "qemu.stderr.log"),
            pidfile=str(wd / "qemu.pid"), stop_timeout_s=self.config.kill_grace_s, user=who,
        )  # fmt: skip
        try:
            await self.sv.deploy(proc)
        except _SvError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        return await self.status(vm_id)

    def _write_tee_share(self, shared: Path, image: Image) -> None:
        cfg = self.config
        write_tee_share(shared, cfg.platform, image, cfg.dev_pki, cfg.app_images)

    def _give_qemu_its_files(self, spec: CvmSpec) -> RunAs:
        """QEMU's user (made when missing), owning or reading this CVM's files (``.user``)."""
        who, image = ensure_user(self.config.user), self._image(spec.image)
        wd = self.workdir(spec.vm_id)
        prepare_workdir(wd, who, share_writable=not image.info.shared_ro)
        files = (image.kernel, image.initrd, image.hda, image.rootfs, image.bios)
        grant_reach(who, [wd], [p for p in files if p])
        return who

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if not await self._running(vm_id):
            return await self.status(vm_id)
        self._note_stop(wd, "stop")
        try:
            qmp = wd / "run" / "qmp.sock"  # wd / "qmp.sock": a QEMU started before run/ existed
            qmp = qmp if qmp.exists() or not (wd / "qmp.sock").exists() else wd / "qmp.sock"
            async with await Qmp.connect(qmp, timeout_s=3) as q:
                reason = await q.shutdown(timeout_s)
            self._note_stop(wd, "stop", reason)
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
            self._note_stop(wd, "kill")
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


SIMULATED_PLATFORMS: frozenset[Platform] = frozenset({"tcg", "kvm"})  # no TEE: the TD is simulated
PLATFORM_FILE = "platform.json"  # read by pydstack_guest.tee
SIMULATED_TD_FILES = ("dev-pki", "images", "dev-td.json")  # what write_simulated_td writes


def write_tee_share(
    shared: Path, platform: Platform, image: Image, dev_pki: Path | None, app_images: Path | None
) -> None:
    """The share's part about the TEE: ``platform.json`` (the VM's platform and the image's
    os_image_hash, which the guest sends the KMS) always, and the simulated TD's files
    (`write_simulated_td`) only on a platform with no TEE and with a dev PKI; otherwise they
    are removed, so the dev PKI's private keys never enter a TDX guest's share."""
    digest = image.digest or os_image_hash(
        (image.dir / "sha256sum.txt").read_bytes() if (image.dir / "sha256sum.txt").exists()
        else b""
    )  # fmt: skip
    doc = {"platform": platform, "os_image_hash": digest}
    (shared / PLATFORM_FILE).write_bytes(msgspec.json.encode(doc))
    if platform in SIMULATED_PLATFORMS and dev_pki is not None:
        write_simulated_td(shared, image, dev_pki, app_images)
        return
    for name in SIMULATED_TD_FILES:
        path = shared / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_simulated_td(shared: Path, image: Image, dev_pki: Path, app_images: Path | None) -> None:
    """What ``pydstack_guest.image_boot`` needs for a simulated TD, into the host share:
    ``dev-pki/`` (the quote-signing PKI), ``images/<name>/`` (each sandbox image: metadata and
    rootfs tarball) and ``dev-td.json`` (the image's os_image_hash, those images' names)."""
    pki = shared / "dev-pki"
    shutil.rmtree(pki, ignore_errors=True)
    shutil.copytree(dev_pki, pki)
    names: list[str] = []
    for d in sorted(app_images.iterdir()) if app_images and app_images.is_dir() else []:
        if image_name_error(d.name) is None and (d / "metadata.json").is_file():
            dest = shared / "images" / d.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(d, dest)
            names.append(d.name)
    reg = image_registration(image)  # the simulated TD is measured from what it boots
    parts = {k: getattr(reg, k) for k in ("firmware", "kernel", "initrd", "cmdline")}
    doc = {"os_image_hash": reg.os_image_hash, "images": names, "image": parts}
    (shared / "dev-td.json").write_bytes(msgspec.json.encode(doc))
