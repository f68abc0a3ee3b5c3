"""Batched consumption: one pull, handled in order, acked together; a crash before the acks
redelivers what was handled (at least once), never loses it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pydstack.actors import ActorRunner, Delivery, RuntimeConfig
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.core.events import Signer

from .helpers import request, wait_for


class Probe:
    """Records each delivery and, at the ``probe_at``-th, how many messages the consumer
    still counts as delivered but unacked; ``die_at``: close its connection after that many
    (the process dying between handling and acking)."""

    def __init__(self, name: str, store: EventStore, probe_at: int = 0, die_at: int = 0) -> None:
        self.name = name
        self.subjects: Sequence[str] = ("dstack.vm.*",)
        self.store, self.probe_at, self.die_at = store, probe_at, die_at
        self.seen: list[tuple[int, int]] = []  # (seq, delivered)
        self.unacked_at_probe = -1

    async def handle(self, d: Delivery) -> None:
        self.seen.append((d.seq, d.delivered))
        if len(self.seen) == self.probe_at:
            info = await self.store.js.consumer_info(self.store.stream, self.name)
            self.unacked_at_probe = info.num_ack_pending
        if len(self.seen) == self.die_at:
            await self.store.nc.close()

    async def reconcile(self) -> int:
        return 0


async def test_a_batch_is_handled_in_order_and_acked_after_it(store: EventStore) -> None:
    for i in range(5):
        await request(store, f"v{i}")
    actor = Probe("batched", store, probe_at=5)
    cfg = RuntimeConfig(fetch_timeout_s=0.2, reconcile_interval_s=3600, ack_every_s=60)
    async with ActorRunner(store, actor, cfg):
        await wait_for(lambda: len(actor.seen) == 5, timeout=10)
        # While the last of the batch is handled, none of the five is acked yet.
        assert actor.unacked_at_probe == 5
        deadline = asyncio.get_running_loop().time() + 5
        while (info := await store.js.consumer_info(store.stream, actor.name)).num_ack_pending:
            assert asyncio.get_running_loop().time() < deadline, "batch never acked"
            await asyncio.sleep(0.05)
    assert [s for s, _ in actor.seen] == sorted(s for s, _ in actor.seen)
    assert info.ack_floor.stream_seq == actor.seen[-1][0]


async def test_a_crash_before_the_batch_acks_redelivers_what_was_handled(
    store: EventStore, nats_server: NatsServer, signer: Signer
) -> None:
    for i in range(3):
        await request(store, f"v{i}")
    doomed = await EventStore.connect(nats_server.url, signer)
    actor = Probe("crashy", doomed, die_at=3)
    cfg = RuntimeConfig(fetch_timeout_s=0.2, reconcile_interval_s=3600, ack_wait_s=1.0,
                        ack_every_s=60)  # fmt: skip
    runner = ActorRunner(doomed, actor, cfg)
    task = asyncio.create_task(runner.run())
    await wait_for(lambda: len(actor.seen) == 3, timeout=10)
    await asyncio.wait({task}, timeout=5)  # its connection is gone: the runner ends
    assert task.done() and isinstance(task.exception(), Exception)
    first = [s for s, _ in actor.seen]
    successor = Probe("crashy", store)
    async with ActorRunner(store, successor, cfg):  # same consumer config (ack_wait 1 s)
        await wait_for(lambda: len(successor.seen) == 3, timeout=10)
    # Handled but never acked: all three come again, in order, as second deliveries.
    assert successor.seen == [(s, 2) for s in first]


class Slow(Probe):
    async def handle(self, d: Delivery) -> None:
        await super().handle(d)
        await asyncio.sleep(0.5)


async def test_stop_hands_back_the_batch_pulled_ahead(store: EventStore) -> None:
    for i in range(3):
        await request(store, f"v{i}")
    # batch=1: while the first is handled, the second is already pulled (ahead).
    cfg = RuntimeConfig(fetch_timeout_s=0.2, reconcile_interval_s=3600, batch=1)
    actor = Slow("ahead", store)
    runner = ActorRunner(store, actor, cfg)
    async with runner:
        await wait_for(lambda: actor.seen, timeout=10)
        await asyncio.sleep(0.1)  # the pull ahead has its message by now
        runner.stop()
        await asyncio.wait_for(runner.wait(), 3)
    assert len(actor.seen) == 1
    # Handed back, not left to ack_wait (30 s): a successor gets the other two at once.
    successor = Probe("ahead", store)
    async with ActorRunner(store, successor, cfg):
        await wait_for(lambda: len(successor.seen) == 2, timeout=5)
    assert [s for s, _ in successor.seen] == [actor.seen[0][0] + 1, actor.seen[0][0] + 2]
