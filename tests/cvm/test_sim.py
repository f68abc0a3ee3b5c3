"""The sim backend (bench.scale's load generator) keeps the CvmBackend contract, and says
everywhere that it is a load generator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.vmm import VmmConfig, VmmLaunch, running_vmm
from pydstack.actors.vmm._main import build_backend
from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.nats import NEW, EventStore, StoreError
from pydstack.adapters.sim import PLATFORM, Report, SimBackend, SimConfig
from pydstack.adapters.supervisor import SupervisorClient, launch_supervisor
from pydstack.core.events import (
    HostJoined,
    PortMap,
    VmBootProgress,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    subject,
)
from pydstack.core.projections import applied

from .contract import CvmBackendContract, Host, wait_for

PYDSTACK = str(Path(sys.executable).parent / "pydstack")


class TestSimContract(CvmBackendContract):
    BOOT_TIMEOUT_S = 10.0

    @pytest.fixture
    async def host(self, tmp_path: Path) -> AsyncIterator[Host]:
        h = Host(tmp_path, lambda sv: SimBackend(SimConfig(vms_dir=tmp_path / "vms"), sv))
        yield h
        await h.close()

    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec:
        return CvmSpec(vm_id=vm_id, image="sim", vcpu=1, memory_mb=256, cid=cid, ports=ports)


async def test_labelled_a_load_generator(tmp_path: Path) -> None:
    """Its kind, platform and the tee stage it reports name it a load generator, never a VM."""
    h = Host(tmp_path, lambda sv: SimBackend(SimConfig(vms_dir=tmp_path / "vms"), sv))
    backend = await h.start()
    try:
        assert backend.kind == "sim" and PLATFORM[0] == "sim"
        assert "load generator" in PLATFORM[1]
        await backend.create(CvmSpec(vm_id="s1", image="sim", vcpu=1, memory_mb=64))
        await backend.start("s1")
        await wait_for(backend, "s1", lambda s: s.boot_stage == "ready", 10)
        events, _ = await backend.events("s1", 0)
        tee = [e.detail for e in events if e.stage == "tee"]
        assert tee and "load generator" in tee[0]
    finally:
        await h.close()


async def test_boot_hook_stages_then_ready_or_error(tmp_path: Path) -> None:
    """With a boot hook, its stages precede ``ready``; a hook that raises ends in ``error``."""

    async def boot(spec: CvmSpec, report: Report) -> None:
        report("keys", "from the hook")
        if spec.name == "bad":
            raise RuntimeError("KMS refused")

    cfg = SimConfig(vms_dir=tmp_path / "vms", boot=boot)
    h = Host(tmp_path, lambda sv: SimBackend(cfg, sv))
    backend = await h.start()
    try:
        for vm, name in (("g1", "good"), ("b1", "bad")):
            await backend.create(CvmSpec(vm_id=vm, image="sim", vcpu=1, memory_mb=64, name=name))
            await backend.start(vm)
        good = await wait_for(backend, "g1", lambda s: s.boot_stage == "ready", 10)
        bad = await wait_for(backend, "b1", lambda s: s.boot_stage == "error", 10)
        assert good.state == bad.state == "running"
        stages = [e.stage for e in (await backend.events("g1", 0))[0]]
        assert stages == ["booted", "tee", "keys", "ready"], stages
        errors = [e.detail for e in (await backend.events("b1", 0))[0] if e.stage == "error"]
        assert errors == ["RuntimeError: KMS refused"]
    finally:
        await h.close()


async def test_a_sim_host_on_the_log_is_a_host(tmp_path: Path, store: EventStore) -> None:
    """A real VMM actor on the sim backend, placed on by the real scheduler, appends what a
    host appends (HostJoined, VmStarted, boot stages, VmRemoved on the VM's own subject), and
    its HostJoined names it a load generator."""
    sock = tmp_path / "sv.sock"
    sv = launch_supervisor(sock, tmp_path / "supervisor")
    cfg = VmmConfig(host_id="sim0", state_dir=tmp_path / "host", vcpu=2, memory_mb=1024,
                    poll_interval_s=0.1)  # fmt: skip
    launch = VmmLaunch(config=cfg, supervisor_socket=sock, api_socket=False,
                       sim=SimConfig(vms_dir=tmp_path / "host" / "vms"))  # fmt: skip
    sched = Scheduler(store, SchedulerConfig(name="scheduler"))
    req = VmRequested(vm_id="v1", app_id="a" * 40, name="v1", image="sim",
                      resources=VmResources(vcpu=1, memory_mb=256))  # fmt: skip
    try:
        async with ActorRunner(store, sched, RuntimeConfig()), running_vmm(store, launch) as (
            vmm, _,
        ):  # fmt: skip
            await store.append(subject("vm", "v1"), [req], NEW)
            await _until(store, "v1", lambda evs: any(
                isinstance(e, VmBootProgress) and e.stage == "ready" for e in evs))  # fmt: skip
            _, version = await store.read_aggregate(subject("vm", "v1"))
            await store.append(subject("vm", "v1"), [VmRemoveRequested(vm_id="v1")], version)
            evs = await _until(store, "v1", lambda evs: isinstance(evs[-1], VmRemoved))
            assert await vmm.backend.list() == []
    finally:
        sv.terminate()
        sv.wait(30)
    kinds = [type(e).__name__ for e in evs]
    for k in ("VmRequested", "VmScheduled", "VmStarted", "VmRemoved"):
        assert k in kinds, kinds
    stages = [e.stage for e in evs if isinstance(e, VmBootProgress)]
    assert stages[:3] == ["booted", "tee", "ready"], stages
    history, _ = await store.read_aggregate(subject("host", "sim0"))
    joined = [a.event for r in history if (a := applied(r.seq, r.data)) is not None
              and isinstance(a.event, HostJoined)]  # fmt: skip
    assert joined and joined[-1].platform == "sim"
    assert "load generator" in joined[-1].platform_reason


async def _until(store: EventStore, vm_id: str, pred: Callable[[list[Any]], bool]) -> list[Any]:
    deadline = time.monotonic() + 20
    while True:
        history, _ = await store.read_aggregate(subject("vm", vm_id))
        evs = [a.event for r in history if (a := applied(r.seq, r.data)) is not None]
        if evs and pred(evs):
            return evs
        assert time.monotonic() < deadline, [type(e).__name__ for e in evs]
        await asyncio.sleep(0.1)


def test_no_command_line_selects_it(tmp_path: Path) -> None:
    """Neither `pydstack up --vmm sim` nor `python -m pydstack.actors.vmm --backend sim` runs
    the load generator: both refuse the name before anything starts (VmmLaunch.sim only)."""
    for argv in (
        [PYDSTACK, "up", "--data-dir", str(tmp_path / "home"), "--vmm", "sim"],
        [sys.executable, "-m", "pydstack.actors.vmm", "--host-id", "h", "--state-dir",
         str(tmp_path / "vmm"), "--backend", "sim"],
    ):  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        said = r.stderr.lower()  # click: "'sim' is not one of"; argparse: "invalid choice"
        assert "'sim'" in said and ("not one of" in said or "invalid choice" in said), said
    assert not (tmp_path / "home" / "state.json").exists()


async def test_backend_name_alone_builds_nothing(tmp_path: Path) -> None:
    """``VmmLaunch(backend="sim")`` without a SimConfig is an unknown backend, not the sim."""
    cfg = VmmConfig(host_id="h", state_dir=tmp_path)
    with pytest.raises(StoreError, match="unknown backend 'sim'"):
        await build_backend(VmmLaunch(config=cfg, backend="sim"), SupervisorClient(tmp_path / "s"))
