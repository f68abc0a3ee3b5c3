"""Base domains added with ``pydstack gateway add-domain`` are routed: the fold of a node (the
cluster and the domain aggregates from a real NATS) puts them in the table's base domains, and
a real proxy fed that table routes ``<app_id>.<new domain>`` to the CVM."""

from __future__ import annotations

import ssl
import time

import pytest

from pydstack.actors.gateway.certs import add_domain
from pydstack.actors.gateway.node import proxy_table
from pydstack.actors.gateway.registrar import Registrar, RegistrarConfig
from pydstack.actors.gateway.view import ClusterView
from pydstack.adapters.nats import EventStore
from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.core.events import GatewayNodeJoined
from pydstack.core.gateway.certs import AddDomain
from pydstack.core.gateway.cluster import AddressPlan, Admission, Refused
from tests.proxy.support import Pki, random_loopback, start_backend, tls_request

from .given import key, request

JOINED = "gw.example"
ADDED = "apps.example.org"


async def test_an_added_domain_routes_app_ids(store: EventStore) -> None:
    # CVM addresses on a loopback /24, so the proxy reaches the backend without WireGuard.
    net = random_loopback().rsplit(".", 1)[0]
    plan = AddressPlan(f"{net}.0/24", (f"{net}.1/32",))
    registrar = Registrar(store, RegistrarConfig(node_id="gw1", plan=plan))
    joined = GatewayNodeJoined(node_id="gw1", wg_public_key=key(100), tunnel_ip="10.0.0.200",
                               endpoint="127.0.0.1:51820", base_domain=JOINED)  # fmt: skip
    assert not isinstance(await registrar.join(joined), Refused)
    admitted = await registrar.register(request(1, 1, 1))
    assert isinstance(admitted, Admission)
    await registrar.aclose()
    app_id = admitted.record.app_id
    backend = await start_backend("cvm1", admitted.tunnel_ip, 80)

    pki = Pki.create("domains test CA")
    certs = StaticCertProvider({d: pki.issue(f"*.{d}", d) for d in (JOINED, ADDED)})
    view = ClusterView(store, "default")
    live = {key(1): time.time()}  # app ids route to instances with a fresh handshake
    async with await ProxyServer.create(ProxyConfig(host="127.0.0.1", port=0), certs) as proxy:
        await view.catch_up()
        assert view.table().base_domains == (JOINED,)
        proxy.set_table(proxy_table(view.table(), live))
        answer, _ = await tls_request(proxy.port, f"{app_id}.{JOINED}", b"hi", pki.client_context())
        assert answer == b"cvm1|hi"
        with pytest.raises((ssl.SSLError, ConnectionError)):  # not a base domain yet: refused
            await tls_request(proxy.port, f"{app_id}.{ADDED}", b"hi", pki.client_context())

        await add_domain(store, "default", AddDomain(domain=ADDED, acme_directory="https://ca/d"))
        await view.catch_up()
        assert view.table().base_domains == (ADDED, JOINED)
        proxy.set_table(proxy_table(view.table(), live))
        answer, _ = await tls_request(proxy.port, f"{app_id}.{ADDED}", b"hi", pki.client_context())
        assert answer == b"cvm1|hi"
    backend.close()


async def test_every_view_of_the_log_agrees_on_added_domains(store: EventStore) -> None:
    """Two views of the same log hold the same table (the domain is part of the digest);
    another cluster's view does not take the domain."""
    a, b = ClusterView(store, "default"), ClusterView(store, "default")
    await add_domain(store, "default", AddDomain(domain=ADDED, acme_directory="https://ca/d"))
    await a.catch_up()
    await b.catch_up()
    assert a.table().base_domains == b.table().base_domains == (ADDED,)
    assert a.table().digest() == b.table().digest()
    other = ClusterView(store, "other")
    await other.catch_up()
    assert other.table().base_domains == ()
