"""deploy's reachability check against a real TLS server on loopback: it connects to the given
address with the app's name as SNI, retries a 5xx until a good answer, and gives up at the
deadline naming the last failure."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from pydstack.actors.gateway.up_launch import _leaf, dev_ca
from pydstack.cli._reach import wait_reachable

NAME = "abc-8080.gw.localhost"


@asynccontextmanager
async def tls_server(statuses: list[int], seen: list[str]) -> AsyncIterator[tuple[int, str]]:
    """Answers each request with the next status (the last one repeats); yields (port, CA)."""
    with tempfile.TemporaryDirectory() as d:
        ca = dev_ca(Path(d))
        chain, key = _leaf(ca, ["*.gw.localhost"], [])
        (Path(d) / "c.pem").write_bytes(chain)
        (Path(d) / "k.pem").write_bytes(key)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
        ca_pem = ca[0].public_bytes(Encoding.PEM).decode()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[1].decode())  # the Host header
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    async with server:
        yield server.sockets[0].getsockname()[1], ca_pem


async def test_a_5xx_is_retried_until_the_app_answers() -> None:
    seen: list[str] = []
    async with tls_server([502, 503, 200], seen) as (port, ca):
        ok, detail = await wait_reachable(f"https://{NAME}:8443/", deadline=time.monotonic() + 10,
                                          connect_to=("127.0.0.1", port), ca_pem=ca)  # fmt: skip
    assert (ok, detail) == (True, "HTTP 200")
    assert seen == [f"Host: {NAME}:8443"] * 3


async def test_no_good_answer_by_the_deadline_names_the_last_failure() -> None:
    async with tls_server([502], []) as (port, ca):
        t0 = time.monotonic()
        ok, detail = await wait_reachable(f"https://{NAME}/", deadline=time.monotonic() + 1,
                                          connect_to=("127.0.0.1", port), ca_pem=ca)  # fmt: skip
    assert (ok, detail) == (False, "HTTP 502")
    assert time.monotonic() - t0 < 3


async def test_a_certificate_from_another_ca_is_not_reachable() -> None:
    async with tls_server([200], []) as (port, _):
        with tempfile.TemporaryDirectory() as d:
            other = dev_ca(Path(d))[0].public_bytes(Encoding.PEM).decode()
        ok, detail = await wait_reachable(f"https://{NAME}/", deadline=time.monotonic() + 0.5,
                                          connect_to=("127.0.0.1", port), ca_pem=other)  # fmt: skip
    assert ok is False and "CERTIFICATE_VERIFY_FAILED" in detail
