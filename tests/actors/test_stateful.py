"""Hypothesis drives two schedulers step by step (catch up, plan, commit) in any interleaving
on one host: whatever the order, the log never over-commits the host or decides a VM twice."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pydstack.actors import Plan, Scheduler, SchedulerConfig
from pydstack.adapters.nats import (
    ConflictError,
    EventStore,
    NatsServer,
    NatsServerConfig,
    StreamSettings,
)
from pydstack.core.events import (
    HostVmPlaced,
    Signer,
    VmRejected,
    VmScheduled,
    decode_body,
    open_envelope,
    subject,
)

from .helpers import join, request

T = TypeVar("T")
_ids = itertools.count()
_conflicts = itertools.count()
CAPACITY = {"vcpu": 4, "memory_mb": 4096, "cid_count": 3}


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    stores: tuple[EventStore, EventStore]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = asyncio.new_event_loop()
    data: Path = tmp_path_factory.mktemp("nats")
    server = NatsServer(NatsServerConfig(data_dir=data))
    loop.run_until_complete(server.__aenter__())

    async def connect(name: str) -> EventStore:
        signer = Signer.from_private_bytes(name, os.urandom(32))
        return await EventStore.connect(server.url, signer, settings=StreamSettings())

    stores = (loop.run_until_complete(connect("a")), loop.run_until_complete(connect("b")))
    loop.run_until_complete(stores[0].ensure_stream())
    try:
        yield Env(loop, stores)
    finally:
        for s in stores:
            loop.run_until_complete(s.close())
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()


class TwoSchedulersOneHost(RuleBasedStateMachine):
    env: Env

    def __init__(self) -> None:
        super().__init__()
        n = next(_ids)
        self.host = f"host{n}"
        self.prefix = f"e{n}vm"
        store = self.env.stores[0]
        start = self.env.run(store.last_seq())
        self.env.run(join(store, self.host, **CAPACITY))
        self.scheds = [
            Scheduler(s, SchedulerConfig(name=f"x{i}")) for i, s in enumerate(self.env.stores)
        ]
        for s in self.scheds:  # earlier examples' aggregates are not this one's business
            s.view.cursor = start
        self.plans: list[Plan | None] = [None, None]
        self.vms: list[str] = []

    @rule(
        vcpu=st.integers(1, 3),
        memory=st.sampled_from([512, 1024, 2048]),
        port=st.one_of(st.none(), st.integers(20000, 20002)),
    )
    def request_vm(self, vcpu: int, memory: int, port: int | None) -> None:
        vm = f"{self.prefix}{len(self.vms)}"
        ports = ((port, 80),) if port is not None else ()
        self.env.run(request(self.env.stores[0], vm, vcpu, memory, ports, host=self.host))
        self.vms.append(vm)

    @rule(i=st.integers(0, 1))
    def catch_up(self, i: int) -> None:
        self.env.run(self.scheds[i].catch_up())

    @rule(i=st.integers(0, 1), data=st.data())
    def plan(self, i: int, data: st.DataObject) -> None:
        mine = sorted(set(self.scheds[i].view.pending) & set(self.vms))
        if mine:
            self.plans[i] = self.scheds[i].plan(data.draw(st.sampled_from(mine)))

    @rule(i=st.integers(0, 1))
    def commit(self, i: int) -> None:
        plan, self.plans[i] = self.plans[i], None
        if plan is None:
            return
        try:
            self.env.run(self.scheds[i].execute(plan))
        except ConflictError:
            next(_conflicts)  # the loser re-reads in a later catch_up step

    @rule(first=st.integers(0, 1), data=st.data())
    def race(self, first: int, data: st.DataObject) -> None:
        """Both catch up and plan the same VM, then both commit: exactly one may win."""
        for s in self.scheds:
            self.env.run(s.catch_up())
        mine = sorted(set(self.scheds[0].view.pending) & set(self.vms))
        if not mine:
            return
        vm = data.draw(st.sampled_from(mine))
        self.plans = [s.plan(vm) for s in self.scheds]
        self.commit(first)
        self.commit(1 - first)

    @invariant()
    def host_never_overcommitted(self) -> None:
        store = self.env.stores[0]
        recs, _ = self.env.run(store.read_aggregate(subject("host", self.host)))
        placed = [
            e for r in recs if isinstance(e := decode_body(open_envelope(r.data)), HostVmPlaced)
        ]
        assert sum(p.resources.vcpu for p in placed) <= CAPACITY["vcpu"]
        assert sum(p.resources.memory_mb for p in placed) <= CAPACITY["memory_mb"]
        cids = [p.cid for p in placed]
        assert len(cids) == len(set(cids)) and all(1000 <= c < 1003 for c in cids)
        vms = [p.vm_id for p in placed]
        assert len(vms) == len(set(vms))
        ports = [m.host_port for p in placed for m in p.ports]
        assert len(ports) == len(set(ports))

    @invariant()
    def every_vm_decided_at_most_once(self) -> None:
        store = self.env.stores[0]
        for vm in self.vms:
            recs, _ = self.env.run(store.read_aggregate(subject("vm", vm)))
            outcomes = [
                r
                for r in recs
                if isinstance(decode_body(open_envelope(r.data)), VmScheduled | VmRejected)
            ]
            assert len(outcomes) <= 1, f"{vm} decided {len(outcomes)} times"


def test_interleaved_schedulers_never_overcommit(env: Env) -> None:
    TwoSchedulersOneHost.env = env
    run_state_machine_as_test(
        TwoSchedulersOneHost,
        settings=settings(
            max_examples=15,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert next(_conflicts) > 0  # the interleavings did include lost races
