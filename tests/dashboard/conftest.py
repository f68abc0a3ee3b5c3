"""A control plane for the dashboard (plane.py: real nats-server, the scheduler actor, the
dashboard on a free loopback port), and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

from tests.kms.conftest import kms, pki, webhook  # noqa: F401  # a real KMS for test_kms_and_up

from .plane import Plane, plane  # noqa: F401  # the fixture, and its type for the tests
from .support import CHROMIUM, FLAGS, fresh_profile

if not Path(CHROMIUM).exists():  # `make test` installs it (DEB_PACKAGES)
    pytest.skip("Debian chromium is not installed", allow_module_level=True)


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
