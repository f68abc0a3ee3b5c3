"""Creating a replicated stream while the cluster is still forming waits for it, within a deadline.

`up --join` and a freshly started cluster race the JetStream meta group: a meta leader that has
not heard from enough peers refuses placement ("no suitable peers"). `ensure_stream` must ride
that out, and say clearly what is missing when the peers never come.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pydstack.adapters.nats import EventStore, NatsCluster, StoreError, StreamSettings
from pydstack.core.events import Signer

pytestmark = pytest.mark.slow


def _signer() -> Signer:
    return Signer.from_private_bytes("forming", os.urandom(32))


async def _two_of_three(tmp_path: Path) -> NatsCluster:
    cluster = NatsCluster.create(tmp_path / "c", size=3)
    await asyncio.gather(cluster.nodes[0].start(), cluster.nodes[1].start())
    await cluster.wait_ready()  # waits for the two live nodes only
    return cluster


async def test_r3_stream_waits_for_the_third_peer(tmp_path: Path) -> None:
    cluster = await _two_of_three(tmp_path)
    try:
        assert cluster.meta_peers_current() == 2
        store = await EventStore.connect(
            cluster.urls[0], _signer(), settings=StreamSettings(name="FORM", replicas=3)
        )
        async with store:
            creating = asyncio.create_task(store.ensure_stream(placement_timeout=30))
            await asyncio.sleep(1.0)
            assert not creating.done(), "an R3 stream cannot be placed on two peers"
            await cluster.nodes[2].start()
            await asyncio.wait_for(creating, timeout=30)
            info = await store.js.stream_info("FORM")
            assert info.config.num_replicas == 3
            await store.ensure_stream()  # idempotent once it exists
        await cluster.wait_ready()
        assert cluster.meta_peers_current() == 3
    finally:
        await cluster.stop()


async def test_r3_stream_without_enough_peers_fails_with_a_clear_error(tmp_path: Path) -> None:
    cluster = await _two_of_three(tmp_path)
    try:
        store = await EventStore.connect(
            cluster.urls[0], _signer(), settings=StreamSettings(name="FORM", replicas=3)
        )
        async with store:
            with pytest.raises(StoreError) as err:
                await store.ensure_stream(placement_timeout=2)
        message = str(err.value)
        assert "'FORM'" in message and "3 replicas" in message
        assert "\n" not in message
    finally:
        await cluster.stop()
