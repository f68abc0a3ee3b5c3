"""The gateway node actor: the cluster fold, reconciled onto a WireGuard device and the proxy.

Every node folds the same log (``ClusterView``), so every node derives the same
``ClusterTable``; the node makes its device hold exactly ``table.peers`` and its proxy route
exactly ``table.routes``. One reconcile per change, in an order that never routes to a peer
the device does not have: new/changed peers first, then the proxy's table swap, then the
removals. Unchanged peers are never touched (their sessions and counters survive).

Given a ``LogCertProvider``, the node also serves the certificates on the log (issued by
whichever node's ``CertKeeper`` won the order; keys unsealed with the cluster key) and swaps
in renewals as they land. A node keeps serving its last table and certificates whatever NATS
does: a failed catch-up only marks it disconnected, and the next successful one continues
from the cursor. Restarted and new nodes
start from an empty fold and rebuild everything from the log. Usage::

    node = GatewayNode(store, device, proxy, NodeConfig(node_id="gw1", ...), key)
    async with node.running():          # joins, follows, reconciles, reports liveness
        node.status()                   # {"table_digest": ..., "lag": 0, ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from pydstack.adapters.nats import ConflictError, EventStore, StoreError
from pydstack.adapters.proxy import ProxyServer
from pydstack.adapters.wireguard import (
    DeviceConfig,
    PeerConfig,
    PrivateKey,
    WireGuardDevice,
    WireGuardError,
    diff_peers,
)
from pydstack.adapters.wireguard.netns import addresses_in
from pydstack.core.events import GatewayNodeJoined
from pydstack.core.gateway import Instance, PortPolicy, PortRule, RoutingTable
from pydstack.core.gateway.cluster import ClusterState, Refused
from pydstack.core.gateway.recycle import decide_liveness
from pydstack.core.gateway.table import ClusterTable

from . import node_metrics as m
from .cert_provider import LogCertProvider
from .endpoints import EndpointBook, restore_ops, seen_endpoints
from .recycler import RecycleConfig, Recycler
from .registrar import Registrar, RegistrarConfig
from .view import ClusterView

_log = structlog.get_logger("pydstack.gateway.node")


# -- pure: what the device and the proxy must hold ------------------------------------------


def desired_peers(table: ClusterTable) -> list[PeerConfig]:
    """The device's peers: one per routed CVM, its tunnel address as a /32, endpoint learned."""
    return [PeerConfig(public_key=p.public_key, allowed_ips=(p.allowed_ip,)) for p in table.peers]


def proxy_table(table: ClusterTable, handshakes: Mapping[str, float]) -> RoutingTable:
    """The proxy's routing table; ``handshakes`` (WireGuard key -> unix s) from this node's
    device decide which instances of an app are live."""
    return RoutingTable.build(
        [
            Instance(
                r.instance_id,
                r.app_id,
                r.tunnel_ip,
                last_handshake=handshakes.get(r.wg_public_key),
                port_policy=PortPolicy(
                    restrict=r.port_policy.restrict,
                    # pp: a PROXY v2 header, as dstack's gateway sends (`create_inbound_pp_header`)
                    rules=tuple(PortRule(p.port, 2 if p.pp else 0) for p in r.port_policy.ports),
                ),
            )
            for r in table.routes
        ],
        table.base_domains,
    )


def peer_set_digest(peers: list[PeerConfig] | tuple[PeerConfig, ...]) -> str:
    """sha256 over (key, allowed IPs) of a peer set, order-free: what a device holds (read
    back over UAPI) compares equal to what a table wants (``table_peer_digest``)."""
    rows = sorted((p.public_key, ",".join(p.allowed_ips)) for p in peers)
    return hashlib.sha256(msgspec.json.encode(rows)).hexdigest()


def table_peer_digest(table: ClusterTable) -> str:
    return peer_set_digest(desired_peers(table))


