"""The follower task that keeps a ``LiveState`` current, and the hub that tells browsers.

The follower reads the stream once up to its last sequence (folding in batches), then follows
it with an ordered consumer, folding one message at a time. After each fold it publishes an
``Update`` (the new event rows and the names of the views that changed) to every subscriber
of the ``Hub``: the server-sent-event streams of open pages. A read error is logged and the
follower resumes after the last sequence it folded, so the views never skip or repeat an
event. Usage::

    hub = Hub()
    async with Follower(store, state, hub) as follower:
        await follower.ready.wait()         # caught up with the log as it was at start
        sub = hub.subscribe(); upd = await sub.get()
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import structlog

from pydstack.adapters.nats import EventStore, Recorded

from ._state import EventRow, LiveState

CATCH_UP_BATCH: Final = 1000
_log = structlog.get_logger("pydstack.dashboard")


@dataclass(frozen=True, slots=True)
class Update:
    seq: int
    rows: list[EventRow]
    views: frozenset[str]


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue; ``None`` in it means "closed" (shutdown, or it fell behind)."""

    queue: asyncio.Queue[Update | None] = field(default_factory=lambda: asyncio.Queue(1000))
    closed: bool = False

    async def get(self) -> Update | None:
        return await self.queue.get()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while self.queue.full():  # make room for the end marker; the reader stops anyway
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Hub:
    """Fan-out of updates to subscribers; a subscriber that falls 1000 updates behind is closed
    (its browser reconnects with ``Last-Event-ID`` and catches up from the event window)."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.close()

    def publish(self, update: Update) -> None:
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(update)
            except asyncio.QueueFull:
                self.unsubscribe(sub)

    def close(self) -> None:
        for sub in list(self._subs):
            self.unsubscribe(sub)


class Follower:
    """Owns the task that folds the log into ``state`` and publishes to ``hub``."""

    def __init__(
        self, store: EventStore, state: LiveState, hub: Hub, *, retry_s: float = 1.0
    ) -> None:
        self.store = store
        self.state = state
        state.judge.pin(store.anchor)  # the admin key the log's keyring is anchored to
        self.hub = hub
        self.retry_s = retry_s
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name="dashboard-follower")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _fold(self, batch: list[Recorded]) -> None:
        rows, views = self.state.apply(batch)
        if rows:
            self.hub.publish(Update(self.state.seq, rows, frozenset(views)))

    async def run(self) -> None:
        while True:
            try:
                await self._catch_up()
                self.ready.set()
                async for rec in self.store.read(follow=True, from_seq=self.state.seq + 1):
                    self._fold([rec])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any read failure: report, wait, resume at state.seq
                _log.warning("dashboard follower: read failed; retrying",
                             error=f"{type(exc).__name__}: {exc}", seq=self.state.seq)  # fmt: skip
                await asyncio.sleep(self.retry_s)

    async def _catch_up(self) -> None:
        last = await self.store.last_seq()
        if last <= self.state.seq:
            return
        batch: list[Recorded] = []
        async for rec in self.store.read(from_seq=self.state.seq + 1, until_seq=last):
            batch.append(rec)
            if len(batch) >= CATCH_UP_BATCH:
                self._fold(batch)
                batch = []
        self._fold(batch)
