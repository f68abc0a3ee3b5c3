"""``CvmBackend`` on network namespaces: a CVM is a namespace with its own docker engine and
the guest agent on the simulated TDX backend, run by the supervisor so it outlives the VMM.

Work dir ``<vms_dir>/<vm_id>/`` (as the QEMU backend's, so the VMM cannot tell them apart)::

    manifest.json  the CvmSpec            sandbox.json   how to run it (namespace, sockets)
    shared/        host-shared files      events.log     guest stages, JSON lines
    docker/        the engine's data root console.log    guest + container output
    stop-requested present while a stop/kill asked for is in effect (stopped, not exited)

Namespace ``pds-<sha1(vms_dir/vm_id)[:10]>``; sockets under ``<run_root>/<same id>/``. Work
dir and observation are shared with the QEMU backend (``adapters.cvm_supervised``).
Usage::

    backend = SandboxBackend(SandboxConfig(vms_dir=d, images=img), SupervisorClient(sock))
    await backend.create(CvmSpec(vm_id="vm1", image="sandbox-busybox", vcpu=1, memory_mb=256))
    await backend.start("vm1")
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import sys
from pathlib import Path

import msgspec

from pydstack.adapters.cvm import CvmError, CvmSpec, CvmStatus
from pydstack.adapters.cvm_supervised import SupervisedCvms, process_note
from pydstack.adapters.supervisor import NotFound, ProcessConfig, SupervisorClient
from pydstack.adapters.supervisor import SupervisorError as _SvError

from . import _cgroup, _netns
from .guest import SandboxRun
from .images import ImageNameError, SandboxImage, list_images, load_image


class SandboxConfig(msgspec.Struct, frozen=True, kw_only=True):
    vms_dir: Path
    images: Path
    run_root: Path = Path("/run/pydstack-sandbox")
    dev_pki: Path | None = None  # a shared simulator PKI (e.g. `up`'s DATA/dev-pki)
    stop_grace_s: float = 10.0
    dockerd: str = "dockerd"
    # Registry mirrors of every CVM's engine (`up --registry`, `--registry-mirror`), each
    # relayed into the CVM's namespace; digest-pinned images are checked whoever serves them.
    registry_mirrors: tuple[str, ...] = ()


class SandboxBackend(SupervisedCvms):
    kind = "sandbox"
    note = process_note("sandbox")

    def __init__(self, config: SandboxConfig, supervisor: SupervisorClient) -> None:
        super().__init__(config.vms_dir, supervisor)
        self.config = config

    def _short(self, vm_id: str) -> str:
        return hashlib.sha1(str(self.workdir(vm_id).absolute()).encode()).hexdigest()[:10]

    def netns(self, vm_id: str) -> str:
        return f"pds-{self._short(vm_id)}"

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
        except ImageNameError as e:
            raise CvmError(str(e)) from None
        except (FileNotFoundError, msgspec.DecodeError):
            raise CvmError(f"image {spec.image!r} is not in {self.config.images}") from None
        self._write_shared(spec)
        run = SandboxRun(
            netns=self.netns(spec.vm_id),
            run_dir=str(self.config.run_root / self._short(spec.vm_id)),
            images=str(self.config.images.absolute()),
            dev_pki=str(self.config.dev_pki or ""), dockerd=self.config.dockerd,
            registry_mirrors=self.config.registry_mirrors,
        )  # fmt: skip
        (wd / "sandbox.json").write_bytes(msgspec.json.encode(run))
        self._write_manifest(spec)
        await asyncio.to_thread(_netns.ensure, run.netns)
        return await self.status(spec.vm_id)

    async def start(self, vm_id: str) -> CvmStatus:
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        if await self._running(vm_id):
            return await self.status(vm_id)
        await asyncio.to_thread(_netns.ensure, self.netns(vm_id))
        try:  # the VM's vCPUs and RAM (`_cgroup`), set before anything of it runs
            _cgroup.ensure(self.netns(vm_id), vcpu=spec.vcpu, memory_mb=spec.memory_mb)
        except OSError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        self._begin_run(wd)
        proc = ProcessConfig(
            id=vm_id, name=spec.name or vm_id, command=sys.executable,
            args=("-m", "pydstack.adapters.sandbox.guest", str(wd.absolute())),
            cwd=str(wd), cid=spec.cid, note=self.note, stdout=str(wd / "console.log"),
            stderr=str(wd / "guest.stderr.log"), stop_timeout_s=self.config.stop_grace_s,
        )  # fmt: skip
        try:
            await self.sv.deploy(proc)
        except _SvError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        return await self.status(vm_id)

    async def _finish(self, vm_id: str) -> None:
        """Whatever the guest left in its namespace (a killed guest leaves its engine), then its
        cgroups (`start` sets them again)."""
        ns = self.netns(vm_id)
        await asyncio.to_thread(_netns.kill_all, ns)
        await asyncio.to_thread(_cgroup.kill_all, ns)  # containers in netns of their own
        await asyncio.to_thread(_cgroup.remove, ns)

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        if await self._running(vm_id):
            self._note_stop(wd, "stop")
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
            self._note_stop(wd, "kill")
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
            _cgroup.kill_all(ns)
            _cgroup.remove(ns)
            _netns.unmount_under(wd / "docker", rd)
            _netns.delete(ns)
            shutil.rmtree(wd, ignore_errors=True)
            shutil.rmtree(rd, ignore_errors=True)
            for relay in rd.parent.glob(f"{rd.name}.out*.sock"):  # the guest's HostRelay
                relay.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the last CVM gone: no empty dir left in /run
                rd.parent.rmdir()

        await asyncio.to_thread(clean)