# -- the actor ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    base_domain: str
    endpoint: str  # "ip:port" where CVMs reach this node's WireGuard listener
    cluster: str = "default"
    url: str = ""  # this node's RegisterCvm URL, advertised to CVMs
    listen_port: int = 51820
    tunnel_ip: str = ""  # "": the address this node already holds, else the first free one
    tunnel_net: str = "10.0.0.0/24"  # the device's address prefix (every CVM is inside)
    node_range: str = "10.0.0.128/25"  # where nodes pick their address (outside client range)
    poll_interval_s: float = 0.05  # catch-up cadence (level-triggered)
    device_interval_s: float = 1.0  # handshakes read back for app routing
    liveness_interval_s: float = 60.0
    liveness_min_s: int = 300  # report a handshake only when it advanced this much
    recycle: RecycleConfig | None = field(default_factory=RecycleConfig)  # None: never recycle
    warmup_s: float = 10.0  # after a restart: handshakes read back fast for this long
    wg_backend: str = ""  # "kernel" / "userspace" (node_launch's choice); "": not said
    wg_backend_reason: str = ""  # one line: why that backend


class GatewayNode:
    """One node: owns nothing it did not create (store, device and proxy are passed in)."""

    def __init__(
        self,
        store: EventStore,
        device: WireGuardDevice,
        proxy: ProxyServer | None,
        config: NodeConfig,
        key: PrivateKey,
        *,
        registrar: Registrar | None = None,
        certs: LogCertProvider | None = None,
        endpoints: EndpointBook | None = None,
    ) -> None:
        self.store = store
        self.device = device
        self.proxy = proxy
        self.config = config
        self.key = key
        self.view = ClusterView(store, config.cluster)
        self.registrar = registrar or Registrar(
            store, RegistrarConfig(cluster=config.cluster, node_id=config.node_id)
        )
        self.recycler = Recycler(self.view, config.recycle) if config.recycle else None
        self.certs = certs  # fed the certificates folded from the log, if given
        self.endpoints = endpoints  # peers' endpoints kept across restarts, if given
        self.restored: frozenset[str] = frozenset()  # peers given a saved endpoint at start
        self._certs_state = self.view.certs
        self.table = ClusterTable(cluster=config.cluster)
        self.applied_digest = ""  # digest of the table the device and proxy hold
        self.applied_seq = -1  # fold sequence that table was built at
        self.table_peer_digest = table_peer_digest(self.table)
        self.device_peer_digest = self.table_peer_digest
        self.handshakes: dict[str, float] = {}
        self._lifelines: list[asyncio.Task[None]] = []  # set by running()
        self.connected = False
        self.lag = -1
        self.joined: GatewayNodeJoined | None = None
        self.reconciles = 0
        self.changed = asyncio.Event()  # set after every reconcile that changed something
        self.applied_keys: frozenset[str] = frozenset()  # peers the device holds

    # -- status -------------------------------------------------------------------------

    @property
    def tunnel_ip(self) -> str:
        return self.joined.tunnel_ip if self.joined else ""

    def status(self) -> dict[str, Any]:
        t = self.table
        return {
            "node_id": self.config.node_id,
            "cluster": self.config.cluster,
            "connected": self.connected,
            "seq": self.view.cursor,
            "lag": self.lag,
            "table_seq": t.seq,
            "table_digest": self.applied_digest,
            "peer_digest": self.table_peer_digest,
            "device_peer_digest": self.device_peer_digest,
            "in_sync": self.device_peer_digest == self.table_peer_digest,
            "peers": len(t.peers),
            "routes": len(t.routes),
            "apps": len(t.apps),
            "base_domains": list(t.base_domains),
            "gateways": [g.node_id for g in t.gateways],
            "wg_public_key": self.key.public_key().b64,
            "tunnel_ip": self.tunnel_ip,
            "endpoint": self.config.endpoint,
            "wg_backend": self.config.wg_backend,
            "wg_backend_reason": self.config.wg_backend_reason,
            "proxy_port": self.proxy.port if self.proxy else None,
            "reconciles": self.reconciles,
            "certificates": {d: self.certs.serving(d) for d in self.view.domains()}
            if self.certs
            else {},
        }

    # -- joining ------------------------------------------------------------------------

    def _pick_tunnel_ip(self, state: ClusterState) -> str:
        cfg = self.config
        if cfg.tunnel_ip:
            return cfg.tunnel_ip
        mine = state.nodes.get(cfg.node_id)
        if mine is not None:
            return mine.tunnel_ip
        taken = {n.tunnel_ip for n in state.nodes.values()} | set(state.ip_holder)
        for host in ipaddress.IPv4Network(cfg.node_range, strict=False).hosts():
            if str(host) not in taken:
                return str(host)
        raise StoreError(f"no free node address in {cfg.node_range}")

    async def join(self) -> GatewayNodeJoined:
        """Put this node on the log (once: an identical, up node is left as it is)."""
        cfg = self.config
        for _ in range(20):
            await self.registrar.ledger.catch_up()
            state = self.registrar.state
            want = GatewayNodeJoined(
                node_id=cfg.node_id,
                wg_public_key=self.key.public_key().b64,
                tunnel_ip=self._pick_tunnel_ip(state),
                endpoint=cfg.endpoint,
                base_domain=cfg.base_domain,
                url=cfg.url,
                cluster="" if cfg.cluster == "default" else cfg.cluster,
                wg_backend=cfg.wg_backend,
                wg_backend_reason=cfg.wg_backend_reason,
            )
            have = state.nodes.get(cfg.node_id)
            same = have is not None and (
                have.wg_public_key,
                have.tunnel_ip,
                have.endpoint,
                have.base_domain,
                have.url,
                have.wg_backend,
                have.wg_backend_reason,
            ) == (want.wg_public_key, want.tunnel_ip, want.endpoint, want.base_domain, want.url,
                  want.wg_backend, want.wg_backend_reason)  # fmt: skip
            if same and have is not None:
                if not have.up:
                    await self.registrar.set_node_up(cfg.node_id, True)
                self.joined = want
                return want
            out = await self.registrar.join(want)
            if isinstance(out, Refused):
                if cfg.tunnel_ip:
                    raise StoreError(f"node {cfg.node_id} cannot join: {out.reason}")
                continue  # another node took the address meanwhile: pick again
            self.joined = want
            _log.info("gateway node joined", node=cfg.node_id, tunnel_ip=want.tunnel_ip,
                      endpoint=want.endpoint, base_domain=want.base_domain)  # fmt: skip
            return want
        raise StoreError(f"node {cfg.node_id}: could not join after 20 attempts")

    async def setup_device(self) -> None:
        """Key, listen port and the tunnel address on the device (idempotent)."""
        net = ipaddress.IPv4Network(self.config.tunnel_net, strict=False)
        # Two tunnels in one namespace with overlapping networks misroute silently (the kernel
        # picks either link): refuse, naming the other link (often a second `pydstack up`).
        others = [(i, c) for i, c in await addresses_in(self.device.netns, str(net))
                  if i != self.device.ifname]  # fmt: skip
        if others:
            ifname, cidr = others[0]
            raise StoreError(
                f"gateway node {self.config.node_id}: the tunnel network {net} is already used "
                f"by link {ifname} ({cidr}) in this network namespace, probably another "
                "gateway's; stop it, or run this node in its own namespace (--netns)"
            )
        await self.device.configure(
            DeviceConfig(private_key=self.key, listen_port=self.config.listen_port)
        )
        await self.device.set_address(f"{self.tunnel_ip}/{net.prefixlen}")

    # -- reconciling --------------------------------------------------------------------

    async def catch_up(self) -> bool:
        """Fold what is new; False (and disconnected) when the store cannot be read."""
        try:
            await self.view.catch_up()
            last = await self.store.last_seq()
        except Exception as exc:  # NATS down or reconnecting: keep serving the last table
            if self.connected:
                _log.warning("cut off from the log; serving the last table", error=str(exc))
            self.connected = False
            m.CONNECTED.labels(self.config.node_id).set(0)
            return False
        self._swap_certs()
        if not self.connected:
            _log.info("following the log", node=self.config.node_id, seq=self.view.cursor)
        self.connected = True
        self.lag = max(0, last - self.view.cursor)
        m.CONNECTED.labels(self.config.node_id).set(1)
        m.LAG.labels(self.config.node_id).set(self.lag)
        m.SEQ.labels(self.config.node_id).set(self.view.cursor)
        return True

    async def reconcile(self) -> bool:
        """Make the device and the proxy hold the folded table; True if anything changed."""
        if self.view.state.seq == self.applied_seq:
            return False  # nothing folded since the last reconcile
        seq = self.view.state.seq
        table = self.view.table()
        digest = table.digest()
        if digest == self.applied_digest:
            self.applied_seq = seq
            return False
        t0 = time.perf_counter()
        current = await self.device.status()
        desired = desired_peers(table)
        ops = diff_peers(desired, [p.config for p in current.peers])
        removals = [op for op in ops if op.remove]
        upserts = [op for op in ops if not op.remove]
        await self.device.apply(upserts)
        self.table = table
        self._swap_proxy_table()
        await self.device.apply(removals)
        after = await self.device.status()
        self.device_peer_digest = peer_set_digest([p.config for p in after.peers])
        self.table_peer_digest = peer_set_digest(desired)
        self.applied_digest, self.applied_seq = digest, seq
        self.applied_keys = frozenset(p.public_key for p in desired)
        if self.endpoints is not None and removals:
            self.endpoints.forget(self.applied_keys)
        self.reconciles += 1
        self._publish_metrics()
        self.changed.set()
        _log.info(
            "reconciled", node=self.config.node_id, seq=table.seq, digest=digest[:16],
            added=sum(1 for op in upserts if not op.update_only), removed=len(removals),
            changed=sum(1 for op in upserts if op.update_only), peers=len(table.peers),
            routes=len(table.routes), ms=round((time.perf_counter() - t0) * 1000, 1),
        )  # fmt: skip
        return True

    async def wait_peer_applied(self, public_key: str, timeout_s: float = 3.0) -> bool:
        """Wait until this node's device holds ``public_key`` as a peer (it learns of a new
        registration from the log, like every node); False at the deadline.

        RegisterCvm answers only after this: the CVM's first handshake initiation then finds
        its peer here, instead of being dropped and retried after wireguard-go's 5 s rekey
        timeout (which cost every deploy ~5 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while public_key not in self.applied_keys:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _swap_certs(self) -> None:
        """New certificates on the log (issued or renewed by any node) replace the served
        ones; handshakes already done keep theirs, so no connection is dropped."""
        if self.certs is None or self.view.certs is self._certs_state:
            return
        self._certs_state = self.view.certs
        for domain in self.certs.update(self.view.certs):
            _log.info("serving certificate", node=self.config.node_id, domain=domain,
                      event_id=self.certs.serving(domain))  # fmt: skip

    def _swap_proxy_table(self) -> None:
        if self.proxy is not None:
            self.proxy.set_table(proxy_table(self.table, self.handshakes))

    def _publish_metrics(self) -> None:
        node = self.config.node_id
        m.PEERS.labels(node).set(len(self.table.peers))
        m.ROUTES.labels(node).set(len(self.table.routes))
        m.RECONCILES.labels(node).inc()
        m.TABLE.labels(node).info(
            {
                "digest": self.applied_digest,
                "peer_digest": self.table_peer_digest,
                "device_peer_digest": self.device_peer_digest,
            }
        )

    async def restore_endpoints(self) -> int:
        """Give the peers just re-applied from the log the endpoints this node saw before it
        restarted, with a keepalive, so wireguard-go handshakes with them now (see
        ``endpoints.py``); returns how many peers it initiates to."""
        if self.endpoints is None:
            return 0
        status = await self.device.status()
        ops = restore_ops(self.endpoints.load(), status.peers)
        if ops:
            await self.device.apply(ops)
            self.restored = frozenset(op.public_key for op in ops)
            _log.info("handshaking with saved peer endpoints", node=self.config.node_id,
                      peers=len(ops))  # fmt: skip
        return len(ops)

    async def _warm_up(self) -> None:
        """Read handshakes back every 50 ms until every restored peer handshook (or
        ``warmup_s``): the proxy routes to an app only once its handshake is seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.warmup_s
        while self.restored - self.handshakes.keys() and loop.time() < deadline:
            await asyncio.sleep(0.05)
            with contextlib.suppress(WireGuardError):
                await self.refresh_handshakes()
        if self.restored:
            done = len(self.restored & self.handshakes.keys())
            _log.info("restored peers handshook", node=self.config.node_id, done=done,
                      of=len(self.restored))  # fmt: skip

    async def refresh_handshakes(self) -> None:
        """Read handshakes back; a change re-swaps the proxy table (app routing freshness).
        The endpoints seen are saved (for a restart)."""
        status = await self.device.status()
        if self.endpoints is not None:
            self.endpoints.save(seen_endpoints(status.peers))
        seen = {p.public_key: p.last_handshake for p in status.peers if p.last_handshake}
        if seen != self.handshakes:
            self.handshakes = seen
            self._swap_proxy_table()

    async def report_liveness(self) -> int:
        """Coarse liveness: one CvmLiveness per instance whose handshake advanced enough."""
        observed = {k: int(v) for k, v in self.handshakes.items()}
        events = decide_liveness(
            self.view.state,
            self.config.node_id,
            observed,
            min_interval_s=self.config.liveness_min_s,
        )
        written = 0
        for e in events:
            subj = f"dstack.cvm.{e.instance_id}"
            try:
                await self.store.append(subj, [e], self.view.version(subj))
                written += 1
            except ConflictError:
                pass  # the CVM's record moved; decided again on the next fold
        return written

    # -- loops --------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            if await self.catch_up():
                try:
                    await self.reconcile()
                except WireGuardError as exc:  # retried at the next tick (level-triggered)
                    _log.error("device reconcile failed; retrying", error=str(exc))
            await asyncio.sleep(self.config.poll_interval_s)

    async def _every(self, interval: float, what: str, fn: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception as exc:  # a failed pass is retried at the next interval
                _log.warning(f"{what} failed; retrying", error=str(exc))

    async def _recycle(self) -> None:
        if self.recycler is not None and self.connected:
            await self.recycler.recycle_once(int(time.time()))

    async def _liveness(self) -> None:
        if self.connected:
            await self.report_liveness()

    async def failed(self) -> str:
        """Return (why) when the running node stopped working by itself: its WireGuard
        carrier died (wireguard-go killed) or one of its loops ended. `up` then rebuilds it
        (pydstack.upkeep.keep_component); the log and the saved endpoints restore it."""
        carrier = asyncio.create_task(self.device.carrier_lost(), name="gw-carrier")
        try:
            done, _ = await asyncio.wait({carrier, *self._lifelines},
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            carrier.cancel()
        if carrier in done:
            return carrier.result()
        task = done.pop()
        exc = None if task.cancelled() else task.exception()
        return f"{task.get_name()} ended" + (f": {exc}" if exc else "")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[GatewayNode]:
        """Join, set the device up, reconcile the current log, then keep following."""
        await self.join()
        await self.setup_device()
        await self.catch_up()
        await self.reconcile()
        await self.restore_endpoints()
        cfg = self.config
        tasks = [
            asyncio.create_task(self._warm_up(), name=f"gw-{cfg.node_id}-warm-up"),
            asyncio.create_task(self._follow(), name=f"gw-{cfg.node_id}-follow"),
            asyncio.create_task(
                self._every(cfg.device_interval_s, "handshake refresh", self.refresh_handshakes)
            ),
            asyncio.create_task(self._every(cfg.liveness_interval_s, "liveness", self._liveness)),
        ]
        if cfg.recycle is not None:
            tasks.append(
                asyncio.create_task(self._every(cfg.recycle.interval_s, "recycle", self._recycle))
            )
        self._lifelines = tasks[1:]  # loops that end only by failing (the warm-up just ends)
        try:
            yield self
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.registrar.aclose()
