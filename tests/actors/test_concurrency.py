"""Several schedulers on one stream, and a scheduler killed with SIGKILL mid-work."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.metrics import sample
from pydstack.adapters.nats import EventStore, NatsServer, StreamSettings
from pydstack.core.events import Signer

from .helpers import assert_no_double_booking, decided_count, join, read_log, request, wait_decided

RUNTIME = RuntimeConfig(fetch_timeout_s=0.2, reconcile_interval_s=0.5)
SMALL = {"vcpu": 8, "memory_mb": 8192, "cid_count": 10}


async def _requests(store: EventStore, n: int, seed: int, prefix: str = "vm") -> None:
    rnd = random.Random(seed)
    for i in range(n):
        ports = ((20000 + rnd.randrange(8), 80),) if rnd.random() < 0.3 else ()
        await request(
            store,
            f"{prefix}{i}",
            vcpu=rnd.choice((1, 2)),
            memory_mb=rnd.choice((512, 1024, 2048)),
            ports=ports,
        )


async def _second_store(nats_server: NatsServer, actor: str) -> EventStore:
    signer = Signer.from_private_bytes(actor, os.urandom(32))
    return await EventStore.connect(nats_server.url, signer, settings=StreamSettings())


@pytest.mark.parametrize("shared_consumer", [False, True])
async def test_two_schedulers_never_double_book(
    store: EventStore, nats_server: NatsServer, shared_consumer: bool
) -> None:
    for h in ("h1", "h2", "h3"):
        await join(store, h, **SMALL)
    names = ("s-a", "s-a") if shared_consumer else ("s-b", "s-c")
    conflicts_before = sum(
        sample("pydstack_scheduler_decisions_total", {"actor": n, "outcome": "conflict"})
        for n in set(names)
    )
    a_store = await _second_store(nats_server, "sched-a")
    b_store = await _second_store(nats_server, "sched-b")
    async with a_store, b_store:
        a = Scheduler(a_store, SchedulerConfig(name=names[0]))
        b = Scheduler(b_store, SchedulerConfig(name=names[1]))
        async with ActorRunner(a_store, a, RUNTIME), ActorRunner(b_store, b, RUNTIME):
            await _requests(store, 60, seed=1)
            await wait_decided(store, 60, timeout=30)
    log = await read_log(store)
    assert_no_double_booking(log)
    assert len(log.decisions) == 60
    placed = sum(len(p) for p in log.placed.values())
    assert 0 < placed < 60  # capacity is 30 CIDs: some fit, the rest are rejected
    assert {log.state.vms[v].host for v in log.state.vms if log.state.vms[v].host} == {
        "h1",
        "h2",
        "h3",
    }
    if not shared_consumer:  # both saw every request, so they raced for real
        conflicts = sum(
            sample("pydstack_scheduler_decisions_total", {"actor": n, "outcome": "conflict"})
            for n in set(names)
        )
        assert conflicts > conflicts_before


def _spawn(url: str, name: str, key: Path, log: Path) -> asyncio.subprocess.Process:
    args = [
        sys.executable,
        "-m",
        "pydstack.actors.scheduler",
        "--nats",
        url,
        "--name",
        name,
        "--key-file",
        str(key),
        "--reconcile-interval",
        "0.5",
        "--log-level",
        "info",
    ]
    return asyncio.create_subprocess_exec(  # type: ignore[return-value]
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab")
    )


async def test_kill_9_mid_work_then_restart_converges(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    for h in ("h1", "h2", "h3"):
        await join(store, h, **SMALL)
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = await _spawn(nats_server.url, "proc-a", key, log_a)  # type: ignore[misc]
    b = await _spawn(nats_server.url, "proc-b", key, log_b)  # type: ignore[misc]
    feeder = asyncio.create_task(_requests(store, 80, seed=2))
    try:
        # Kill one scheduler as soon as it is doing real work, while requests keep coming.
        while await decided_count(store) < 10:
            assert a.returncode is None, log_a.read_text()
            await asyncio.sleep(0.02)
        a.kill()
        assert await a.wait() == -signal.SIGKILL
        decided_at_kill = await decided_count(store)
        assert decided_at_kill < 80
        await feeder
        b.kill()  # both dead: nothing gets decided until a restart
        await b.wait()
        a = await _spawn(nats_server.url, "proc-a", key, log_a)  # type: ignore[misc]
        await wait_decided(store, 80, timeout=30)
    finally:
        for p in (a, b):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        feeder.cancel()
    assert await asyncio.wait_for(a.wait(), 10) == 0  # SIGTERM: a clean stop
    assert '"actor stopped"' in log_a.read_text()
    log = await read_log(store)
    assert len(log.decisions) == 80
    assert_no_double_booking(log)
