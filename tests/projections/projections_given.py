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


_KIND = {"apps": "app", "vms": "vm", "hosts": "host"}


def seal_all(events: Iterable[AnyEvent], start: int = 1) -> list[Message]:
    """Events as the store returns them: sealed envelopes with stream sequences."""
    out = []
    for seq, e in enumerate(events, start):
        target = route(e)
        subj = subject(_KIND[target[0]], target[1]) if target else "dstack.kms.c1"
        data = seal(SIGNER, e, subject=subj, event_id=f"e{seq}", time_ns=T0 + seq, correlation="c")
        out.append(Message(seq, data))
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
