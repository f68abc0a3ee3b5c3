"""Shared helpers for actor tests: write commands, fold the log, check placement invariants."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import (
    AnyEvent,
    CodecError,
    HostJoined,
    HostVmPlaced,
    PortMap,
    VmRejected,
    VmRequested,
    VmResources,
    VmScheduled,
    subject,
)
from pydstack.core.projections import Projections, applied, fold


async def join(store: EventStore, host_id: str, **capacity: object) -> None:
    await store.append(subject("host", host_id), [HostJoined(host_id=host_id, **capacity)], NEW)  # type: ignore[arg-type]


async def request(
    store: EventStore,
    vm_id: str,
    vcpu: int = 1,
    memory_mb: int = 1024,
    ports: tuple[tuple[int, int], ...] = (),
    host: str = "",
) -> None:
    maps = tuple(PortMap(host_port=h, vm_port=v) for h, v in ports)
    req = VmRequested(
        vm_id=vm_id,
        app_id="app",
        name=vm_id,
        host=host,
        ports=maps,
        resources=VmResources(vcpu=vcpu, memory_mb=memory_mb),
    )
    await store.append(subject("vm", vm_id), [req], NEW)


@dataclass
class Log:
    """Everything on the stream, folded, plus the raw decisions per VM and per host."""

    state: Projections
    decisions: dict[str, list[AnyEvent]] = field(default_factory=lambda: defaultdict(list))
    placed: dict[str, list[HostVmPlaced]] = field(default_factory=lambda: defaultdict(list))


async def read_log(store: EventStore) -> Log:
    items = []
    async for rec in store.read():
        try:
            a = applied(rec.seq, rec.data)
        except CodecError:
            continue
        if a is not None:
            items.append(a)
    log = Log(fold(items))
    for a in items:
        if isinstance(a.event, VmScheduled | VmRejected):
            log.decisions[a.event.vm_id].append(a.event)
        elif isinstance(a.event, HostVmPlaced):
            log.placed[a.event.host_id].append(a.event)
    return log


def assert_no_double_booking(log: Log) -> None:
    """No CID or host port twice on a host, no host over capacity, one decision per VM."""
    for vm_id, ds in log.decisions.items():
        assert len(ds) == 1, f"{vm_id} decided {len(ds)} times: {ds}"
    for host_id, placed in log.placed.items():
        host = log.state.hosts[host_id]
        vms = Counter(p.vm_id for p in placed)
        assert max(vms.values()) == 1, f"a VM placed twice on {host_id}: {vms.most_common(1)}"
        cids = Counter(p.cid for p in placed)
        assert max(cids.values()) == 1, f"CID used twice on {host_id}: {cids.most_common(1)}"
        ports = Counter((m.protocol, m.host_port) for p in placed for m in p.ports)
        assert not ports or max(ports.values()) == 1, f"host port reused on {host_id}"
        assert sum(p.resources.vcpu for p in placed) <= host.vcpu
        assert sum(p.resources.memory_mb for p in placed) <= host.memory_mb
        assert all(host.cid_start <= p.cid < host.cid_start + host.cid_count for p in placed)
    for vm_id, ds in log.decisions.items():
        d = ds[0]
        if isinstance(d, VmScheduled):  # the VM and the host agree on the reservation
            mine = [p for p in log.placed[d.host] if p.vm_id == vm_id]
            assert [p.cid for p in mine] == [d.cid], f"{vm_id}: VmScheduled and HostVmPlaced differ"


async def wait_for(cond: Callable[[], object], timeout: float = 20.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


async def decided_count(store: EventStore) -> int:
    log = await read_log(store)
    return sum(1 for v in log.state.vms.values() if v.state in ("scheduled", "rejected"))


async def wait_decided(store: EventStore, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await decided_count(store)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {got} of {n} VMs decided in {timeout} s")
        await asyncio.sleep(0.1)
