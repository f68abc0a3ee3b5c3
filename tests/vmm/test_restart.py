"""Auto-restart with dstack's policy (fast timings): every decision is on the log."""

from __future__ import annotations

import os
import signal

from pydstack.adapters.nats import EventStore
from pydstack.core.events import (
    VmExited,
    VmRestartExhausted,
    VmRestartScheduled,
    VmStarted,
    VmStartRequested,
)

from ..cvm.contract import free_port
from .conftest import FAST, VmmHost, events_of, wait_until


async def test_crashes_are_restarted_with_backoff_then_given_up(
    vmm_host: VmmHost, store: EventStore
) -> None:
    """Two crashes are restarted after 0.3 s then 0.6 s (attempts 1, 2); the third exceeds
    max_retries=2: VmRestartExhausted and it stays exited; an operator start resets it."""
    async with vmm_host.running(FAST) as (vmm, api):
        await api.create("r1", free_port())
        await api.wait_state("r1", "running")
        for n in (1, 2, 3):
            pid = (await vmm.backend.status("r1")).pid
            assert pid
            os.kill(pid, signal.SIGKILL)

            async def decided(n: int = n) -> bool:
                evs = await events_of(store, "r1")
                if n < 3:
                    return sum(isinstance(e, VmStarted) and e.attempt == n for e in evs) == 1
                return any(isinstance(e, VmRestartExhausted) for e in evs)

            await wait_until(decided, 30, f"restart decision {n}")
            if n < 3:
                await api.wait_state("r1", "running")
        kinds = [
            (type(e).__name__, getattr(e, "attempt", None))
            for e in await events_of(store, "r1")
            if isinstance(e, VmStarted | VmExited | VmRestartScheduled | VmRestartExhausted)
        ]
        assert kinds == [
            ("VmStarted", 0), ("VmExited", None), ("VmRestartScheduled", 1), ("VmStarted", 1),
            ("VmExited", None), ("VmRestartScheduled", 2), ("VmStarted", 2), ("VmExited", None),
            ("VmRestartExhausted", None),
        ]  # fmt: skip
        scheduled = [e for e in await events_of(store, "r1") if isinstance(e, VmRestartScheduled)]
        assert [e.delay_ms for e in scheduled] == [300, 600]
        assert (await api.state("r1"))["status"] == "exited"

        await api.ok("StartVm", {"id": "r1"})
        await api.wait_state("r1", "running")
        evs = await events_of(store, "r1")
        assert isinstance(evs[-1], VmStarted) or any(isinstance(e, VmStartRequested) for e in evs)
        last_start = [e for e in evs if isinstance(e, VmStarted)][-1]
        assert last_start.attempt == 0
