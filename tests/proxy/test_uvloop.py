"""The proxy under uvloop with connection churn (uvloop 0.23 aborts the whole process if a
relay passes half-close on with write_eof() under churn, so the proxy must not)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.core.gateway import Instance, RoutingTable
from pydstack.loop import run

from .support import Pki, backend_tls, client_hello, random_loopback, start_backend

uvloop = pytest.importorskip("uvloop")
BASE = "app.example.test"


async def _churn(n: int) -> tuple[int, bool, int]:
    pki, app_pki = Pki.create("gw"), Pki.create("app")
    ip = random_loopback()
    plain = await start_backend("plain", ip)
    tls = await start_backend(
        "tls", random_loopback(), plain.port, tls=backend_tls(app_pki.issue(f"*.{BASE}"))
    )
    now = time.time()
    table = RoutingTable.build(
        [Instance("p1", "pa", plain.ip, now), Instance("t1", "ta", tls.ip, now)], [BASE]
    )
    proxy = await ProxyServer.create(
        ProxyConfig(port=0), StaticCertProvider({BASE: pki.issue(f"*.{BASE}")}), table
    )
    hello = client_hello(f"p1-{plain.port}s.{BASE}")  # building one costs ~30 ms: reuse it
    ok = 0
    rng = random.Random(7)
    sem = asyncio.Semaphore(40)

    async def one(i: int) -> bool:
        async with sem:
            kind = rng.choice(["terminate", "passthrough", "abort", "half"])
            if kind == "terminate":
                r, w = await asyncio.open_connection(
                    "127.0.0.1",
                    proxy.port,
                    ssl=pki.client_context(),
                    server_hostname=f"p1-{plain.port}.{BASE}",
                )
                w.write(b"%d" % i)
                good = await r.read(100) == b"plain|%d" % i
            elif kind == "passthrough":
                r, w = await asyncio.open_connection(
                    "127.0.0.1",
                    proxy.port,
                    ssl=app_pki.client_context(),
                    server_hostname=f"t1-{plain.port}s.{BASE}",
                )
                w.write(b"%d" % i)
                good = await r.read(100) == b"tls|%d" % i
            else:  # raw passthrough to the plain backend, then an abrupt or half close
                r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                w.write(hello)
                await w.drain()
                good = (await r.readexactly(6 + len(hello))).startswith(b"plain|")
                if kind == "half":  # the backend must see the EOF and close: read() ends
                    w.write_eof()
                    good = good and await asyncio.wait_for(r.read(), 2) == b""
                else:
                    w.transport.abort()
            w.close()
            return good

    async with proxy:
        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        ok = sum(1 for x in results if x is True)
        half_close = proxy._half_close
        for _ in range(100):
            if not proxy.stats.active_by_app:
                break
            await asyncio.sleep(0.05)
        leftover = sum(proxy.stats.active_by_app.values())
    plain.close()
    tls.close()
    return ok, half_close, leftover


def test_churn_under_uvloop() -> None:
    """600 mixed connections (TLS, passthrough, aborts, half-closes) under uvloop all succeed,
    write_eof() propagation is off (EOF goes through a raw shutdown instead), and no
    connection is left counted afterwards."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        ok, half_close, leftover = runner.run(_churn(600))
    assert ok == 600
    assert half_close is False
    assert leftover == 0


def test_entry_points_run_on_uvloop_unless_asked_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pydstack.loop.run` (the gateway node, `up`) picks uvloop; PYDSTACK_LOOP=asyncio does not."""

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(loop_module()).startswith("uvloop")
    monkeypatch.setenv("PYDSTACK_LOOP", "asyncio")
    assert run(loop_module()).startswith("asyncio")
