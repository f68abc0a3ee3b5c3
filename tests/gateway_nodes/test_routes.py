"""3 gateway node processes + 5 simulated CVMs, each in its own namespace with its own
wireguard-go: every route shape reaches the right CVM through every gateway; a node cut off
from NATS keeps serving and catches up when NATS is back."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pydstack.adapters.nats import NatsServer, NatsServerConfig
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.wireguard import UserspaceBackend
from tests.gateway.simcvm import DevCa, SimCvm
from tests.proxy.support import Pki

from .conftest import BASE, Cluster
from .cvms import Cvm, fetch
from .procs import NodeProc, wait_identical

T = TypeVar("T")
APPS = {"cvm1": 0xA1, "cvm2": 0xA1, "cvm3": 0xB2, "cvm4": 0xC3, "cvm5": 0xD4, "cvm6": 0xE5}


async def eventually(fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except (OSError, ssl.SSLError, AssertionError, TimeoutError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def _write_files(tmp: Path, pki: Pki, ca: DevCa, dev: DevPki) -> dict[str, Path]:
    chain, key = pki.issue(f"*.{BASE}")
    tls_chain, tls_key = ca.plain_identity()
    dev.save(tmp / "dev-pki")
    out = {"chain": chain, "key": key, "tls_chain": tls_chain.encode(),
           "tls_key": tls_key.encode(), "client_ca": ca.pem.encode()}  # fmt: skip
    paths = {}
    for name, data in out.items():
        (tmp / name).write_bytes(data)
        paths[name] = tmp / name
    return paths | {"dev_pki": tmp / "dev-pki"}


async def _new_cvm(c: Cluster, name: str, dev: DevPki, pki: Pki) -> Cvm:
    await c.lan.add(name)
    n = int(name[-1])
    sim = SimCvm(dev, bytes([APPS[name]]) * 20, bytes([n]) * 20, b"compose %d" % APPS[name])
    cvm = Cvm(name, c.lan.ns(name), sim)
    chain, key = pki.issue(f"*.{BASE}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    (c.tmp / f"{name}.pem").write_bytes(chain)
    (c.tmp / f"{name}.key").write_bytes(key)
    ctx.load_cert_chain(c.tmp / f"{name}.pem", c.tmp / f"{name}.key")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificate(chain).public_bytes(Encoding.DER)
    await cvm.start_servers(ctx, leaf)
    return cvm


async def _check_routes(client: str, gw: NodeProc, cvms: list[Cvm], ca_pem: str) -> None:
    """Every route shape for every CVM through one gateway."""
    by_app: dict[str, set[bytes]] = {}
    for c in cvms:
        by_app.setdefault(c.app_id, set()).add(f"{c.name}|80".encode())
    for c in cvms:
        iid, ip = c.instance_id, gw.address
        body, cert = await fetch(client, ip, f"{iid}.{BASE}", ca_pem)
        assert body == f"{c.name}|80".encode()
        assert cert != c.cert_der  # terminated by the gateway, with the base domain's cert
        if c.name != "cvm4":
            body, _ = await fetch(client, ip, f"{iid}-8080.{BASE}", ca_pem)
            assert body == f"{c.name}|8080".encode()
        for label in (f"{iid}-s", f"{iid}-443s"):
            body, cert = await fetch(client, ip, f"{label}.{BASE}", ca_pem)
            assert (body, cert) == (f"tls|{c.name}".encode(), c.cert_der)  # end to end TLS
        body, _ = await fetch(client, ip, f"{iid}-8443g.{BASE}", ca_pem, mode="h2")
        assert body == f"h2|{c.name}".encode()
        body, _ = await fetch(client, ip, f"{c.app_id}.{BASE}", ca_pem)
        assert body in by_app[c.app_id]
    with pytest.raises((OSError, ssl.SSLError, asyncio.IncompleteReadError)):
        body, _ = await fetch(client, gw.address, f"{cvms[3].instance_id}-8080.{BASE}", ca_pem)
        assert body  # restrict mode: port 8080 is not declared, the gateway closes


@pytest.mark.timeout(150)
async def test_every_route_shape_through_every_gateway(cluster: Cluster) -> None:
    """Each shape (<instance>, <app>, -<port>, s passthrough, g h2) reaches the right CVM via
    each of 3 gateways; with NATS stopped the nodes keep routing, and after it restarts a new
    registration reaches every node and is routed."""
    pki, ca, dev = Pki.create("gateway test CA"), DevCa.create(), DevPki.generate()
    cluster.files = _write_files(cluster.tmp, pki, ca, dev)
    ca_pem = pki.pem.decode()
    gws = list(await asyncio.gather(*(cluster.node(n) for n in (1, 2, 3))))
    client = cluster.lan.ns("client")
    await cluster.lan.add("client")
    backend = UserspaceBackend(cluster.tmp / "cvm-wg")
    cvms = [await _new_cvm(cluster, f"cvm{n}", dev, pki) for n in range(1, 6)]
    try:
        for i, c in enumerate(cvms):
            restrict = c.name == "cvm4"
            ports = [{"port": 80}, {"port": 443}, {"port": 8443}] if restrict else None
            await c.register(gws[i % 3].registration_url, ca, backend, prefix=21,
                             ports=ports, restrict=restrict)  # fmt: skip
            assert c.reg is not None and len(c.reg.servers) == 3
        await wait_identical(gws, min_peers=5)
        for gw in gws:
            await eventually(lambda gw=gw: _check_routes(client, gw, cvms, ca_pem))  # type: ignore[misc]

        # Cut off from NATS: every node keeps serving its last table.
        port = cluster.nats.port
        await cluster.nats.stop()

        async def all_disconnected() -> None:
            assert not any([(await g.status())["connected"] for g in gws])

        await eventually(all_disconnected)
        for gw in gws:
            await _check_routes(client, gw, cvms, ca_pem)
        cfg = NatsServerConfig(data_dir=cluster.tmp / "nats", host=cluster.lan.host_ip, port=port)
        cluster.nats = NatsServer(cfg)
        await cluster.nats.start()
        cvm6 = await _new_cvm(cluster, "cvm6", dev, pki)
        cvms.append(cvm6)
        await eventually(lambda: cvm6.register(gws[1].registration_url, ca, backend, prefix=21))
        statuses = await wait_identical(gws, min_peers=6)
        assert all(s["connected"] and s["peers"] == 6 for s in statuses)
        for gw in gws:
            await eventually(lambda gw=gw: _check_routes(client, gw, cvms, ca_pem))  # type: ignore[misc]
    finally:
        for c in cvms:
            await c.close()
