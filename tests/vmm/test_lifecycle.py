"""The VMM on the sandbox backend: boot to ready, stop/start, update, remove, bad requests."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from pydstack.adapters.nats import EventStore
from pydstack.core.events import (
    HostVmPlaced,
    HostVmReleased,
    VmBootProgress,
    VmRemoved,
    VmStarted,
    VmStopped,
    VmUpdated,
    subject,
)
from pydstack.core.projections import applied

from ..cvm.contract import free_port
from .conftest import VmmHost, events_of


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def host_events(store: EventStore, host_id: str) -> list[object]:
    history, _ = await store.read_aggregate(subject("host", host_id))
    return [a.event for r in history if (a := applied(r.seq, r.data)) is not None]


async def test_create_boot_stop_start_update_remove(vmm_host: VmmHost, store: EventStore) -> None:
    """A VM requested through the API boots to ready with its port answering; shutdown records
    VmStopped and frees the port; start boots it again; an update while stopped moves the host
    reservation; remove records VmRemoved and gives the room back."""
    port = free_port()
    async with vmm_host.running() as (vmm, api):
        await api.create("web1", port)
        info = await api.wait_state("web1", "running")
        assert info["boot_progress"] == "ready" and info["cid"] >= 1000
        assert await asyncio.to_thread(http_ok, port)
        stages = [e.stage for e in await events_of(store, "web1") if isinstance(e, VmBootProgress)]
        assert stages[:1] == ["booted"] and stages[-1] == "ready"

        await api.ok("ShutdownVm", {"id": "web1"})
        await api.wait_state("web1", "stopped")
        assert not await asyncio.to_thread(http_ok, port)
        assert any(isinstance(e, VmStopped) for e in await events_of(store, "web1"))

        port2 = free_port()
        await api.ok("UpdateVm", {"id": "web1", "vcpu": 2, "update_ports": True,
                                  "ports": [{"host_port": port2, "vm_port": 8080}]})  # fmt: skip

        async def updated() -> bool:
            return any(isinstance(e, VmUpdated) for e in await events_of(store, "web1"))

        from .conftest import wait_until

        await wait_until(updated, 10, "VmUpdated")
        placed = [e for e in await host_events(store, "h1") if isinstance(e, HostVmPlaced)]
        assert placed[-1].resources.vcpu == 2 and placed[-1].ports[0].host_port == port2

        await api.ok("StartVm", {"id": "web1"})
        info = await api.wait_state("web1", "running")
        assert await asyncio.to_thread(http_ok, port2)
        assert info["configuration"]["vcpu"] == 2
        starts = [e for e in await events_of(store, "web1") if isinstance(e, VmStarted)]
        assert len(starts) == 2 and all(s.attempt == 0 for s in starts)
        # the sandbox simulates its TD (dev PKI quotes): VmStarted says so (issue 15.8)
        assert [s.tee for s in starts] == ["simulated", "simulated"]

        await api.ok("RemoveVm", {"id": "web1"})

        async def removed() -> bool:
            return any(isinstance(e, VmRemoved) for e in await events_of(store, "web1"))

        await wait_until(removed, 15, "VmRemoved")
        released = [e for e in await host_events(store, "h1") if isinstance(e, HostVmReleased)]
        assert [e.vm_id for e in released] == ["web1"]
        assert await vmm.backend.list() == []
        assert (await api.ok("GetInfo", {"id": "web1"})) == {"found": False}


async def test_bad_requests_are_refused_and_append_nothing(
    vmm_host: VmmHost, store: EventStore
) -> None:
    """Unknown VM, forbidden name, port out of range or taken, too many vCPU or too much
    memory, a missing image, a shrinking disk: each is a 4xx naming the field; the log does not
    move."""
    taken = free_port()
    async with vmm_host.running() as (_, api):
        await api.create("ok1", taken)
        await api.wait_state("ok1", "running")
        await asyncio.sleep(0.5)  # let boot progress settle
        before = await store.last_seq()
        base = {"name": "x1", "image": "sandbox-busybox", "vcpu": 1, "memory": 256}
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("StartVm", {"id": "nope"}, 404, "id"),
            ("StopVm", {"id": "nope"}, 404, "id"),
            ("UpdateVm", {"id": "nope", "vcpu": 1}, 404, "id"),
            ("CreateVm", {**base, "name": "bad/name"}, 400, "name"),
            ("CreateVm", {**base, "ports": [{"host_port": 80, "vm_port": 80}]}, 400, "ports"),
            ("CreateVm", {**base, "ports": [{"host_port": 70000, "vm_port": 80}]}, 400, "ports"),
            ("CreateVm", {**base, "ports": [{"host_port": taken, "vm_port": 80}]}, 409, "ports"),
            ("CreateVm", {**base, "vcpu": 64}, 409, "vcpu"),
            ("CreateVm", {**base, "memory": 1 << 20}, 409, "memory"),
            ("CreateVm", {**base, "image": "no-such-image"}, 400, "image"),
            ("UpdateVm", {"id": "ok1", "disk_size": 0, "vcpu": 64}, 409, "vcpu"),
        ]
        for method, body, status, field in cases:
            got, data = await api.call(method, body)
            assert (got, data.get("field")) == (status, field), (method, body, data)
            assert data["error"]
        await asyncio.sleep(0.5)
        assert await store.last_seq() == before


async def test_the_supervisor_outlives_the_vmm_only_while_it_runs_cvms(vmm_host: VmmHost) -> None:
    """A VMM that stops leaves its running CVMs under the supervisor (the next VMM adopts
    them); with none left, the supervisor exits with it instead of lingering."""
    from .conftest import supervisor_pids, wait_until

    sock = vmm_host.root / "sv.sock"
    async with vmm_host.running() as (_vmm, api):
        await api.create("web1", free_port())
        await api.wait_state("web1", "running")
    pids = supervisor_pids(sock)
    assert len(pids) == 1, "stopping the VMM must not take its running CVM's supervisor"
    async with vmm_host.running() as (vmm, api):
        assert supervisor_pids(sock) == pids  # adopted, not relaunched
        await api.ok("RemoveVm", {"id": "web1"})

        async def gone() -> bool:
            return await vmm.backend.list() == []

        await wait_until(gone, 15, "web1 removed")

    async def exited() -> bool:
        return not supervisor_pids(sock)

    assert await wait_until(exited, 10, "the idle supervisor's exit")
