"""The KMS's PCCS collateral: fetched once per platform and TTL, never a cached verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pydstack.actors.kms.evidence import check_attestation
from pydstack.actors.kms.launch import _Collateral
from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.errors import CollateralError
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.verify import Policy

from .conftest import make_cvm


class Pccs:
    def __init__(self) -> None:
        self.url = ""
        self.hits = 0
        self.up = True


@pytest.fixture
async def pccs(pki: DevPki) -> AsyncIterator[Pccs]:
    box = Pccs()

    @web.middleware
    async def count(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        box.hits += 1
        if not box.up:
            return web.Response(status=503, text="down")
        return await handler(request)

    app = devpccs_app(pki, now=lambda: int(time.time()))
    app.middlewares.append(count)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    box.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield box
    finally:
        await runner.cleanup()


async def test_collateral_fetched_once_per_platform_and_ttl(pki: DevPki, pccs: Pccs) -> None:
    """Concurrent and repeated requests from one platform share one PCCS fetch; after the TTL
    it is fetched again. Every quote is still verified in full against it."""
    now = [0.0]
    source = _Collateral(pccs.url, None, ttl=600, clock=lambda: now[0])
    atts = [await make_cvm(pki, instance_id=bytes([i]) * 20).attest(bytes(64)) for i in (1, 2)]
    colls = await asyncio.gather(*(source(a.quote) for a in atts * 3))
    assert source.fetches == 1 and pccs.hits > 0
    hits = pccs.hits
    for att, coll in zip(atts, colls, strict=False):
        ev = check_attestation(
            att, coll, policy=Policy(), now=int(time.time()), root_ca_der=pki.root_der
        )
        assert ev.boot is not None and not ev.reasons, ev.reasons
    bad = check_attestation(
        atts[0], colls[0], policy=Policy(), now=int(time.time()), root_ca_der=None
    )
    assert bad.reasons  # the collateral is shared, the verification is not: wrong root refused
    now[0] = 599.0
    await source(atts[0].quote)
    assert (source.fetches, pccs.hits) == (1, hits)
    now[0] = 601.0
    await source(atts[0].quote)
    assert source.fetches == 2 and pccs.hits > hits


async def test_failed_fetch_is_not_kept(pki: DevPki, pccs: Pccs) -> None:
    """A PCCS outage fails the request with the PCCS's error; the next request fetches again."""
    source = _Collateral(pccs.url, None, ttl=600)
    quote = (await make_cvm(pki).attest(bytes(64))).quote
    pccs.up = False
    with pytest.raises(CollateralError, match="cannot fetch collateral"):
        await source(quote)
    pccs.up = True
    assert await source(quote) is not None
    assert source.fetches == 2
