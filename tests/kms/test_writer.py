"""The KMS decision writer: one append at a time is plain, queued appends share one batch."""

from __future__ import annotations

import asyncio

from pydstack.actors.kms.writer import DecisionLog
from pydstack.adapters.nats import EventStore
from pydstack.core.events import (
    KeyDenied,
    KeyRequested,
    decode_body,
    message_hash,
    open_envelope,
    verify,
)

SUBJ = "dstack.kms.writer"


async def _stored(store: EventStore) -> list[tuple[int, object]]:
    records, _ = await store.read_aggregate(SUBJ)
    return [(r.seq, decode_body(open_envelope(r.data))) for r in records]


async def test_concurrent_appends_all_land_once_in_queue_order(store: EventStore) -> None:
    """40 requests append at once: every event is stored exactly once, in the order queued,
    as one hash chain; appends queued behind one in flight share a commit; a two-event item
    lands adjacent."""
    reqs = [KeyRequested(request_id=f"r{i}", app_id="ab" * 20) for i in range(40)]
    pair = [KeyRequested(request_id="p", app_id="cd" * 20), KeyDenied(request_id="p", reason="x")]
    async with DecisionLog(store, SUBJ) as log:
        await log.append([reqs[0]])  # alone: a plain append
        await asyncio.gather(*(log.append([r]) for r in reqs[1:20]), log.append(pair),
                             *(log.append([r]) for r in reqs[20:]))  # fmt: skip
    got = [ev for _, ev in await _stored(store)]
    assert got == [*reqs[:20], *pair, *reqs[20:]]
    records, _ = await store.read_aggregate(SUBJ)
    prev = b""
    commits = set()
    for r in records:  # signed, and each names the one before it
        env = verify(r.data)
        assert env.prev == prev
        prev = message_hash(r.data)
        commits.add(env.correlation)  # one correlation id per EventStore.commit
    assert len(commits) < len(records) // 2  # the lone first append, then shared batches
