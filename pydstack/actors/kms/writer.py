"""Group commit of KMS decisions onto the one aggregate `dstack.kms.<cluster>`.

Every event on a subject names the hash of the one before it, so appends to one aggregate are
a chain and must be serialized, each with OCC on the version the writer holds. A conflict
means another replica appended: re-read the version and append again; the event ids are
fixed, so an append that did land is not stored twice.

One writer task takes everything queued. A lone event (one request at a time: its
KeyRequested, later its decision) is an ordinary append, ~0.5 ms. Appends that queued up
behind one in flight (many clients at once) are stored together as one JetStream atomic
batch: the server fsyncs a batch (4-9 ms here), too slow for a single request but one fsync
for dozens. One append at a time would instead make each wait a NATS round trip plus turns of
a busy event loop: with 50 clients' TLS and quote checks on the loop, two appends per
request ran at ~7-14 req/s against ~200-350 with group commit (`python -m bench.kms_writer`).
An item of several events (a GetKmsKey decision and its
KmsReplicaOnboarded) is always stored all or none.

Evidence blobs (a lean KeyRequested's attestation, `core.kms.blobs`) go to the evidence
bucket while the event is queued and appended: the two round trips overlap, and `append`
returns once both are stored, so a decision appended after it always finds its evidence.

    async with DecisionLog(store, subject, EvidenceBucket.of(store)) as log:
        await log.append([requested], blobs=[attestation])  # returns once both are stored
        await log.append([decided])
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.errors import ConflictError
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.adapters.nats.store import Change, Version, new_event_id
from pydstack.core.events import Event, message_hash

_MAX_BATCH = 200  # events per atomic batch (the server caps batches at 1000 messages)

_Item = tuple[list[Event], list[str], asyncio.Future[None]]


class DecisionLog:
    def __init__(
        self, store: EventStore, subject: str, bucket: EvidenceBucket | None = None
    ) -> None:
        self.store = store
        self.subject = subject
        self.bucket = bucket  # None: evidence stays inline (no blobs may be given)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._version: Version | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"kms-writer {self.subject}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            *_, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("KMS decision log closed"))

    async def append(self, events: Sequence[Event], blobs: Sequence[bytes] = ()) -> None:
        """Store `events` together (all or none) after everything queued before them, and
        `blobs` in the evidence bucket meanwhile; returns once all are stored."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        puts = [b for b in blobs if b]
        if puts and self.bucket is None:
            raise ValueError("evidence blobs given to a decision log without a bucket")
        bucket = self.bucket
        stored = None  # one task per blob, started now: the put overlaps the append
        if bucket is not None and puts:
            stored = asyncio.gather(*(bucket.put(b) for b in puts))
        await self._queue.put((list(events), [new_event_id() for _ in events], fut))
        try:
            await fut
        except BaseException:  # the events' error; the blobs' puts still end before it is told
            if stored is not None:
                await asyncio.wait([stored])
                if not stored.cancelled():
                    stored.exception()  # retrieved: reported through the events' error
            raise
        if stored is not None:
            await stored

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            n = len(items[0][0])
            while not self._queue.empty() and n < _MAX_BATCH:
                item = self._queue.get_nowait()
                items.append(item)
                n += len(item[0])
            items = [it for it in items if not it[2].done()]  # waiter gone before its append
            if not items:
                continue
            try:  # one event: a plain append; more: one atomic batch (EventStore.commit)
                await self._commit(
                    [ev for evs, _, _ in items for ev in evs],
                    [i for _, ids, _ in items for i in ids],
                )
            except Exception as exc:  # every waiter learns the store's error
                self._version = None
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for *_, fut in items:
                if not fut.done():
                    fut.set_result(None)

    async def _commit(self, events: list[Event], ids: list[str]) -> None:
        for _attempt in range(20):
            if self._version is None:
                last = await self.store.last_by_subject(self.subject)
                self._version = (
                    Version(last.seq, message_hash(last.data)) if last is not None else Version()
                )
            try:
                out = await self.store.commit([Change(self.subject, events, self._version, ids)])
            except ConflictError:
                self._version = None
                continue
            self._version = out[self.subject]
            return
        raise ConflictError(self.subject, 0, "KMS decision log kept conflicting")
