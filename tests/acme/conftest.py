"""Real pebble + pebble-challtestsrv per test, and gateway nodes that keep certificates;
or pebble validating against a real Knot DNS server (``knot``, ``knot_pebble``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.actors.gateway.certs import CertKeeper, CertKeeperConfig
from pydstack.adapters.acme import ChallTestSrvDns
from pydstack.adapters.nats import EventStore, NatsServer, StreamSettings
from pydstack.core.events import Signer
from pydstack.core.gateway.certs import RenewalPolicy
from pydstack.core.gateway.sealing import ClusterKey

from .knot import Knot, missing_knot, running_knot
from .pebble import Pebble, missing_binaries, running_pebble

CLUSTER = "c1"
VALIDITY_S = 3600  # pebble's certificate lifetime in these tests
FRESH = RenewalPolicy(renew_before_s=60)  # a new certificate is far from its window
DUE = RenewalPolicy(renew_before_s=VALIDITY_S + 60)  # any certificate is inside its window


@pytest.fixture
async def pebble(tmp_path: Path) -> AsyncIterator[Pebble]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package pebble; make sysdeps)")
    async with running_pebble(tmp_path / "pebble", validity_s=VALIDITY_S) as p:
        yield p


@pytest.fixture
async def knot(tmp_path: Path) -> AsyncIterator[Knot]:
    if missing_knot():  # a dependency of the project (Makefile DEB_PACKAGES): fail, never skip
        pytest.fail("knotd not installed: run `make sysdeps` (Debian package knot)")
    async with running_knot(tmp_path / "knot") as k:
        yield k


@pytest.fixture
async def knot_pebble(tmp_path: Path, knot: Knot) -> AsyncIterator[Pebble]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package pebble; make sysdeps)")
    async with running_pebble(
        tmp_path / "pebble", validity_s=VALIDITY_S, dns_server=knot.address
    ) as p:
        yield p


@pytest.fixture
def cluster_key() -> ClusterKey:
    return ClusterKey.derive(os.urandom(32), CLUSTER)


class Nodes:
    """Gateway nodes on one NATS server: each its own connection, signer and keeper."""

    def __init__(self, nats: NatsServer, pebble: Pebble, stack: contextlib.AsyncExitStack):
        self.nats, self.pebble, self.stack = nats, pebble, stack

    async def store(self, name: str) -> EventStore:
        signer = Signer.from_private_bytes(name, os.urandom(32))
        settings = StreamSettings(deny_delete=False)
        store = await EventStore.connect(self.nats.url, signer, settings=settings)
        await self.stack.enter_async_context(store)
        await store.ensure_stream()
        return store

    async def node(
        self,
        name: str,
        key: ClusterKey,
        policy: RenewalPolicy = FRESH,
        *,
        order_timeout_s: float = 120.0,
    ) -> CertKeeper:
        config = CertKeeperConfig(
            cluster=CLUSTER,
            node_id=name,
            policy=policy,
            ca_bundle=self.pebble.ca_bundle,
            order_timeout_s=order_timeout_s,
        )
        dns = ChallTestSrvDns(self.pebble.challtestsrv_url)
        return CertKeeper(await self.store(name), key, config, {"": dns})


@pytest.fixture
async def nodes(nats_server: NatsServer, pebble: Pebble) -> AsyncIterator[Nodes]:
    async with contextlib.AsyncExitStack() as stack:
        yield Nodes(nats_server, pebble, stack)
