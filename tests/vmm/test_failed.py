"""Vmm.failed(): what `up` watches to rebuild its VMM in place (upkeep.KeptComponent)."""

from __future__ import annotations

import asyncio
import dataclasses

import nats.errors
import pytest

from pydstack.actors.vmm import running_vmm
from pydstack.adapters.nats import EventStore, NatsServer, StreamSettings
from pydstack.core.events import Signer

from .conftest import VmmHost


async def test_a_vmm_whose_log_connection_is_gone_reports_it_failed(
    vmm_host: VmmHost, nats_server: NatsServer, signer: Signer
) -> None:
    """The VMM's own connection closed for good (what a NATS outage longer than nats-py's
    reconnects leaves): its runner ends, and failed() says which part ended and why, while a
    healthy VMM's failed() has not returned."""
    own = await EventStore.connect(nats_server.url, signer,
                                   settings=StreamSettings(deny_delete=False))  # fmt: skip
    host = dataclasses.replace(vmm_host, store=own)
    with pytest.raises(nats.errors.ConnectionClosedError):  # closing re-raises its failure
        async with running_vmm(own, host.launch()) as (vmm, _):
            watch = asyncio.create_task(vmm.failed())
            await asyncio.sleep(1.0)
            assert not watch.done()  # running fine: nothing to report
            await own.nc.close()
            async with asyncio.timeout(30):
                reason = await watch
    assert reason.startswith(f"actor-{vmm.name} ended"), reason
    assert "connection closed" in reason
