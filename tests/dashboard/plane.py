"""The control plane the dashboard tests run against (no browser needed): a real nats-server
(tests/conftest.py), the scheduler actor and the dashboard on a free loopback port; and how a
client other than the page writes to it (its Origin and the CSRF token from the page)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.dashboard import Dashboard, DashboardConfig, DevEnvKey
from pydstack.adapters.nats import NEW, EventStore, NatsServer, StreamSettings
from pydstack.core.events import HostJoined, Signer, subject

_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@dataclass
class Plane:
    dash: Dashboard
    store: EventStore  # a test writer with its own identity
    operator: EventStore  # the dashboard's own connection (its commands sign as "operator")
    dev_key: DevEnvKey

    @property
    def url(self) -> str:
        return self.dash.url


async def connect(server: NatsServer, actor: str) -> EventStore:
    signer = Signer.from_private_bytes(actor, os.urandom(32))
    return await EventStore.connect(server.url, signer, settings=StreamSettings(deny_delete=False))


@pytest.fixture
async def plane(nats_server: NatsServer, store: EventStore, tmp_path: Path) -> AsyncIterator[Plane]:
    """Host h1 joined (public port maps allowed: the deploy form's tests map 0.0.0.0), the
    scheduler running, the dashboard caught up."""
    joined = HostJoined(host_id="h1", vcpu=8, memory_mb=16384, address="10.1.0.1",
                        public_ports=True)  # fmt: skip
    await store.append(subject("host", "h1"), [joined], NEW)
    sched = await connect(nats_server, "scheduler")
    operator = await connect(nats_server, "operator")
    key_file = tmp_path / "dev-env.key"
    runtime = RuntimeConfig(reconcile_interval_s=1.0, fetch_timeout_s=0.2)
    try:
        async with ActorRunner(sched, Scheduler(sched, SchedulerConfig()), runtime):
            cfg = DashboardConfig(port=0, dev_env_key=key_file)
            async with await Dashboard.create(operator, cfg) as dash:
                await dash.follower.ready.wait()
                yield Plane(dash, store, operator, DevEnvKey.load_or_create(key_file))
    finally:
        await operator.close()
        await sched.close()


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def page_headers(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """What the dashboard's own page sends on a write: its Origin and the CSRF token it read
    from the page's <meta name="csrf-token">."""
    async with session.get(url) as r:
        found = _META.search(await r.text())
    assert found is not None, "the page has no CSRF token"
    return {"Origin": origin_of(url), "X-CSRF-Token": found.group(1)}
