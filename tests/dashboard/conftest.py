"""A control plane for the dashboard: real nats-server (tests/conftest.py), the scheduler actor,
the dashboard on a free loopback port, and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.dashboard import Dashboard, DashboardConfig, DevEnvKey
from pydstack.adapters.nats import NEW, EventStore, NatsServer, StreamSettings
from pydstack.core.events import HostJoined, Signer, subject
from tests.kms.conftest import kms, pki, webhook  # noqa: F401  # a real KMS for test_kms_and_up

from .support import CHROMIUM, FLAGS, fresh_profile

if not Path(CHROMIUM).exists():  # `make test` installs it (DEB_PACKAGES)
    pytest.skip("Debian chromium is not installed", allow_module_level=True)


@dataclass
class Plane:
    dash: Dashboard
    store: EventStore  # a test writer with its own identity
    operator: EventStore  # the dashboard's own connection (its commands sign as "operator")
    dev_key: DevEnvKey

    @property
    def url(self) -> str:
        return self.dash.url


async def _connect(server: NatsServer, actor: str) -> EventStore:
    signer = Signer.from_private_bytes(actor, os.urandom(32))
    return await EventStore.connect(server.url, signer, settings=StreamSettings(deny_delete=False))


@pytest.fixture
async def plane(nats_server: NatsServer, store: EventStore, tmp_path: Path) -> AsyncIterator[Plane]:
    """Host h1 joined, the scheduler running, the dashboard caught up."""
    await store.append(subject("host", "h1"), [HostJoined(host_id="h1", vcpu=8, memory_mb=16384,
                                                          address="10.1.0.1")], NEW)  # fmt: skip
    sched = await _connect(nats_server, "scheduler")
    operator = await _connect(nats_server, "operator")
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


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Debian's chromium (never a downloaded one), headless, with a fresh profile."""
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(fresh_profile(tmp_path)), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            yield ctx
        finally:
            await ctx.close()
