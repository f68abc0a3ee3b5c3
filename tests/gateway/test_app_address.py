"""Custom domains' app addresses from DNS TXT as dstack v0.5.11's gateway looks them up
(issue 16 item 7), against a real DNS server (pebble-challtestsrv).

v0.5.11 `gateway/src/proxy/tls_passthough.rs` `resolve_app_address`: `<prefix>.<sni>`
(`_dstack-app-address`) and, with `app_address_ns_compat` (default true), the legacy
`_tapp-address.<sni>` at the same time, the first that has a record winning; only then
`<prefix>-wildcard.<parent>`. The value is `<app_id>:<port>`; one that does not parse fails.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from pydstack.adapters.ports import free_port
from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.adapters.proxy.app_address import AppAddressError, DnsAppAddress, txt_names
from pydstack.core.gateway import Instance, RoutingTable
from tests.proxy.support import Pki, backend_tls, random_loopback, start_backend, tls_request

pytestmark = pytest.mark.skipif(
    shutil.which("pebble-challtestsrv") is None, reason="pebble-challtestsrv not installed"
)
APP = "3327603e03f5bd1f830812ca4a789277fc31f577"  # dstack's own test's app id
SetTxt = Callable[[str, str], Awaitable[None]]


@pytest.fixture
async def dns(tmp_path: Path) -> AsyncIterator[tuple[int, SetTxt]]:
    """pebble-challtestsrv's DNS on a free port, and how to add a TXT value to it."""
    dns_port, mgmt = free_port(), free_port()
    log = (tmp_path / "challtestsrv.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
        "-tlsalpn01", "", "-management", f"127.0.0.1:{mgmt}", stdout=log, stderr=log,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", mgmt)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()
            break

        async def set_txt(name: str, value: str) -> None:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{mgmt}/set-txt", json={"host": name + ".", "value": value}
                ) as resp,  # fmt: skip
            ):
                assert resp.status == 200

        yield dns_port, set_txt
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        log.close()


def _resolver(port: int, **kw: object) -> DnsAppAddress:
    return DnsAppAddress(nameservers=[("127.0.0.1", port)], timeout=3, **kw)  # type: ignore[arg-type]


def test_names_asked_first_are_dstacks() -> None:
    """The primary name, then the legacy one (not twice when the prefix is the legacy one)."""
    assert txt_names("shop.example") == [
        "_dstack-app-address.shop.example",
        "_tapp-address.shop.example",
    ]
    assert txt_names("shop.example", compat=False) == ["_dstack-app-address.shop.example"]
    assert txt_names("a.b", prefix="_tapp-address") == ["_tapp-address.a.b"]


async def test_legacy_tapp_address_record_is_honoured(dns: tuple[int, SetTxt]) -> None:
    """A domain that only has dstack's legacy `_tapp-address` TXT routes to its app."""
    port, set_txt = dns
    await set_txt("_tapp-address.legacy.example", f"{APP}:8090")
    assert await _resolver(port)("legacy.example") == (APP, 8090)
    assert await _resolver(port, compat=False)("legacy.example") is None


async def test_primary_record_wins_over_legacy_then_wildcard(dns: tuple[int, SetTxt]) -> None:
    port, set_txt = dns
    await set_txt("_dstack-app-address.both.example", f"{APP}:443")
    await set_txt("_tapp-address.both.example", "ffff:1")
    assert await _resolver(port)("both.example") == (APP, 443)
    await set_txt("_dstack-app-address-wildcard.zone.example", f"{APP}:8443")
    assert await _resolver(port)("any.zone.example") == (APP, 8443)
    assert await _resolver(port)("nothing.example") is None


@pytest.mark.parametrize(
    "value", ["nocolon", f"{APP}:99999", f"{APP}:0", f"{APP}:-1", "bad id!:80", ":80", "x" * 250]
)
async def test_hostile_record_is_refused_in_one_line(dns: tuple[int, SetTxt], value: str) -> None:
    """A TXT value that is not `<app_id>:<port>` fails the lookup, one bounded line."""
    port, set_txt = dns
    await set_txt("_tapp-address.evil.example", value)
    with pytest.raises(AppAddressError) as err:
        await _resolver(port)("evil.example")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


async def test_proxy_passes_a_legacy_custom_domain_through(dns: tuple[int, SetTxt]) -> None:
    """End to end: a client's TLS for a custom domain whose only record is `_tapp-address`
    reaches the app's own TLS endpoint through the built-in proxy, untouched."""
    port, set_txt = dns
    app_pki = Pki.create("app CA")
    ip = random_loopback()
    app = await start_backend(
        "t1", ip, tls=backend_tls(app_pki.issue("legacy.custom.test", "legacy.custom.test"))
    )
    await set_txt("_tapp-address.legacy.custom.test", f"appt:{app.port}")
    table = RoutingTable.build([Instance("t1", "appt", ip, time.time())], ["gw.example.test"])
    proxy = await ProxyServer.create(
        ProxyConfig(port=0), StaticCertProvider({}), table, resolve_app_address=_resolver(port)
    )
    try:
        async with proxy:
            answer, _ = await tls_request(
                proxy.port, "legacy.custom.test", b"hi", app_pki.client_context()
            )
    finally:
        app.close()
    assert answer == b"t1|hi" and app.server_names == ["legacy.custom.test"]
