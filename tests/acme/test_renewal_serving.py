"""A renewal is swapped into a serving proxy without dropping connections: a real proxy serves
what a node's fold of the log holds (``ClusterView.certs`` -> ``LogCertProvider``, as
``GatewayNode`` does), a keeper renews a short-lived pebble certificate, a connection opened
before the renewal keeps relaying and new connections get the new certificate."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pydstack.actors.gateway.cert_provider import LogCertProvider
from pydstack.actors.gateway.view import ClusterView
from pydstack.adapters.nats import NatsServer
from pydstack.adapters.proxy import ProxyConfig, ProxyServer
from pydstack.core.gateway.certs import CertStore, RenewalPolicy
from pydstack.core.gateway.routing import Instance, RoutingTable
from pydstack.core.gateway.sealing import ClusterKey
from tests.gateway.given import app, inst
from tests.proxy.support import random_loopback, start_backend

from .conftest import CLUSTER, Nodes
from .pebble import missing_binaries, running_pebble
from .test_issue import DOMAIN, add


async def _until(pred: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes) -> bytes:
    writer.write(msg)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.read(4096)


@pytest.mark.timeout(90)
async def test_renewal_swaps_the_certificate_and_keeps_connections(
    nats_server: NatsServer, cluster_key: ClusterKey, tmp_path: Path
) -> None:
    if missing_binaries():
        pytest.skip("pebble not installed")
    policy = RenewalPolicy(renew_before_s=5, claim_timeout_s=60)
    ip = random_loopback()
    backend = await start_backend("cvm", ip, 80)
    host = f"{inst(1)}.{DOMAIN}"
    async with (
        running_pebble(tmp_path / "short", validity_s=8) as short,
        contextlib.AsyncExitStack() as stack,
    ):
        fleet = Nodes(nats_server, short, stack)
        keeper = await fleet.node("gw1", cluster_key, policy, order_timeout_s=30)
        view = ClusterView(await fleet.store("gw2"), CLUSTER)
        provider = LogCertProvider(CertStore(cluster_key))
        proxy = await ProxyServer.create(ProxyConfig(host="127.0.0.1", port=0), provider)
        await stack.enter_async_context(proxy)
        proxy.set_table(RoutingTable.build([Instance(inst(1), app(1), ip)], [DOMAIN]))

        async def follow() -> None:  # what GatewayNode does after each catch-up
            while True:
                await view.catch_up()
                provider.update(view.certs)
                await asyncio.sleep(0.05)

        task = asyncio.create_task(follow())
        stack.callback(task.cancel)
        await add(keeper.view.store, short)
        client = ssl.create_default_context(cadata=(await short.root_pem()).decode())
        await stack.enter_async_context(keeper.running())
        await _until(lambda: provider.serving(DOMAIN) is not None, 30)
        first = provider.serving(DOMAIN)

        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=client, server_hostname=host
        )
        stack.callback(writer.close)
        old_cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert await _ask(reader, writer, b"one") == b"cvm|one"

        await _until(lambda: provider.serving(DOMAIN) not in (None, first), 30)  # renewed
        assert await _ask(reader, writer, b"two") == b"cvm|two"  # the old connection lives on
        r2, w2 = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=client, server_hostname=host
        )
        new_cert = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert new_cert != old_cert  # new handshakes get the renewed certificate
        assert await _ask(r2, w2, b"three") == b"cvm|three"
        w2.close()
    backend.close()
