"""An SSRF in an app container reaches the guest agent's loopback TCP listener with a GET and
the attacker's query string (a URL fetcher, a followed redirect). On that listener key, quote
and measurement methods answer only POST with ``Content-Type: application/json``."""

from __future__ import annotations

import aiohttp
import pytest

from pydstack_guest import serve_agent
from tests.guest.conftest import Guest, dev_pki, guest, sock_dir

__all__ = ["dev_pki", "guest", "sock_dir"]  # the guest suite's fixtures

GUARDED = ("GetKey", "GetTlsKey", "Sign", "GetQuote", "Attest", "EmitEvent")


@pytest.mark.parametrize("method", GUARDED)
async def test_get_with_query_is_refused(guest: Guest, method: str) -> None:
    """GET /GetKey?path=... (what an SSRF sends) is 405 naming POST; no key is in the answer."""
    async with serve_agent(
        guest.agent, dstack_sock=guest.dstack_sock + ".t", tcp="127.0.0.1:0"
    ) as bound:
        args = {
            "path": "wallet",
            "purpose": "signing",
            "report_data": "ab",
            "algorithm": "secp256k1",
            "data": "ab",
            "event": "x",
            "payload": "ab",
        }
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{bound}/{method}", params=args) as resp:
                assert resp.status == 405, await resp.text()
                assert resp.headers["Allow"] == "POST"
                body = await resp.json()
        assert "POST" in body["error"] and set(body) == {"error", "field"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_post_without_json_content_type_is_refused(guest: Guest, content_type: str) -> None:
    """A POST a browser or a form could send without a preflight (no JSON type) is 415."""
    async with serve_agent(
        guest.agent, dstack_sock=guest.dstack_sock + ".t", tcp="127.0.0.1:0"
    ) as bound:
        headers = {"Content-Type": content_type} if content_type else {}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{bound}/GetKey", data=b'{"path":"wallet"}',
                              headers=headers) as resp:  # fmt: skip
                assert resp.status == 415, await resp.text()
                assert "key" not in await resp.json()


async def test_post_json_gets_the_key(guest: Guest) -> None:
    """The legitimate call (POST, JSON) gets the same key as over dstack.sock; Info stays GET."""
    async with serve_agent(
        guest.agent, dstack_sock=guest.dstack_sock + ".t", tcp="127.0.0.1:0"
    ) as bound:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{bound}/GetKey", json={"path": "wallet"}) as resp:
                assert resp.status == 200
                key = (await resp.json())["key"]
            async with s.get(f"http://{bound}/Info") as resp:
                assert resp.status == 200
    assert key == guest.agent.get_key("wallet", "", "")["key"]


async def test_unix_socket_keeps_get(guest: Guest) -> None:
    """dstack.sock (not reachable by an HTTP SSRF) keeps dstack's prpc GET with a query."""
    conn = aiohttp.UnixConnector(path=guest.dstack_sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get("http://dstack/GetKey", params={"path": "wallet"}) as resp:
            assert resp.status == 200
