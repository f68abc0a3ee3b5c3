"""The VMM acts on the events it consumes at once; its poll is only the level-triggered net."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from pydstack.actors.runtime import RuntimeConfig
from pydstack.actors.vmm import running_vmm
from pydstack.adapters.nats import EventStore
from pydstack.adapters.ports import free_port
from pydstack.core.events import VmStarted, VmStopped

from .conftest import Api, VmmHost, events_of, wait_until

LONG_S = 120.0  # poll and reconcile: far longer than any wait below


async def test_scheduled_and_stop_requested_vms_are_acted_on_without_waiting_for_the_poll(
    vmm_host: VmmHost, store: EventStore
) -> None:
    """With a 120 s poll and reconcile, two VMs requested together both start within seconds
    (the second one's VmScheduled lands while the VMM is busy starting the first: it must not
    be folded away unplanned), and a shutdown of one is carried out within seconds too."""
    launch = vmm_host.launch()
    launch = dataclasses.replace(
        launch,
        config=dataclasses.replace(launch.config, poll_interval_s=LONG_S),
        runtime=RuntimeConfig(reconcile_interval_s=LONG_S),
    )
    async with running_vmm(store, launch) as (_, url):
        api = Api(url.url)
        await asyncio.sleep(0.5)  # past the runner's first reconcile: only events drive it now
        t0 = time.monotonic()
        await asyncio.gather(api.create("ev1", free_port()), api.create("ev2", free_port()))

        async def started() -> bool:
            got = [await events_of(store, v) for v in ("ev1", "ev2")]
            return all(any(isinstance(e, VmStarted) for e in evs) for evs in got)

        await wait_until(started, 20, "both VMs started")
        assert time.monotonic() - t0 < 20 < LONG_S

        t1 = time.monotonic()
        await api.ok("ShutdownVm", {"id": "ev1"})

        async def stopped() -> bool:
            return any(isinstance(e, VmStopped) for e in await events_of(store, "ev1"))

        await wait_until(stopped, 20, "ev1 stopped")
        assert time.monotonic() - t1 < 20 < LONG_S
        for vm in ("ev1", "ev2"):
            await api.ok("RemoveVm", {"id": vm})
