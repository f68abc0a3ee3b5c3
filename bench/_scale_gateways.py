"""bench.scale's gateway nodes: real ``python -m pydstack.actors.gateway`` processes, each in
its own network namespace on a test LAN with its own wireguard-go (as tests/gateway_nodes run
them), and a sim CVM's RegisterCvm against them.

The CVM's client certificate is the one ``tests.gateway.simcvm.SimCvm`` makes: an RA-TLS
certificate with a quote simulated by the dev PKI, under an app CA signed by a dev CA that
stands in for the KMS's SignCert (the nodes' ``--client-ca``). Only the registration is
simulated on the CVM's side: no tunnel is brought up (a wireguard-go per CVM would be the
load, not the control plane); the nodes still add every peer to their own devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.wireguard import PrivateKey
from pydstack_guest.gateway_client import register_cvm
from tests.gateway.simcvm import DevCa, SimCvm
from tests.gateway_nodes.lan import Lan
from tests.gateway_nodes.procs import NodeProc, node_argv, wait_identical
from tests.proxy.support import Pki

BASE = "scale.bench.test"


@dataclass
class Gateways:
    nodes: list[NodeProc]
    ca: DevCa
    pki: DevPki
    register_ms: list[float] = field(default_factory=list)
    last_at: float = 0.0  # wall time of the last accepted registration

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(n.registration_url for n in self.nodes)

    async def register(self, urls: list[str], vm_id: str, app_id: bytes) -> str:
        """RegisterCvm as dstack-util does: each URL in turn until one accepts; returns it."""
        instance = hashlib.sha256(b"instance " + vm_id.encode()).digest()[:20]
        sim = SimCvm(self.pki, app_id, instance, b"compose " + app_id)
        identity = await sim.identity(self.ca)
        errors = []
        for url in urls:
            t = time.perf_counter()
            try:
                key = PrivateKey.generate().public_key().b64
                await register_cvm(url, identity=identity, ca_pem=self.ca.pem, wg_public_key=key)
            except Exception as exc:  # the next node, as the guest does
                errors.append(f"{url}: {exc}")
                continue
            self.register_ms.append((time.perf_counter() - t) * 1000)
            self.last_at = time.time()
            return url
        raise RuntimeError("; ".join(errors) or "no gateway URL")

    async def converged_at(self, peers: int, timeout_s: float) -> float:
        """Wall time at which every node first serves one table digest with its device's peers
        equal to it and ``peers`` peers (polled every 0.1 s from the start of the storm)."""
        await wait_identical(self.nodes, min_peers=peers, timeout=timeout_s)
        return time.time()


def _files(tmp: Path, ca: DevCa, dev: DevPki) -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    chain, key = Pki.create("bench.scale gateway CA").issue(f"*.{BASE}")
    tls_chain, tls_key = ca.plain_identity()
    dev.save(tmp / "dev-pki")
    out = {"chain": chain, "key": key, "tls_chain": tls_chain.encode(),
           "tls_key": tls_key.encode(), "client_ca": ca.pem.encode()}  # fmt: skip
    for name, data in out.items():
        (tmp / name).write_bytes(data)
    return {name: tmp / name for name in out} | {"dev_pki": tmp / "dev-pki"}


@contextlib.asynccontextmanager
async def gateway_nodes(
    lan: Lan, tmp: Path, nats_url: str, pki: DevPki, n: int
) -> AsyncIterator[Gateways]:
    ca = DevCa.create()
    files = _files(tmp, ca, pki)
    nodes: list[NodeProc] = []
    try:
        for k in range(1, n + 1):
            node_id = f"gw{k}"
            addr = await lan.add(node_id)
            argv = node_argv(
                node_id, lan.ns(node_id), addr, nats_url=nats_url, state_dir=tmp / node_id,
                base_domain=BASE, tunnel_net=lan.tunnel_net, client_range=lan.client_range,
                tunnel_ip=lan.node_ip(k), files=files,
            )  # fmt: skip
            node = NodeProc(node_id, lan.ns(node_id), addr, argv, tmp / f"{node_id}.log")
            nodes.append(node)
            await node.start(timeout=60)
        yield Gateways(nodes, ca, pki)
    finally:
        for node in nodes:
            await node.stop()
