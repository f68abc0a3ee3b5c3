"""Hypothesis drives a checkpointed scheduler through requests, reconciles and crashes (with
the checkpoint file intact, truncated, overwritten, edited, or naming a head not on the log):
after each step its view equals a scheduler's that folded the whole log, a restart from an
intact checkpoint reads only the tail, and no host is ever over-committed."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pydstack.actors import Scheduler, SchedulerConfig
from pydstack.actors._scheduler_checkpoint import checkpoint_key
from pydstack.adapters.nats import EventStore, NatsServer, NatsServerConfig, StreamSettings
from pydstack.adapters.sqlite import CheckpointFile, Snapshot
from pydstack.core.events import Signer

from .helpers import join, read_log, request

T = TypeVar("T")
_ids = itertools.count()
_resumes = itertools.count()
CAPACITY = {"vcpu": 4, "memory_mb": 4096, "cid_count": 3}
DAMAGE = ("none", "truncate", "garbage", "edit-row", "foreign-head")


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    store: EventStore
    tmp: Path

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = asyncio.new_event_loop()
    tmp: Path = tmp_path_factory.mktemp("ckpt")
    server = NatsServer(NatsServerConfig(data_dir=tmp / "nats"))
    loop.run_until_complete(server.__aenter__())
    signer = Signer.from_private_bytes("scheduler", os.urandom(32))
    store = loop.run_until_complete(
        EventStore.connect(server.url, signer, settings=StreamSettings())
    )
    loop.run_until_complete(store.ensure_stream())
    try:
        yield Env(loop, store, tmp)
    finally:
        loop.run_until_complete(store.close())
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()


def damage(path: Path, how: str, signer: Signer) -> None:
    """Spoil a checkpoint file the way ``how`` says (see DAMAGE)."""
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "edit-row":  # more room on a host, MAC left as it was
        with sqlite3.connect(path) as db:
            db.execute("UPDATE rows SET data = data || x'00' WHERE kind = 'host'")
    elif how == "foreign-head":  # a head the log does not hold, with a valid MAC (real key)
        key = checkpoint_key(signer)
        with CheckpointFile.open(path, actor="scheduler", schema=1, key=key) as cp:
            snap, _ = cp.load()
            assert snap is not None
            cp.save(Snapshot(snap.seq, snap.head_subject, b"\x00" * 32, snap.rows))


class CheckpointedScheduler(RuleBasedStateMachine):
    env: Env

    def __init__(self) -> None:
        super().__init__()
        n = next(_ids)
        self.host, self.prefix = f"ck{n}h", f"ck{n}vm"
        self.path = self.env.tmp / f"scheduler-{n}.db"
        self.env.run(join(self.env.store, self.host, **CAPACITY))
        self.sched = self._start()
        self.vms: list[str] = []

    def _start(self) -> Scheduler:
        cfg = SchedulerConfig(name="scheduler", checkpoint=self.path, checkpoint_every_s=0)
        return Scheduler(self.env.store, cfg)

    @rule(vcpu=st.integers(1, 3), memory=st.sampled_from([512, 1024, 2048]))
    def request_vm(self, vcpu: int, memory: int) -> None:
        vm = f"{self.prefix}{len(self.vms)}"
        self.env.run(request(self.env.store, vm, vcpu, memory, host=self.host))
        self.vms.append(vm)

    @rule()
    def reconcile(self) -> None:
        self.env.run(self.sched.reconcile())

    @rule(how=st.sampled_from(DAMAGE))
    def crash_and_restart(self, how: str) -> None:
        self.env.run(self.sched.catch_up())  # writes the checkpoint (every_s = 0)
        saved = self.sched.view.cursor
        assert self.sched.checkpoint is not None
        self.sched.checkpoint.close()
        damage(self.path, how, self.env.store.signer)
        self.sched = self._start()
        self.env.run(self.sched.catch_up())
        last = self.env.run(self.env.store.last_seq())
        if how == "none":  # resumed: read only what came after the checkpoint
            assert self.sched.view.folded == last - saved
            next(_resumes)
        else:  # rebuilt from the log
            assert self.sched.view.folded == last

    @invariant()
    def view_equals_a_full_fold(self) -> None:
        self.env.run(self.sched.catch_up())
        fresh = Scheduler(self.env.store, SchedulerConfig(name="scheduler"))
        self.env.run(fresh.catch_up())
        assert self.sched.view.cursor == fresh.view.cursor
        assert self.sched.view.rows() == fresh.view.rows()

    @invariant()
    def host_never_overcommitted(self) -> None:
        log = self.env.run(read_log(self.env.store))
        host = log.state.hosts[self.host]
        assert host.vcpu_used <= CAPACITY["vcpu"]
        assert host.memory_used_mb <= CAPACITY["memory_mb"]
        for vm in self.vms:
            assert len(log.decisions.get(vm, [])) <= 1


def test_checkpointed_scheduler_equals_a_full_fold_across_crashes(env: Env) -> None:
    CheckpointedScheduler.env = env
    run_state_machine_as_test(
        CheckpointedScheduler,
        settings=settings(
            max_examples=12,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert next(_resumes) > 0  # some restarts did resume from an intact checkpoint
