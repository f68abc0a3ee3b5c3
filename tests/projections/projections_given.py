"""Builders shared by the projection tests: events stamped with stream sequences and times."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydstack.core.events import AnyEvent, PortMap, Signer, VmRequested, VmResources, seal
from pydstack.core.events.subjects import subject
from pydstack.core.projections import Applied, route

T0 = 1_700_000_000_000_000_000
SIGNER = Signer.from_private_bytes("test", bytes(32))


def stamp(events: Iterable[AnyEvent], start: int = 1) -> list[Applied]:
    """Events as a fold sees them, at seq start, start+1, … one second apart."""
    return [
        Applied(seq, T0 + seq * 1_000_000_000, e, f"e{seq}") for seq, e in enumerate(events, start)
    ]


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    data: bytes
    time_ns: int = 0
    subject: str = ""


_KIND = {"apps": "app", "vms": "vm", "hosts": "host"}


def seal_all(events: Iterable[AnyEvent], start: int = 1) -> list[Message]:
    """Events as the store returns them: sealed envelopes with stream sequences."""
    out = []
    for seq, e in enumerate(events, start):
        target = route(e)
        subj = subject(_KIND[target[0]], target[1]) if target else "dstack.kms.c1"
        data = seal(SIGNER, e, subject=subj, event_id=f"e{seq}", time_ns=T0 + seq, correlation="c")
        out.append(Message(seq, data, subject=subj))
    return out


def request(
    vm_id: str = "v1",
    vcpu: int = 2,
    memory_mb: int = 2048,
    ports: tuple[tuple[int, int], ...] = (),
    host: str = "",
    app_id: str = "a1",
) -> VmRequested:
    return VmRequested(
        vm_id=vm_id,
        app_id=app_id,
        name=vm_id,
        resources=VmResources(vcpu=vcpu, memory_mb=memory_mb),
        ports=tuple(PortMap(host_port=h, vm_port=v) for h, v in ports),
        host=host,
    )


def workload(n_events: int, hosts: int = 50, seed: int = 0) -> list[AnyEvent]:
    """A realistic log of about ``n_events``: hosts join, apps register, VMs are placed by
    ``decide_placement``, boot, run, and some are stopped, released and removed."""
    import random

    from pydstack.core.events import (
        AppRegistered,
        HostHeartbeat,
        HostJoined,
        HostVmPlaced,
        HostVmReleased,
        VmBootProgress,
        VmRemoved,
        VmRemoveRequested,
        VmScheduled,
        VmStarted,
        VmStopped,
        VmStopRequested,
    )
    from pydstack.core.projections import decide_placement
    from pydstack.core.projections import hosts as host_fold

    rng = random.Random(seed)
    out: list[AnyEvent] = [HostJoined(host_id=f"h{i:03}") for i in range(hosts)]
    out += [AppRegistered(app_id=f"a{i:03}", compose_hash=f"{i:064x}") for i in range(100)]
    state = {h.host_id: host_fold.apply(None, a) for a in stamp(out[:hosts]) if (h := a.event)}
    where: dict[str, str] = {}
    live: list[str] = []
    n = 0
    while len(out) < n_events:
        n += 1
        vm = f"vm{n:07}"
        req = request(vm, vcpu=rng.choice((1, 2, 4)), memory_mb=1024, app_id=f"a{n % 100:03}")
        got = decide_placement(state, req)  # type: ignore[arg-type]
        if not isinstance(got, HostVmPlaced):
            victim = live.pop(0)
            host = where.pop(victim)
            batch: list[AnyEvent] = [
                VmStopRequested(vm_id=victim),
                VmStopped(vm_id=victim),
                VmRemoveRequested(vm_id=victim),
                HostVmReleased(host_id=host, vm_id=victim),
                VmRemoved(vm_id=victim),
            ]
        else:
            live.append(vm)
            where[vm] = got.host_id
            batch = [
                req,
                got,
                VmScheduled(vm_id=vm, host=got.host_id, cid=got.cid),
                VmStarted(vm_id=vm, host=got.host_id, pid=n),
                VmBootProgress(vm_id=vm, stage="keys"),
                VmBootProgress(vm_id=vm, stage="done"),
                HostHeartbeat(host_id=got.host_id, running_vms=len(live)),
            ]
        for a in stamp(batch, start=len(out) + 1):
            if hasattr(a.event, "host_id"):
                key = a.event.host_id
                state[key] = host_fold.apply(state[key], a)
        out += batch
    return out
