"""kill -9 of the VMM process while 3 CVMs run: adopted, no duplicate start, CIDs unchanged;
the supervisor killed too: adopted again; the CVMs gone as well (host recovery): restarted."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.sandbox import _netns
from pydstack.core.events import VmExited, VmScheduled, VmStarted

from ..cvm.contract import free_port
from .conftest import VmmHost, VmmProcess, events_of, supervisor_pids, wait_until
from .test_lifecycle import http_ok

pytestmark = pytest.mark.slow
VMS = ("a1", "a2", "a3")


async def starts(store: EventStore, vm_id: str) -> list[VmStarted]:
    return [e for e in await events_of(store, vm_id) if isinstance(e, VmStarted)]


async def cids(store: EventStore) -> dict[str, int]:
    out = {}
    for vm in VMS:
        [s] = [e for e in await events_of(store, vm) if isinstance(e, VmScheduled)]
        out[vm] = s.cid
    return out


async def test_vmm_kill9_adopts_and_supervisor_loss_restarts(
    vmm_host: VmmHost, store: EventStore, nats_server: NatsServer
) -> None:
    ports = {vm: free_port() for vm in VMS}
    proc = VmmProcess(vmm_host, nats_server)
    api = await proc.start()
    try:
        for vm in VMS:
            await api.create(vm, ports[vm])
        for vm in VMS:
            await api.wait_state(vm, "running")
        first = await cids(store)
        assert len(set(first.values())) == 3
        pids = {vm: (await starts(store, vm))[0].pid for vm in VMS}

        # 1. kill -9 the VMM only; the CVMs (owned by the supervisor) keep running.
        proc.kill9()
        assert all([await asyncio.to_thread(http_ok, ports[vm]) for vm in VMS])
        api = await proc.start()
        await asyncio.sleep(2.0)  # ~10 poll passes of the new VMM
        for vm in VMS:
            assert len(await starts(store, vm)) == 1, f"{vm} started twice"
            info = await api.state(vm)
            assert (info["status"], info["cid"]) == ("running", first[vm])
            assert await asyncio.to_thread(http_ok, ports[vm])
        listed = {st.vm_id: st for st in await proc_backend_list(vmm_host)}
        assert {v: (s.pid, s.cid) for v, s in listed.items()} == {
            v: (pids[v], first[v]) for v in VMS
        }

        # 1b. kill -9 the supervisor only: the running VMM relaunches it, the new one adopts
        # the guests (nothing restarted) and the VMM's passes go on (its poll must not die).
        old_sv = supervisor_pids(vmm_host.root / "sv.sock")
        for pid in old_sv:
            os.kill(pid, signal.SIGKILL)

        async def relaunched() -> bool:
            now = supervisor_pids(vmm_host.root / "sv.sock")
            return bool(now) and now != old_sv

        await wait_until(relaunched, 20, "the VMM relaunches its supervisor")
        await asyncio.sleep(2.0)
        for vm in VMS:
            assert len(await starts(store, vm)) == 1, f"{vm} restarted after supervisor loss"
            assert (await api.state(vm))["status"] == "running"
        assert proc.alive(), "the VMM died when its supervisor did"

        # 2. kill -9 the VMM and the supervisor; the CVMs survive and are adopted again.
        proc.kill9()
        for pid in supervisor_pids(vmm_host.root / "sv.sock"):
            os.kill(pid, signal.SIGKILL)
        api = await proc.start()  # starts a new supervisor, which adopts the guests
        await asyncio.sleep(2.0)
        for vm in VMS:
            assert len(await starts(store, vm)) == 1
            assert (await api.state(vm))["status"] == "running"

        # 3. everything dies (host recovery): the VMM starts what should run, same CIDs.
        proc.kill9()
        for pid in supervisor_pids(vmm_host.root / "sv.sock"):
            os.kill(pid, signal.SIGKILL)
        for st in listed.values():
            backend_ns = _ns_of(vmm_host, st.vm_id)
            await asyncio.to_thread(_netns.kill_all, backend_ns)
        api = await proc.start()
        for vm in VMS:

            async def restarted(vm: str = vm) -> bool:
                return len(await starts(store, vm)) == 2

            await wait_until(restarted, 30, f"{vm} restarted")
            await api.wait_state(vm, "running")
            assert await asyncio.to_thread(http_ok, ports[vm])
            history = await events_of(store, vm)
            assert any(isinstance(e, VmExited) for e in history)
        assert await cids(store) == first
        after = {st.vm_id: st for st in await proc_backend_list(vmm_host)}
        assert {v: s.cid for v, s in after.items()} == first
        assert all(after[v].pid != pids[v] for v in VMS)
    finally:
        proc.stop()


def _ns_of(host: VmmHost, vm_id: str) -> str:
    import hashlib

    wd = (host.root / "vmm" / "vms" / vm_id).absolute()
    return "pds-" + hashlib.sha1(str(wd).encode()).hexdigest()[:10]


async def proc_backend_list(host: VmmHost) -> list:  # type: ignore[type-arg]
    """What a backend on the host's supervisor sees (as the VMM process would)."""
    from pydstack.actors.supervisor import SupervisorClient
    from pydstack.adapters.sandbox import SandboxBackend, SandboxConfig

    async with SupervisorClient(host.root / "sv.sock") as sv:
        b = SandboxBackend(SandboxConfig(vms_dir=host.root / "vmm" / "vms", images=host.images), sv)
        return await b.list()
