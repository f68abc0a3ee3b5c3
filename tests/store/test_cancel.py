"""Store reads never lose a cancel: a task cancelled while its read is in flight ends cancelled.

Python 3.11's ``asyncio.wait_for`` (which nats-py's ``request`` uses) returns the reply when
the reply and a cancel arrive in the same loop iteration, and the caller's loop then runs on
after its owner cancelled it (a gateway CertKeeper kept going after ``running()`` exited, and
the test awaiting it hung for 300 s)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import VmStopped

V1 = "dstack.vm.v1"


async def cancel_at_every_step(read: Callable[[], Awaitable[object]], steps: int = 60) -> int:
    """Cancel ``read`` after 0, 1, ... loop iterations; returns how often the cancel was lost."""
    lost = 0
    for k in range(steps):
        task = asyncio.ensure_future(read())
        for _ in range(k):
            await asyncio.sleep(0)
        if not task.cancel():
            continue  # finished before the cancel: nothing to lose
        await asyncio.gather(task, return_exceptions=True)
        lost += not task.cancelled()
    return lost


async def test_a_cancel_during_last_seq_is_never_lost(store: EventStore) -> None:
    for _ in range(5):
        assert await cancel_at_every_step(store.last_seq) == 0


async def test_a_cancel_during_a_direct_get_is_never_lost(store: EventStore) -> None:
    version = await store.append(V1, [VmStopped(vm_id="v1")], NEW)
    for _ in range(3):
        assert await cancel_at_every_step(lambda: store.last_by_subject(V1)) == 0
        assert await cancel_at_every_step(lambda: store.version_at(V1, version.seq)) == 0
