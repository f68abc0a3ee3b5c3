"""A local N-node NATS JetStream cluster of child processes (fault tests, multi-host trials).

Usage::

    async with NatsCluster.create(tmp_path, size=3) as cluster:
        store = await EventStore.connect(cluster.url, signer,
                                         settings=StreamSettings(replicas=3))
        cluster.kill(0)            # kill -9; its data dir survives
        await cluster.restart(0)   # same ports, same data, rejoins and catches up

Each node has fixed client and route ports (chosen free at creation), so a killed node comes
back at the same address and clients holding all URLs reconnect to it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ..ports import free_port
from .errors import StoreError
from .server import NatsServer, NatsServerConfig


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node's own view of one stream (from its monitoring endpoint)."""

    server_name: str
    messages: int
    first_seq: int
    last_seq: int
    leader: str
    current: bool  # as leader: every follower is current (followers do not know this)


class NatsCluster:
    """N nats-server processes in one JetStream cluster; node i is ``nodes[i]``."""

    def __init__(self, configs: list[NatsServerConfig]) -> None:
        self.configs = configs
        self.nodes = [NatsServer(c) for c in configs]

    @classmethod
    def create(
        cls, base_dir: Path, *, size: int = 3, name: str = "pydstack", host: str = "127.0.0.1"
    ) -> NatsCluster:
        """Configure (not start) `size` nodes under `base_dir/n<i>`, routed to each other."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        client_ports = [free_port(host) for _ in range(size)]
        route_ports = [free_port(host) for _ in range(size)]
        http_ports = [free_port(host) for _ in range(size)]
        routes = [f"nats://{host}:{p}" for p in route_ports]
        configs = [
            NatsServerConfig(
                data_dir=base_dir / f"n{i}",
                host=host,
                port=client_ports[i],
                http_port=http_ports[i],
                server_name=f"{name}-n{i}",
                cluster_name=name,
                cluster_port=route_ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
            )
            for i in range(size)
        ]
        return cls(configs)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma separated (what `EventStore.connect` takes)."""
        return ",".join(self.urls)

    def index_of(self, server_name: str) -> int:
        for i, c in enumerate(self.configs):
            if c.server_name == server_name:
                return i
        raise KeyError(f"no node named {server_name!r} in this cluster")

    async def start(self, timeout: float = 20.0) -> None:
        """Start every node and wait until JetStream has a meta leader."""
        try:
            await asyncio.gather(*(n.start() for n in self.nodes))
            await self.wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the JetStream meta group answers API requests through every live node and
        its leader counts every live node as a current peer.

        Answering is not enough: a meta leader elected before it heard from the last peer
        refuses to place an R3 stream ("no suitable peers for placement")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        live = [i for i, node in enumerate(self.nodes) if _alive(node)]
        for i in live:
            while not await _js_answers(self.nodes[i].url):
                if loop.time() > deadline:
                    raise StoreError(f"JetStream cluster not ready within {timeout:.0f}s")
                await asyncio.sleep(0.1)
        while self.meta_peers_current() < len(live):
            if loop.time() > deadline:
                raise StoreError(
                    f"JetStream meta group has {self.meta_peers_current()} of {len(live)} "
                    f"live nodes current after {timeout:.0f}s"
                )
            await asyncio.sleep(0.1)

    def meta_peers_current(self) -> int:
        """How many nodes the JetStream meta leader counts as current (itself included); 0
        while no live node names a leader that answers."""
        for cfg in self.configs:
            meta = _monitor(cfg, "/jsz").get("meta_cluster") or {}
            if meta.get("leader") != cfg.server_name:
                continue
            replicas = meta.get("replicas") or []
            return 1 + sum(1 for r in replicas if r.get("current") and not r.get("offline"))
        return 0

    def kill(self, i: int) -> None:
        """kill -9 node i (its data dir and ports stay reserved for `restart`)."""
        self.nodes[i].kill()

    async def restart(self, i: int) -> None:
        """Start node i again with the same config and data."""
        self.nodes[i].kill()
        self.nodes[i] = NatsServer(replace(self.configs[i]))
        await self.nodes[i].start()

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)

    def stream_state(self, i: int, stream: str) -> NodeState | None:
        """Node i's local replica of `stream`, or None when it holds none (or is down)."""
        cfg = self.configs[i]
        jsz = _monitor(cfg, "/jsz?streams=true")
        for acc in jsz.get("account_details") or []:
            for s in acc.get("stream_detail") or []:
                if s.get("name") != stream:
                    continue
                st, cl = s.get("state", {}), s.get("cluster", {})
                replicas = cl.get("replicas") or []
                return NodeState(
                    server_name=cfg.server_name,
                    messages=int(st.get("messages", 0)),
                    first_seq=int(st.get("first_seq", 0)),
                    last_seq=int(st.get("last_seq", 0)),
                    leader=str(cl.get("leader", "")),
                    current=cl.get("leader") == cfg.server_name
                    and all(bool(r.get("current")) for r in replicas),
                )
        return None

    def serves_direct(self, i: int, stream: str) -> bool:
        """Whether node i answers direct gets of `stream` itself (a current replica does)."""
        cfg = self.configs[i]
        subject = urllib.parse.quote(f"$JS.API.DIRECT.GET.{stream}")
        url = f"http://{cfg.host}:{cfg.http_port}/subsz?subs=1&test={subject}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                subsz: dict[str, Any] = json.loads(resp.read())
        except OSError:
            return False
        return bool(subsz.get("subscriptions_list"))

    async def wait_serves_direct(self, i: int, stream: str, timeout: float = 10.0) -> None:
        """Wait for node i to serve direct gets (a follower that lost its leader pauses them)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.serves_direct(i, stream):
            if loop.time() > deadline:
                raise StoreError(f"node {i} does not serve {stream!r} within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def wait_converged(self, stream: str, timeout: float = 20.0) -> list[NodeState]:
        """Wait until every node holds `stream` with the same last sequence and message count,
        and serves direct gets of it from its own replica (see `read_node`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            states = [self.stream_state(i, stream) for i in range(len(self.nodes))]
            known = [s for s in states if s is not None]
            if len(known) == len(states) and any(s.current for s in known):
                same = len({(s.last_seq, s.messages) for s in known}) == 1
                if same and all(self.serves_direct(i, stream) for i in range(len(states))):
                    return known
            if loop.time() > deadline:
                raise StoreError(f"stream {stream!r} replicas did not converge: {states}")
            await asyncio.sleep(0.2)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _monitor(cfg: NatsServerConfig, path: str) -> dict[str, Any]:
    """One node's monitoring endpoint as JSON; {} when the node is down or not answering."""
    try:
        with urllib.request.urlopen(f"http://{cfg.host}:{cfg.http_port}{path}", timeout=2) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
    except (OSError, ValueError):
        return {}
    return doc


def _alive(node: NatsServer) -> bool:
    return node.proc is not None and node.proc.poll() is None


async def _js_answers(url: str) -> bool:
    async def quiet(_: Exception) -> None:
        return None

    try:
        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=quiet)
    except (OSError, nats.errors.Error, TimeoutError):
        return False
    try:
        await nc.jetstream(timeout=1).account_info()
        return True
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return False
    finally:
        await nc.close()


