"""Concurrent writers on one aggregate never lose an update (OCC via expected subject sequence)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydstack.adapters.nats import (
    NEW,
    ConflictError,
    EventStore,
    NatsServer,
    NatsServerConfig,
    StreamSettings,
    Version,
)
from pydstack.core.events import HostHeartbeat, Signer, decode_body, open_envelope

T = TypeVar("T")


class _LoopThread:
    """One event loop in a thread, so hypothesis' synchronous state machine can await the store."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def shared_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[_LoopThread, EventStore]]:
    lt = _LoopThread()
    server = NatsServer(NatsServerConfig(data_dir=Path(tmp_path_factory.mktemp("occ"))))
    lt.run(server.start())
    signer = Signer.from_private_bytes("occ", os.urandom(32))
    store = lt.run(EventStore.connect(server.url, signer, settings=StreamSettings()))
    lt.run(store.ensure_stream())
    yield lt, store
    lt.run(store.close())
    lt.run(server.stop())
    lt.close()


def _count(lt: _LoopThread, store: EventStore, subject: str) -> tuple[int, Version]:
    recs, version = lt.run(store.read_aggregate(subject))
    total = 0
    for r in recs:
        body = decode_body(open_envelope(r.data))
        assert isinstance(body, HostHeartbeat)
        total = body.running_vms  # each event records the counter value it decided
    return total, version


def test_interleaved_writers_never_lose_an_update(
    shared_store: tuple[_LoopThread, EventStore],
) -> None:
    lt, store = shared_store

    class Writers(RuleBasedStateMachine):
        """Writers fold, then append `counter + 1` guarded by the version they folded."""

        @initialize()
        def setup(self) -> None:
            self.subject = f"dstack.host.h{uuid.uuid4().hex[:12]}"
            self.views: dict[int, tuple[int, Version]] = {}
            self.committed = 0  # the model: increments that the store accepted

        @rule(writer=st.integers(0, 3))
        def fold(self, writer: int) -> None:
            self.views[writer] = _count(lt, store, self.subject)

        @precondition(lambda self: bool(self.views))
        @rule(data=st.data())
        def append(self, data: st.DataObject) -> None:
            writer = data.draw(st.sampled_from(sorted(self.views)))
            seen, version = self.views.pop(writer)
            fresh = seen == self.committed
            event = HostHeartbeat(host_id="h", running_vms=seen + 1)
            try:
                lt.run(store.append(self.subject, [event], version))
            except ConflictError:
                assert not fresh, "an append based on the latest state was refused"
                return
            assert fresh, f"a stale write (saw {seen}, store had {self.committed}) was accepted"
            self.committed += 1

        @invariant()
        def store_matches_model(self) -> None:
            if hasattr(self, "subject"):
                assert _count(lt, store, self.subject)[0] == self.committed

    Writers.TestCase.settings = settings(max_examples=15, stateful_step_count=12, deadline=None)
    Writers.TestCase().runTest()


async def test_concurrent_increments_all_land_exactly_once(store: EventStore) -> None:
    """8 writers x 15 increments with re-fold on conflict: the counter ends at 120, no gaps."""
    subject = "dstack.host.counter"

    async def writer() -> None:
        for _ in range(15):
            while True:
                recs, version = await store.read_aggregate(subject)
                last = decode_body(open_envelope(recs[-1].data)) if recs else None
                n = last.running_vms if isinstance(last, HostHeartbeat) else 0
                try:
                    await store.append(
                        subject, [HostHeartbeat(host_id="c", running_vms=n + 1)], version
                    )
                    break
                except ConflictError:
                    await asyncio.sleep(0)

    await asyncio.gather(*(writer() for _ in range(8)))
    recs, _ = await store.read_aggregate(subject)
    values = [
        b.running_vms
        for r in recs
        if isinstance(b := decode_body(open_envelope(r.data)), HostHeartbeat)
    ]
    assert values == list(range(1, 121))
    assert recs[-1].seq == 120 and NEW.seq == 0
