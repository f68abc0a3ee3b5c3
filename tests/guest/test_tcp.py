"""The agent's loopback TCP listener: the dstack API of dstack.sock, for apps without a
Unix-socket client; but for Info and Version, only POST with a JSON body (an SSRF in an app
sends GET: tests/adversarial/test_agent_tcp_ssrf.py)."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from dstack_sdk import AsyncDstackClient

from pydstack.adapters.tdx.quote import parse_quote
from pydstack_guest import serve_agent

from .conftest import APP_ID, Guest
from .test_sdk import _verify


async def test_tcp_listener_serves_the_socket_api(guest: Guest) -> None:
    """The unchanged SDK over http://127.0.0.1:PORT gets a quote over its report_data that
    verifies; a plain POST of JSON (busybox wget --post-data) gets one too."""
    sock = guest.dstack_sock + ".tcp"
    async with serve_agent(guest.agent, dstack_sock=sock, tcp="127.0.0.1:0") as bound:
        assert bound is not None and bound.startswith("127.0.0.1:")
        assert not bound.endswith(":0")
        url = f"http://{bound}"
        async with AsyncDstackClient(url) as c:
            info = await c.info()
            r = await c.get_quote(b"over tcp")
        assert info.app_id == APP_ID.hex()
        assert _verify(guest, r.decode_quote(), r.event_log) == []
        assert parse_quote(r.decode_quote()).report.report_data == b"over tcp".ljust(64, b"\0")

        nonce = os.urandom(64)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/GetQuote", json={"report_data": nonce.hex()}) as resp:
                assert resp.status == 200
                body = await resp.json()
            async with s.post(f"{url}/GetQuote", json={"report_data": "zz"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["field"] == "report_data"
            async with s.post(f"{url}/GetTlsKey", json={"usage_ra_tls": "maybe"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["field"] == "usage_ra_tls"
            async with s.get(f"{url}/Info") as resp:  # public, as dstack's TCP listener
                assert resp.status == 200
        quote = bytes.fromhex(body["quote"])
        assert _verify(guest, quote, body["event_log"]) == []
        assert parse_quote(quote).report.report_data == nonce
    assert not await asyncio.to_thread(os.path.exists, sock)  # removed on exit


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("0.0.0.0:8090", "is not loopback"),
        ("10.0.0.2:8090", "is not loopback"),
        ("localhost:8090", "is not loopback"),  # a name could resolve anywhere
        ("127.0.0.1", "must be host:port"),
        ("127.0.0.1:70000", "must be host:port"),
    ],
)
async def test_non_loopback_address_is_refused(guest: Guest, address: str, message: str) -> None:
    """The TCP listener hands out app keys: it never binds beyond loopback."""
    sock = guest.dstack_sock + ".tcp"
    with pytest.raises(ValueError, match=message):
        async with serve_agent(guest.agent, dstack_sock=sock, tcp=address):
            pass
    assert not await asyncio.to_thread(os.path.exists, sock)  # removed on exit