async def read_node(url: str, stream: str, *, batch: int = 500, timeout: float = 5.0) -> list[Msg]:
    """Every message of `stream` as the node at `url` serves it (batched direct gets).

    Connected to that node only, the request is answered by its own replica when it has one
    (NATS prefers a local queue subscriber), so this reads what that node stored.
    """
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    out: list[Msg] = []
    try:
        start = 1
        while True:
            got, pending = await _direct_batch(nc, stream, start, batch, timeout)
            out.extend(got)
            if not got or pending == 0:
                return out
            start = int((got[-1].headers or {})["Nats-Sequence"]) + 1
    finally:
        await nc.close()


async def _direct_batch(
    nc: Client, stream: str, start: int, n: int, timeout: float
) -> tuple[list[Msg], int]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        await queue.put(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        req = json.dumps({"seq": start, "batch": n}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", req, reply=inbox)
        out: list[Msg] = []
        pending = 0
        while True:
            async with asyncio.timeout(timeout):  # not wait_for: see EventStore.read
                msg = await queue.get()
            hdrs = msg.headers or {}
            status = hdrs.get("Status", "")
            if status == "404" and not out:
                return out, 0
            if status == "204" or status == "404":
                return out, pending
            if status:
                raise StoreError(f"direct get from {stream}: {status} {hdrs.get('Description')}")
            pending = int(hdrs.get("Nats-Num-Pending", "0"))
            out.append(msg)
    finally:
        await sub.unsubscribe()
