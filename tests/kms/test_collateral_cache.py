"""PCCS collateral (the `CollateralCache` the KMS and the gateway hold): fetched once per
platform and TTL, failures remembered briefly, bounded, never a cached verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pydstack.actors.kms.evidence import check_attestation
from pydstack.adapters.tdx.collateral import CollateralCache
from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.errors import CollateralError
from pydstack.adapters.tdx.pki import DevPki, PkiParams
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
    source = CollateralCache.pccs(pccs.url, ttl=600, clock=lambda: now[0])
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


async def test_failed_fetch_is_remembered_briefly(pki: DevPki, pccs: Pccs) -> None:
    """A PCCS outage fails the request with the PCCS's error; for `negative_ttl` seconds the
    platform's requests fail at once without reaching the PCCS; then it is fetched again."""
    now = [0.0]
    source = CollateralCache.pccs(pccs.url, ttl=600, negative_ttl=10, clock=lambda: now[0])
    quote = (await make_cvm(pki).attest(bytes(64))).quote
    pccs.up = False
    with pytest.raises(CollateralError, match="cannot fetch collateral"):
        await source(quote)
    hits = pccs.hits
    pccs.up = True
    now[0] = 9.0
    with pytest.raises(CollateralError, match="remembered"):
        await source(quote)
    assert (source.fetches, pccs.hits) == (1, hits)
    now[0] = 10.5
    assert await source(quote) is not None
    assert source.fetches == 2


async def test_platforms_are_bounded_and_garbage_is_not_kept(pki: DevPki) -> None:
    """At most `max_platforms` platforms stay (least recently used dropped); a quote that
    does not parse is refused before any fetch and takes no place."""
    calls: list[bytes] = []

    async def fetch(quote: bytes) -> object:
        calls.append(quote)
        return object()

    other = DevPki.generate(PkiParams(fmspc=bytes.fromhex("00A06F000000")))
    q1 = (await make_cvm(pki).attest(bytes(64))).quote
    q2 = (await make_cvm(other).attest(bytes(64))).quote
    source = CollateralCache(fetch, max_platforms=1)
    for _ in range(3):
        await source(q1)
    assert len(calls) == 1
    await source(q2)  # a second platform pushes the first out
    await source(q1)
    assert (len(calls), len(source)) == (3, 1)
    for n in range(50):
        with pytest.raises(CollateralError, match="FMSPC"):
            await source(b"garbage %d" % n)
    assert (len(calls), len(source)) == (3, 1)
