"""HAProxy-specific behaviour of the plane on loopback: live changes never restart HAProxy,
apps follow their freshest instance as handshakes age, certificates change live."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections.abc import AsyncIterator

import pytest

from pydstack.adapters.haproxy import HaproxyConfig, HaproxyError, HaproxyPlane
from pydstack.core.gateway import Instance, RoutingTable

from ..proxy.support import Pki, client_hello, random_loopback, refused, start_backend, tls_request

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")
BASE = "app.example.test"


@pytest.fixture
def pki() -> Pki:
    return Pki.create("gateway test CA")


@pytest.fixture
async def plane(pki: Pki) -> AsyncIterator[HaproxyPlane]:
    config = HaproxyConfig(port=0, handshake_stale=1.5, refresh_interval=0.1)
    plane = await HaproxyPlane.create(config, {BASE: pki.issue(f"*.{BASE}")})
    async with plane:
        yield plane


async def test_hundred_registrations_without_restart(pki: Pki) -> None:
    """100 registrations, one table each, reach HAProxy as map changes: the pid and start
    time stay, a connection opened before them keeps relaying, every new id routes."""
    plane = await HaproxyPlane.create(HaproxyConfig(port=0), {BASE: pki.issue(f"*.{BASE}")})
    async with plane:
        await _hundred_registrations(plane, pki)


async def _hundred_registrations(plane: HaproxyPlane, pki: Pki) -> None:
    first = await start_backend("i000", random_loopback())
    port = first.port
    backends = [first]
    instances = [Instance("i000", "app000", first.ip, time.time())]
    await plane.set_table(RoutingTable.build(instances, [BASE]))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", plane.port, ssl=pki.client_context(), server_hostname=f"i000-{port}.{BASE}"
    )
    writer.write(b"before")
    assert await reader.read(100) == b"i000|before"
    info = await plane.api.info()
    sent = 0
    for i in range(1, 101):
        b = await start_backend(f"i{i:03d}", random_loopback(), port)
        backends.append(b)
        instances.append(Instance(f"i{i:03d}", f"app{i:03d}", b.ip, time.time()))
        sent += await plane.set_table(RoutingTable.build(instances, [BASE]))
    try:
        assert sent == 200  # per registration: one instance entry and one app entry
        after = await plane.api.info()
        assert after["Pid"] == info["Pid"] == str(plane.process.pid)
        assert after["Start_time_sec"] == info["Start_time_sec"]
        assert int(after["Uptime_sec"]) >= int(info["Uptime_sec"])
        assert plane.process.proc.returncode is None
        writer.write(b"after")
        assert await reader.read(100) == b"i000|after"  # the old connection was not cut
        for i in (1, 50, 100):
            answer, _ = await tls_request(
                plane.port, f"app{i:03d}-{port}.{BASE}", b"x", pki.client_context()
            )
            assert answer == f"i{i:03d}|x".encode()
    finally:
        writer.close()
        for b in backends:
            b.close()


async def test_app_follows_freshest_instance_as_handshakes_age(
    plane: HaproxyPlane, pki: Pki
) -> None:
    """An app goes to its most recently handshaken instance; without any new table, the
    refresh drops it once its handshake is older than handshake_stale (1.5 s here)."""
    older = await start_backend("older", random_loopback())
    newer = await start_backend("newer", random_loopback(), older.port)
    now = time.time()
    await plane.set_table(
        RoutingTable.build(
            [Instance("o1", "app", older.ip, now - 1.0), Instance("n1", "app", newer.ip, now)],
            [BASE],
        )
    )
    name = f"app-{older.port}.{BASE}"
    try:
        assert (await tls_request(plane.port, name, b"a", pki.client_context()))[0] == b"newer|a"
        await asyncio.sleep(0.8)  # o1 is now stale (1.8 s), n1 is not (0.8 s)
        assert (await tls_request(plane.port, name, b"b", pki.client_context()))[0] == b"newer|b"
        await asyncio.sleep(1.0)  # n1 stale too: the refresh task marks the app as dead
        assert await refused(plane.port, client_hello(name))
        assert (await plane.stats()).refused["no_live_instance"] == 1
        # a direct instance id still routes to a stale instance
        answer, _ = await tls_request(
            plane.port, f"o1-{older.port}.{BASE}", b"c", pki.client_context()
        )
        assert answer == b"older|c"
    finally:
        older.close()
        newer.close()


async def test_certificates_change_live(plane: HaproxyPlane, pki: Pki) -> None:
    """A renewed certificate from another CA and a new base domain's certificate are served
    right away, with the same HAProxy process."""
    backend = await start_backend("b1", random_loopback())
    other = "other.example.test"
    await plane.set_table(
        RoutingTable.build([Instance("b1", "appb", backend.ip, time.time())], [BASE, other])
    )
    pid = (await plane.api.info())["Pid"]
    renewed = Pki.create("renewal CA")
    name = f"b1-{backend.port}.{BASE}"
    try:
        await plane.set_certificate(BASE, *renewed.issue(f"*.{BASE}"))
        assert (await tls_request(plane.port, name, b"r", renewed.client_context()))[0] == b"b1|r"
        with pytest.raises(ssl.SSLError):  # the old certificate is gone
            await tls_request(plane.port, name, b"x", pki.client_context())
        await plane.set_certificate(other, *renewed.issue(f"*.{other}"))
        answer, _ = await tls_request(
            plane.port, f"b1-{backend.port}.{other}", b"n", renewed.client_context()
        )
        assert answer == b"b1|n"
        assert (await plane.api.info())["Pid"] == pid
    finally:
        backend.close()


async def test_refused_runtime_command_is_an_error(plane: HaproxyPlane) -> None:
    """A command HAProxy rejects raises HaproxyError quoting HAProxy's answer."""
    with pytest.raises(HaproxyError, match="nosuch"):
        await plane.api.apply(["set server nosuch/s state ready"])


async def test_startup_failure_names_the_cause() -> None:
    """A port already taken fails create() with the bind error, leaving nothing running."""
    with pytest.raises(OSError):
        async with await HaproxyPlane.create(HaproxyConfig(port=0)) as first:
            await HaproxyPlane.create(HaproxyConfig(host="127.0.0.1", port=first.port))
