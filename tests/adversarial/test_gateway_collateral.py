"""RegisterCvm verifies each CVM's quote; every registration brings a new certificate, so the
verifier's per-certificate cache never hits, and the gateway fetched quote collateral from the
PCCS once per request: a registration flood became a PCCS flood (and every registration waited
on a PCS round trip). The gateway's verifier keeps collateral per platform (FMSPC + PCK CA),
as the KMS does, and remembers a failed fetch briefly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.node_launch import RegistrationLaunch, _verifier
from pydstack.actors.gateway.registration import (
    PATH,
    RegistrationConfig,
    registration_app,
    serve_registration,
)
from pydstack.adapters.nats import EventStore, free_port
from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls_tls import client_ssl_context, server_ssl_context
from pydstack.core.events import GatewayNodeJoined
from tests.gateway.given import key
from tests.gateway.simcvm import DevCa, SimCvm

N = 12


@dataclass
class Pccs:
    url: str = ""
    hits: int = 0
    up: bool = True


@pytest.fixture
async def pccs(tmp_path: Path) -> AsyncIterator[tuple[Pccs, DevPki]]:
    """A PCCS serving a dev PKI's collateral, counting every request it gets."""
    pki = DevPki.generate()
    pki.save(tmp_path / "dev-pki")
    box = Pccs()

    @web.middleware
    async def count(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        box.hits += 1
        return await handler(request) if box.up else web.Response(status=503)

    app = devpccs_app(pki, now=lambda: int(time.time()))
    app.middlewares.append(count)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    box.url = f"http://127.0.0.1:{port}"
    try:
        yield box, pki
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _gateway(
    store: EventStore, pccs: tuple[Pccs, DevPki], tmp: Path
) -> AsyncIterator[tuple[str, DevCa]]:
    """A gateway node's RegisterCvm endpoint whose verifier fetches collateral from the
    PCCS: its URL, and the CA the CVMs' client certificates chain to."""
    box, pki = pccs
    ca = DevCa.create()
    launch = RegistrationLaunch("", "", ca.pem, dev_pki=str(tmp / "dev-pki"),
                                pccs_url=box.url)  # fmt: skip
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    await registrar.join(GatewayNodeJoined(
        node_id="gw1", wg_public_key=key(501), tunnel_ip="10.0.0.129",
        endpoint="192.0.2.1:51820", base_domain="gw.example.com", url="https://gw1:8011",
    ))  # fmt: skip
    app = registration_app(registrar, _verifier(launch), RegistrationConfig(node_id="gw1"))
    chain, key_pem = await SimCvm(pki, bytes(20), b"\xee" * 20, b"gateway").identity(ca)
    port = free_port()
    runner = await serve_registration(
        app, "127.0.0.1", port, server_ssl_context(chain, key_pem, ca.pem)
    )
    try:
        yield f"https://127.0.0.1:{port}", ca
    finally:
        await runner.cleanup()
        await registrar.aclose()


async def _register(url: str, ca: DevCa, identity: tuple[str, str], n: int) -> int:
    ssl = client_ssl_context(identity[0], identity[1], ca.pem)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as s:
        body = json.dumps({"client_public_key": key(n)})
        async with s.post(url + PATH, data=body) as resp:
            return resp.status


async def test_registrations_of_one_platform_fetch_collateral_once(
    store: EventStore, pccs: tuple[Pccs, DevPki], tmp_path: Path
) -> None:
    """N CVMs of one platform register, concurrently and then one by one: all are admitted
    and the PCCS serves the collateral of a single fetch."""
    box, pki = pccs
    async with _gateway(store, pccs, tmp_path) as (url, ca):
        # instance ids never equal the app id (0x0a * 20): one id is an app or an instance
        cvms = [
            SimCvm(pki, bytes([0xA]) * 20, bytes([0x40 + n]) * 20, b"compose a") for n in range(N)
        ]
        ids = [await c.identity(ca) for c in cvms]
        assert await _register(url, ca, ids[0], 0) == 200
        one_fetch = box.hits
        assert one_fetch > 0
        half = N // 2
        statuses = await asyncio.gather(*(_register(url, ca, ids[n], n) for n in range(1, half)))
        statuses += [await _register(url, ca, ids[n], n) for n in range(half, N)]
        assert statuses == [200] * (N - 1)
        assert box.hits == one_fetch, f"{box.hits} PCCS requests for {N} registrations"


async def test_a_pccs_outage_is_not_hammered(
    store: EventStore, pccs: tuple[Pccs, DevPki], tmp_path: Path
) -> None:
    """While the PCCS fails, a burst of registrations is refused at once and reaches the PCCS
    only for the first (the failure is remembered for a few seconds)."""
    box, pki = pccs
    async with _gateway(store, pccs, tmp_path) as (url, ca):
        box.up = False
        cvm = SimCvm(pki, bytes([0xA]) * 20, b"\x01" * 20, b"compose a")
        assert await _register(url, ca, await cvm.identity(ca), 1) == 403
        first = box.hits
        for n in range(2, N):
            other = SimCvm(pki, bytes([0xA]) * 20, bytes([n]) * 20, b"compose a")
            assert await _register(url, ca, await other.identity(ca), n) == 403
        assert box.hits == first
