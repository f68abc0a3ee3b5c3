"""An app-compose ``port_policy`` as dstack v0.5.11 honours it (issue 16 item 3): sent at
RegisterCvm, on the log with the registration, enforced by the proxy. ``restrict_mode``
forwards only the listed ports; ``pp`` puts a PROXY protocol v2 header before the
connection's bytes (dstack's `create_inbound_pp_header` is always Version2)."""

from __future__ import annotations

import ssl
import time

import pytest

from pydstack.actors.gateway.node import proxy_table
from pydstack.actors.gateway.registrar import Registrar, RegistrarConfig
from pydstack.actors.gateway.view import ClusterView
from pydstack.adapters.nats import EventStore
from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.core.events import GatewayNodeJoined, PortAttrs
from pydstack.core.gateway.cluster import AddressPlan, Admission, Refused
from pydstack.core.gateway.ports import DeclaredPorts
from pydstack_guest.gateway_client import GatewayRegistrationError, port_policy_of
from tests.proxy.support import Pki, random_loopback, start_backend, tls_request

from .given import key, request

DOMAIN = "gw.example"
PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


async def test_a_registered_port_policy_is_enforced_by_the_proxy(store: EventStore) -> None:
    """Ports [80 with pp] in restrict mode: port 80 gets a PROXY v2 header then the bytes;
    port 8080 (listening, not listed) is refused."""
    net = random_loopback().rsplit(".", 1)[0]
    registrar = Registrar(
        store, RegistrarConfig(node_id="gw1", plan=AddressPlan(f"{net}.0/24", (f"{net}.1/32",)))
    )
    joined = GatewayNodeJoined(node_id="gw1", wg_public_key=key(100), tunnel_ip="10.0.0.200",
                               endpoint="127.0.0.1:51820", base_domain=DOMAIN)  # fmt: skip
    assert not isinstance(await registrar.join(joined), Refused)
    policy = DeclaredPorts.of(True, [PortAttrs(port=80, pp=True)])
    admitted = await registrar.register(request(1, 1, 1, port_policy=policy))
    assert isinstance(admitted, Admission)
    await registrar.aclose()
    app_id = admitted.record.app_id
    listed = await start_backend("cvm1", admitted.tunnel_ip, 80)
    unlisted = await start_backend("cvm1-8080", admitted.tunnel_ip, 8080)
    pki = Pki.create("port policy test CA")
    certs = StaticCertProvider({DOMAIN: pki.issue(f"*.{DOMAIN}", DOMAIN)})
    view = ClusterView(store, "default")
    try:
        async with await ProxyServer.create(ProxyConfig(host="127.0.0.1", port=0), certs) as proxy:
            await view.catch_up()
            proxy.set_table(proxy_table(view.table(), {key(1): time.time()}))
            answer, _ = await tls_request(
                proxy.port, f"{app_id}.{DOMAIN}", b"hi", pki.client_context()
            )
            assert answer.startswith(b"cvm1|" + PP2_SIGNATURE) and answer.endswith(b"hi")
            assert b"".join(listed.received)[12:13] == b"\x21"  # v2, PROXY command
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_request(
                    proxy.port, f"{app_id}-8080.{DOMAIN}", b"hi", pki.client_context()
                )
            assert unlisted.received == []
    finally:
        listed.close()
        unlisted.close()


def test_the_guest_sends_the_measured_composes_port_policy_as_dstack_util_does() -> None:
    """dstack-types' defaults (no policy: no ports, open) and its fields, as the guest's
    RegisterCvm body carries them; a port no u16 holds is a boot failure, named."""
    compose = '{"manifest_version": 2, "port_policy": {"ports": [{"port": 443, "pp": true},'
    compose += ' {"port": 80}], "restrict_mode": true}}'
    assert port_policy_of(compose) == ([{"port": 443, "pp": True}, {"port": 80, "pp": False}], True)
    assert port_policy_of('{"manifest_version": 2}') == ([], False)
    with pytest.raises(GatewayRegistrationError, match="port 70000 is not a u16"):
        port_policy_of('{"port_policy": {"ports": [{"port": 70000}]}}')
