"""bench.scale's view of the log: per VM the server time of each step, per host what it
announced, every failure in words; and the double-booking check over it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from typing import Any

from pydstack.adapters.nats import EventStore
from pydstack.core.events import (
    HostHeartbeat,
    HostJoined,
    VmBootError,
    VmBootProgress,
    VmRejected,
    VmRequested,
    VmScheduled,
    VmStarted,
)
from pydstack.core.projections import applied

VM_MB = 256  # each simulated CVM's memory (1 vCPU)


class Watch:
    """Follows the log: per VM the server time of each step; per host what it announced."""

    def __init__(self) -> None:
        self.t: dict[str, dict[str, float]] = defaultdict(dict)
        self.scheduled: Counter[str] = Counter()
        self.host_of: dict[str, str] = {}
        self.hosts: dict[str, HostJoined] = {}
        self.heartbeats = 0
        self.errors: list[str] = []
        self.changed = asyncio.Event()
        self.frozen = False  # the storm is over: what the teardown appends is not counted

    async def follow(self, store: EventStore, from_seq: int) -> None:
        async for rec in store.read(from_seq=from_seq, follow=True):
            a = applied(rec.seq, rec.data, rec.time_ns)
            if a is None or self.frozen:
                continue
            t, ev = a.time_ns / 1e9, a.event
            match ev:
                case VmRequested(vm_id=vm):
                    self.t[vm]["requested"] = t
                case VmScheduled(vm_id=vm, host=host):
                    self.t[vm].setdefault("scheduled", t)
                    self.scheduled[vm] += 1
                    self.host_of[vm] = host
                case VmStarted(vm_id=vm):
                    self.t[vm].setdefault("started", t)
                case VmBootProgress(vm_id=vm, stage="ready"):
                    self.t[vm].setdefault("ready", t)
                case VmBootProgress(vm_id=vm, stage="error", detail=d):
                    self.errors.append(f"{vm} boot error: {d}")
                case VmBootError(vm_id=vm, stage=s, error=e):
                    self.errors.append(f"{vm} boot error at {s}: {e}")
                case VmRejected(vm_id=vm, reason=r):
                    self.errors.append(f"{vm} rejected: {r}")
                case HostJoined(host_id=h):
                    self.hosts[h] = ev
                case HostHeartbeat():
                    self.heartbeats += 1
            self.changed.set()

    def count(self, step: str) -> int:
        return sum(step in v for v in self.t.values())

    async def until(self, pred: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not pred():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return True


def double_bookings(w: Watch, vms: list[str]) -> int:
    """VMs scheduled more than once, plus VMs beyond a host's announced vCPUs or memory."""
    over = sum(n - 1 for n in w.scheduled.values() if n > 1)
    per_host = Counter(w.host_of[v] for v in vms if v in w.host_of)
    for host, n in per_host.items():
        joined = w.hosts.get(host)
        if joined is None or n > joined.vcpu or n * VM_MB > joined.memory_mb:
            over += n
    return over


def lag(w: Watch, vms: list[str], a: str, b: str) -> list[float]:
    return [(w.t[v][b] - w.t[v][a]) * 1000 for v in vms if a in w.t[v] and b in w.t[v]]
