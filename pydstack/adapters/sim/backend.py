"""``CvmBackend`` for load generation: a "sim" CVM boots instantly and is no VM at all.

Each CVM is one tiny supervised process (``_proc.py``: standard library, a few MB) that writes
the boot stages a real guest writes, answers HTTP on its port maps and powers off on SIGTERM,
so the VMM driving it appends exactly what it appends for a sandbox or QEMU CVM (VmStarted,
boot progress, heartbeats, adoption after a restart). With a ``boot`` hook the host-side part
of a boot runs in this process after the start (e.g. ``bench.scale``: GetAppKey against the
real KMS with a simulated quote) and its stages, then ``ready`` or ``error``, go to the same
``events.log``. Only ``bench.scale`` and tests construct it: ``pydstack up`` cannot select it
(``actors.vmm.VmmLaunch.sim`` is set programmatically only), and its kind, process note and
platform reason all say "sim" / load generator. Usage::

    backend = SimBackend(SimConfig(vms_dir=d), SupervisorClient(sock))
    await backend.create(CvmSpec(vm_id="vm1", image="sim", vcpu=1, memory_mb=256))
    await backend.start("vm1")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pydstack.adapters.cvm import CvmError, CvmSpec, CvmStatus
from pydstack.adapters.cvm_supervised import (
    SupervisedCvms,
    boot_offset,
    process_note,
    read_events,
)
from pydstack.adapters.supervisor import NotFound, ProcessConfig, SupervisorClient
from pydstack.adapters.supervisor import SupervisorError as _SvError

from ._proc import emit

KIND = "sim"
# The platform (and its reason) a VMM on this backend reports: never mistaken for a CVM.
PLATFORM = ("sim", "load generator (bench.scale): no VM, no TEE, never a real CVM")
_PROC = Path(__file__).with_name("_proc.py")

Report = Callable[[str, str], None]
BootHook = Callable[[CvmSpec, Report], Awaitable[None]]


@dataclass(frozen=True)
class SimConfig:
    vms_dir: Path
    # The host-side boot (keys, gateway) run after each start; it reports stages and raises
    # on failure (stage ``error``); None: the process reports ``ready`` by itself.
    boot: BootHook | None = None
    stop_grace_s: float = 5.0


class SimBackend(SupervisedCvms):
    kind = KIND
    note = process_note(KIND)

    def __init__(self, config: SimConfig, supervisor: SupervisorClient) -> None:
        super().__init__(config.vms_dir, supervisor)
        self.config = config
        self._boots: dict[str, asyncio.Task[None]] = {}

    async def create(self, spec: CvmSpec) -> CvmStatus:
        self.workdir(spec.vm_id).mkdir(parents=True, exist_ok=True)
        self._write_shared(spec)
        ready_by = "host" if self.config.boot is not None else "guest"
        (self.workdir(spec.vm_id) / "sim.json").write_text(json.dumps({"ready_by": ready_by}))
        self._write_manifest(spec)
        return await self.status(spec.vm_id)

    async def start(self, vm_id: str) -> CvmStatus:
        spec, wd = self._manifest(vm_id), self.workdir(vm_id)
        if await self._running(vm_id):
            return await self.status(vm_id)
        self._begin_run(wd)
        proc = ProcessConfig(
            id=vm_id, name=spec.name or vm_id, command=sys.executable,
            args=("-I", "-S", str(_PROC), str(wd.absolute())), cwd=str(wd), cid=spec.cid,
            note=self.note, stdout=str(wd / "console.log"), stderr=str(wd / "console.log"),
            stop_timeout_s=self.config.stop_grace_s,
        )  # fmt: skip
        try:
            await self.sv.deploy(proc)
        except _SvError as e:
            raise CvmError(f"{vm_id}: {e}") from None
        if self.config.boot is not None:
            self._cancel_boot(vm_id)
            self._boots[vm_id] = asyncio.create_task(self._boot(spec, wd), name=f"sim-{vm_id}")
        return await self.status(vm_id)

    async def _boot(self, spec: CvmSpec, wd: Path) -> None:
        assert self.config.boot is not None
        t0 = time.monotonic()  # the host-written stages' uptime counts from the start
        try:
            await self._guest_booted(wd)  # the host-side stages follow the guest's, as on a VM
            await self.config.boot(spec, lambda stage, detail: emit(str(wd), stage, detail, t0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the boot's failure is the CVM's: stage "error", as a guest's
            emit(str(wd), "error", f"{type(exc).__name__}: {exc}", t0)
        else:
            emit(str(wd), "ready", "sim", t0)
        finally:
            self._boots.pop(spec.vm_id, None)

    async def _guest_booted(self, wd: Path, timeout_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not any(e.stage == "tee" for e in read_events(wd, boot_offset(wd))[0]):
            if asyncio.get_running_loop().time() > deadline:
                raise CvmError(f"the sim process reported no boot within {timeout_s:.0f} s")
            await asyncio.sleep(0.02)

    def _cancel_boot(self, vm_id: str) -> None:
        task = self._boots.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        self._cancel_boot(vm_id)
        if await self._running(vm_id):
            self._note_stop(wd, "stop")
            with contextlib.suppress(NotFound):
                await self.sv.stop(vm_id, timeout_s=timeout_s)
        return await self.status(vm_id)

    async def kill(self, vm_id: str) -> CvmStatus:
        wd = self.workdir(vm_id)
        self._manifest(vm_id)
        self._cancel_boot(vm_id)
        if await self._running(vm_id):
            self._note_stop(wd, "kill")
            with contextlib.suppress(NotFound):
                await self.sv.kill(vm_id)
        return await self.status(vm_id)

    async def remove(self, vm_id: str) -> None:
        await self.kill(vm_id)
        with contextlib.suppress(NotFound):
            await self.sv.remove(vm_id)
        await asyncio.to_thread(shutil.rmtree, self.workdir(vm_id), True)

    async def aclose(self) -> None:
        """Cancel the host-side boots still running (their CVMs stay as they are)."""
        tasks = list(self._boots.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
