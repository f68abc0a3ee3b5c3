"""Fixtures: a test LAN, nats-server on the host's LAN address, gateway node processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pydstack.adapters.nats import EventStore, NatsServer, NatsServerConfig
from pydstack.core.events import Signer

from .lan import Lan, namespace_lan
from .procs import NodeProc, node_argv

BASE = "gw.pydstack.test"

if os.geteuid() != 0 or shutil.which("wireguard-go") is None:
    pytest.skip("gateway node tests need root and wireguard-go", allow_module_level=True)


@dataclass
class Cluster:
    lan: Lan
    tmp: Path
    nats: NatsServer
    store: EventStore
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    files: dict[str, Path] | None = None

    @property
    def nats_url(self) -> str:
        return self.nats.url

    async def node(self, n: int, *, start: bool = True, extra: tuple[str, ...] = ()) -> NodeProc:
        node_id = f"gw{n}"
        address = await self.lan.add(node_id)
        argv = node_argv(
            node_id, self.lan.ns(node_id), address, nats_url=self.nats_url,
            state_dir=self.tmp / node_id, base_domain=BASE, tunnel_net=self.lan.tunnel_net,
            client_range=self.lan.client_range, tunnel_ip=self.lan.node_ip(n), files=self.files,
            extra=extra,
        )  # fmt: skip
        proc = NodeProc(node_id, self.lan.ns(node_id), address, argv, self.tmp / f"{node_id}.log")
        self.nodes[node_id] = proc
        if start:
            await proc.start()
        return proc


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with namespace_lan() as lan:
        cfg = NatsServerConfig(data_dir=tmp_path / "nats", host=lan.host_ip)
        server = NatsServer(cfg)
        await server.start()
        signer = Signer.from_private_bytes("test-registrar", os.urandom(32))
        store = await EventStore.connect(server.url, signer)
        await store.ensure_stream()
        c = Cluster(lan, tmp_path, server, store)
        try:
            yield c
        finally:
            for node in c.nodes.values():
                await node.stop()
            await store.nc.close()
            await server.stop()
            if c.nats is not server:  # a test restarted NATS: stop the one running now
                await c.nats.stop()
