"""GetMeta's chain fields as dstack v0.5.11 fills them (issue 16 item 7).

v0.5.11 `kms/src/main_service.rs` `get_meta` takes them from `AuthApi::get_info`: a webhook's
`GET <url>` (`AuthApiInfoResponse`: kmsContractAddr, chainId, gatewayAppId,
appImplementation), the dev backend's gateway app id with the rest `None`. The eth backend's
are in `tests/eth/test_kms_meta.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from pydstack.actors.kms import DevBackend, WebhookBackend
from pydstack.actors.kms.backends import MAX_INFO, chain_meta

from .conftest import Kms

NULLS = {
    "gateway_app_id": None,
    "kms_contract_address": None,
    "chain_id": None,
    "app_auth_implementation": None,
}
# what dstack's auth-eth answers on GET / (kms/auth-eth/src/server.ts)
AUTH_ETH_INFO = {
    "status": "ok",
    "kmsContractAddr": "0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0",
    "ethRpcUrl": "http://localhost:8545",
    "gatewayAppId": "0x6f8d4fa2c9c1b0a3e5d7f9a1b3c5d7e9f1a3b5c7",
    "chainId": 31337,
    "appAuthImplementation": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    "appImplementation": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
}


@pytest.fixture
async def info_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """An auth API whose `GET /` answers `state["body"]` (bytes as they are)."""
    state: dict[str, Any] = {"body": AUTH_ETH_INFO}

    async def info(request: web.Request) -> web.Response:
        body = state["body"]
        if isinstance(body, bytes):
            return web.Response(body=body, content_type="application/json")
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", state
    await runner.cleanup()


async def test_get_meta_takes_the_webhooks_info(
    kms: Kms, info_server: tuple[str, dict[str, Any]]
) -> None:
    """A webhook-backed KMS's GetMeta carries what the auth API's GET / names."""
    url, _ = info_server
    own = kms.svc.backend
    kms.svc.backend = WebhookBackend(url)
    try:
        async with kms.client() as c:
            meta = await c.call("GetMeta")
    finally:
        await kms.svc.backend.close()
        kms.svc.backend = own
    assert meta["kms_contract_address"] == AUTH_ETH_INFO["kmsContractAddr"]
    assert meta["chain_id"] == 31337
    assert meta["gateway_app_id"] == AUTH_ETH_INFO["gatewayAppId"]
    assert meta["app_auth_implementation"] == AUTH_ETH_INFO["appImplementation"]
    assert meta["k256_pubkey"] == kms.svc.root.k256_public().hex()


async def test_get_meta_answers_with_nulls_when_the_auth_api_has_no_info(kms: Kms) -> None:
    """The test webhook serves no GET /: GetMeta still answers, its chain fields null."""
    async with kms.client() as c:
        meta = await c.call("GetMeta")
    assert {k: meta[k] for k in NULLS} == NULLS
    assert meta["ca_cert"] == kms.svc.created.ca_cert_pem


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b"{not json",
        b'{"chainId": "1", "gatewayAppId": "", "kmsContractAddr": "", "appImplementation": ""}',
        b'{"chainId": 1}',
        b'{"x": "' + b"a" * MAX_INFO + b'"}',
    ],
    ids=["not-object", "not-json", "chain-id-string", "missing", "oversize"],
)
async def test_hostile_webhook_info_is_never_taken(
    info_server: tuple[str, dict[str, Any]], body: bytes
) -> None:
    """Malformed, mistyped or oversize info: nulls, nothing invented."""
    url, state = info_server
    state["body"] = body
    async with WebhookBackend(url) as backend:
        assert await chain_meta(backend) == NULLS


async def test_dev_backend_names_its_gateway_app_only() -> None:
    """dstack's `AuthApi::Dev`: gateway_app_id set, the chain fields None."""
    dev = DevBackend(enabled=True, gateway_app_id="gw-dev")
    assert await chain_meta(dev) == NULLS | {"gateway_app_id": "gw-dev"}
