"""RegisterCvm end to end: simulated CVMs, real mutual TLS sockets, real nats-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.registration import (
    PATH,
    RegistrationConfig,
    registration_app,
    serve_registration,
)
from pydstack.adapters.nats import EventStore, free_port
from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert, extract_attestation
from pydstack.adapters.tdx.ratls_tls import (
    RaTlsConnector,
    RaTlsVerifier,
    client_ssl_context,
    server_ssl_context,
)
from pydstack.core.events import (
    CvmRegistered,
    CvmRegistrationRefused,
    GatewayNodeJoined,
    TunnelIpAllocated,
    decode_body,
    open_envelope,
)

from .given import key
from .simcvm import DevCa, SimCvm, key_pem, pem

APP_A, APP_B, DENIED = bytes([0xA] * 20), bytes([0xB] * 20), bytes([0xD] * 20)


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.generate()


@dataclass
class Gateway:
    url: str
    store: EventStore
    ca: DevCa
    pki: DevPki
    verifier: RaTlsVerifier
    webhook_calls: list[dict[str, Any]]

    async def post(self, identity: tuple[str, str], body: object) -> tuple[int, Any]:
        ssl = client_ssl_context(identity[0], identity[1], self.ca.pem)
        conn = RaTlsConnector(self.verifier, ssl=ssl)
        async with aiohttp.ClientSession(connector=conn) as s:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(self.url + PATH, data=data) as resp:
                return resp.status, await resp.json()

    async def events(self) -> list[tuple[str, object]]:
        return [(r.subject, decode_body(open_envelope(r.data))) async for r in self.store.read()]

    def cvm(self, app_id: bytes, n: int) -> SimCvm:
        return SimCvm(self.pki, app_id, bytes([n]) * 20, b"compose of " + app_id)


async def _webhook(calls: list[dict[str, Any]]) -> tuple[web.AppRunner, str]:
    async def auth(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        return web.Response(status=403 if body["app_id"] == DENIED.hex() else 200)

    app = web.Application()
    app.router.add_post("/app-auth", auth)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/app-auth"


def _dev_verifier(pki: DevPki) -> RaTlsVerifier:
    """Trusts quotes of the dev PKI, with collateral it signs as of now."""
    collateral = collateral_from_json(pki.collateral_json(int(time.time())))

    async def source(_quote: bytes) -> Collateral:
        return collateral

    return RaTlsVerifier(source, root_ca_der=pki.root_der)


async def _serve(app: web.Application, pki: DevPki, ca: DevCa) -> tuple[web.AppRunner, int]:
    """Serve ``app`` with mutual TLS as a gateway (its own RA-TLS identity under ``ca``)."""
    gw_identity = await SimCvm(pki, bytes(20), bytes([0xEE]) * 20, b"gateway").identity(ca)
    port = free_port()
    runner = await serve_registration(
        app, "127.0.0.1", port, server_ssl_context(gw_identity[0], gw_identity[1], ca.pem)
    )
    return runner, port


@pytest.fixture
async def gateway(store: EventStore, pki: DevPki) -> AsyncIterator[Gateway]:
    verifier = _dev_verifier(pki)
    ca = DevCa.create()
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    for n in (1, 2):
        node = GatewayNodeJoined(
            node_id=f"gw{n}",
            wg_public_key=key(500 + n),
            tunnel_ip=f"10.0.0.{128 + n}",
            endpoint=f"192.0.2.{n}:51820",
            base_domain="gw.example.com",
            url=f"https://gw{n}:8011",
        )
        assert await registrar.join(node) == node
    calls: list[dict[str, Any]] = []
    hook, hook_url = await _webhook(calls)
    app = registration_app(
        registrar, verifier, RegistrationConfig(node_id="gw1", auth_webhook=hook_url)
    )
    runner, port = await _serve(app, pki, ca)
    try:
        yield Gateway(f"https://127.0.0.1:{port}", store, ca, pki, verifier, calls)
    finally:
        await runner.cleanup()
        await hook.cleanup()
        await registrar.aclose()


@pytest.mark.timeout(60)
async def test_register_and_reregister(gateway: Gateway) -> None:
    """An attested CVM gets the lowest free address and every node as a peer; identity comes
    from its event log; booting again keeps the address."""
    cvm = gateway.cvm(APP_A, 1)
    identity = await cvm.identity(gateway.ca)
    body = {
        "client_public_key": key(1),
        "port_policy": {"ports": [{"port": 443, "pp": True}], "restrict_mode": True},
    }
    status, out = await gateway.post(identity, body)
    assert status == 200, out
    assert out["wg"]["client_ip"] == "10.0.0.2"
    assert out["wg"]["servers"] == [
        {"pk": key(501), "ip": "10.0.0.129", "endpoint": "192.0.2.1:51820"},
        {"pk": key(502), "ip": "10.0.0.130", "endpoint": "192.0.2.2:51820"},
    ]
    assert [g["node_id"] for g in out["gateways"]] == ["gw1", "gw2"]
    assert out["agent"]["domain"] == "gw.example.com"
    assert gateway.webhook_calls[-1]["app_id"] == APP_A.hex()
    events = await gateway.events()
    (reg,) = [e for s, e in events if isinstance(e, CvmRegistered)]
    assert events[-1][0] == f"dstack.cvm.{cvm.instance_id.hex()}"
    assert (reg.app_id, reg.instance_id, reg.compose_hash) == (
        APP_A.hex(),
        cvm.instance_id.hex(),
        cvm.compose_hash.hex(),
    )
    assert reg.port_policy == "restrict" and [(p.port, p.pp) for p in reg.ports] == [(443, True)]
    assert len(reg.attestation_hash) == 64
    status, again = await gateway.post(
        await cvm.identity(gateway.ca), {"client_public_key": key(1)}
    )
    assert status == 200 and again["wg"]["client_ip"] == "10.0.0.2"
    ledger = [e for _, e in await gateway.events() if isinstance(e, TunnelIpAllocated)]
    assert [e.tunnel_ip for e in ledger] == ["10.0.0.2", "10.0.0.2"]


@pytest.mark.timeout(60)
async def test_refusals_are_clear_and_recorded(gateway: Gateway) -> None:
    a = gateway.cvm(APP_A, 1)
    assert (await gateway.post(await a.identity(gateway.ca), {"client_public_key": key(1)}))[
        0
    ] == 200
    cases = [  # (cvm, body, status, code)
        (gateway.cvm(APP_A, 2), {"client_public_key": "AAAA"}, 400, "bad_key"),
        (gateway.cvm(APP_A, 3), {"client_public_key": key(1)}, 409, "key_in_use"),
        (gateway.cvm(APP_B, 1), {"client_public_key": key(9)}, 409, "app_mismatch"),
        (gateway.cvm(DENIED, 4), {"client_public_key": key(4)}, 403, "unauthorized"),
        (gateway.cvm(APP_A, 5), b"{not json", 400, "bad_request"),
        (gateway.cvm(APP_A, 6), {"client_public_key": key(6), "extra": 1}, 400, "bad_request"),
        (
            gateway.cvm(APP_A, 7),
            {"client_public_key": key(7), "port_policy": {"ports": [{"port": 0}]}},
            400,
            "bad_request",
        ),
    ]
    for cvm, body, want_status, code in cases:
        status, out = await gateway.post(await cvm.identity(gateway.ca), body)
        assert (status, out["code"]) == (want_status, code), out
        assert out["error"]
    refused = [(s, e) for s, e in await gateway.events() if isinstance(e, CvmRegistrationRefused)]
    assert [(s, e.code) for s, e in refused] == [
        (f"dstack.cvm.{cvm.instance_id.hex()}", code) for cvm, _, _, code in cases
    ]
    assert refused[2][1].app_id == APP_B.hex()  # the attested app, not the one bound before


@pytest.mark.timeout(60)
async def test_callers_without_valid_evidence_get_403_and_leave_no_trace(gateway: Gateway) -> None:
    before = await gateway.store.last_seq()
    status, out = await gateway.post(gateway.ca.plain_identity(), {"client_public_key": key(1)})
    assert status == 403 and "no RA-TLS attestation" in " ".join(out["reasons"])
    # evidence lifted from a real CVM's certificate into a certificate for another key
    chain, _ = await gateway.cvm(APP_A, 1).identity(gateway.ca)
    stolen = extract_attestation(x509.load_pem_x509_certificate(chain.encode()))
    thief = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    forged = build_ratls_cert(
        thief,
        stolen,
        subject="thief",
        issuer=(gateway.ca.cert, gateway.ca.key),
        usage_client_auth=True,
        not_before=now - 60,
        not_after=now + 600,
    )
    status, out = await gateway.post(
        (pem(forged) + gateway.ca.pem, key_pem(thief)), {"client_public_key": key(1)}
    )
    assert status == 403 and "does not bind the certificate key" in " ".join(out["reasons"])
    assert await gateway.store.last_seq() == before


@pytest.mark.timeout(60)
async def test_the_answer_waits_until_the_node_holds_the_peer(
    store: EventStore, pki: DevPki
) -> None:
    """RegisterCvm answers only once the registering node's device holds the new peer (so the
    CVM's first handshake is not dropped); a node that never gets there still answers."""
    verifier = _dev_verifier(pki)
    ca = DevCa.create()
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    node = GatewayNodeJoined(node_id="gw1", wg_public_key=key(501), tunnel_ip="10.0.0.129",
                             endpoint="192.0.2.1:51820", base_domain="gw.example.com")  # fmt: skip
    assert await registrar.join(node) == node
    asked: list[tuple[str, float]] = []
    held = asyncio.Event()

    async def peer_applied(public_key: str) -> bool:
        asked.append((public_key, time.monotonic()))
        if public_key == key(2):
            return False  # this node never applies it (bounded wait ran out)
        await held.wait()
        return True

    app = registration_app(registrar, verifier, RegistrationConfig(node_id="gw1"),
                           peer_applied=peer_applied)  # fmt: skip
    runner, port = await _serve(app, pki, ca)
    gateway = Gateway(f"https://127.0.0.1:{port}", store, ca, pki, verifier, [])
    try:
        posting = asyncio.create_task(
            gateway.post(await gateway.cvm(APP_A, 1).identity(ca), {"client_public_key": key(1)})
        )
        for _ in range(200):
            if asked:
                break
            await asyncio.sleep(0.01)
        assert asked and asked[0][0] == key(1)
        await asyncio.sleep(0.3)
        assert not posting.done(), "answered before the node held the peer"
        held.set()
        status, out = await posting
        assert status == 200 and out["wg"]["client_ip"] == "10.0.0.2"
        status, out = await gateway.post(
            await gateway.cvm(APP_A, 2).identity(ca), {"client_public_key": key(2)}
        )
        assert status == 200 and out["wg"]["client_ip"] == "10.0.0.3"
    finally:
        await runner.cleanup()
        await registrar.aclose()
