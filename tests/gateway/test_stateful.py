"""Register, recycle, re-register, remove and node restarts in any order, against the fold.

A small model says what must be routed; hypothesis drives sequences and checks after every
step that the fold agrees (nothing ended ever comes back by itself), that no address or key is
held twice, and that a node that restarts (re-folds the log, in any batching, killed at any
point) ends with the same table.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pydstack.core.events import (
    CvmLiveness,
    CvmRegistered,
    CvmRemoved,
    GatewayNodeDown,
    GatewayNodeUp,
    TunnelIpReleased,
)
from pydstack.core.gateway.cluster import AddressPlan, Admission, ClusterState, Refused, fold
from pydstack.core.gateway.table import routing_table

from .given import Log, inst, key, request

PLAN = AddressPlan("10.0.0.0/29", ("10.0.0.1/32",))  # hosts .1-.6; .1 reserved
NODES = {"gw1": "10.0.0.5", "gw2": "10.0.0.6"}  # node addresses inside the client range
FREE = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
TIMEOUT = 100

instances = st.integers(0, 5)
apps = st.integers(0, 2)
keys = st.integers(0, 7)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        for n, (node, ip) in enumerate(sorted(NODES.items())):
            self.log.join(node, ip, n=900 + n)
        self.bound: dict[int, int] = {}  # instance -> app, forever
        self.alive: dict[int, tuple[int, str]] = {}  # instance -> (key, address)
        self.seen: dict[int, int] = {}  # instance -> last registration or handshake
        self.up = dict.fromkeys(NODES, True)

    # -- rules -------------------------------------------------------------------------------

    @rule(i=instances, a=apps, k=keys)
    def register(self, i: int, a: int, k: int) -> None:
        out = self.log.register(request(i, a, k), PLAN)
        holder = next((j for j, (kk, _) in self.alive.items() if kk == k and j != i), None)
        used = {ip for _, ip in self.alive.values()}
        free = [ip for ip in FREE if ip not in used]
        if self.bound.get(i, a) != a:
            assert isinstance(out, Refused) and out.code == "app_mismatch"
        elif holder is not None:
            assert isinstance(out, Refused) and out.code == "key_in_use"
        elif i in self.alive:
            assert isinstance(out, Admission) and out.renewed
            assert out.tunnel_ip == self.alive[i][1]  # re-registration keeps its address
            self.alive[i] = (k, out.tunnel_ip)
            self.seen[i] = self.log.now_s
        elif not free:
            assert isinstance(out, Refused) and out.code == "pool_exhausted"
        else:
            assert isinstance(out, Admission) and not out.renewed
            assert out.tunnel_ip == free[0]  # lowest free address
            self.bound[i] = a
            self.alive[i] = (k, out.tunnel_ip)
            self.seen[i] = self.log.now_s

    @rule(i=instances, node=st.sampled_from(sorted(NODES)))
    def handshake(self, i: int, node: str) -> None:
        self.log.add(CvmLiveness(instance_id=inst(i), node_id=node, last_handshake=self.log.now_s))
        if i in self.alive:
            self.seen[i] = self.log.now_s

    @rule(dt=st.integers(1, 80))
    def time_passes(self, dt: int) -> None:
        self.log.now_s += dt

    @rule()
    def recycle(self) -> None:
        stale = {i for i in self.alive if self.log.now_s - self.seen[i] > TIMEOUT}
        done = self.log.recycle(TIMEOUT)
        assert {r.instance_id for r in done} == {inst(i) for i in stale}
        assert all(r.record is not None for r in done)
        for i in stale:
            del self.alive[i]

    @rule(i=instances)
    def remove(self, i: int) -> None:
        if i not in self.alive:
            return
        ip = self.alive.pop(i)[1]
        self.log.add(
            TunnelIpReleased(cluster="default", instance_id=inst(i), tunnel_ip=ip, reason="rm"),
            CvmRemoved(instance_id=inst(i), reason="vm removed"),
        )

    @rule(pick=st.integers(0, 10_000))
    def replay_an_old_record(self, pick: int) -> None:
        """A CvmRegistered from the past, appended again (a confused or hostile writer)."""
        old = [a.event for a in self.log.events if isinstance(a.event, CvmRegistered)]
        if not old:
            return
        # the invariants check that it revived nothing: the model does not change
        self.log.add(old[pick % len(old)])

    @rule(node=st.sampled_from(sorted(NODES)))
    def node_down_or_up(self, node: str) -> None:
        self.up[node] = not self.up[node]
        self.log.add(
            GatewayNodeUp(node_id=node) if self.up[node] else GatewayNodeDown(node_id=node)
        )

    @rule(cut=st.integers(0, 10_000), batch=st.integers(1, 7))
    def node_restarts(self, cut: int, batch: int) -> None:
        """A node killed after `cut` events folds the rest later, in batches: same table."""
        events = self.log.events
        cut %= len(events) + 1
        state = fold(events[:cut], ClusterState())
        for start in range(cut, len(events), batch):
            state = fold(events[start : start + batch], state)
        assert routing_table(state).digest() == routing_table(self.log.state).digest()
        assert state.leases == self.log.state.leases
        assert state.instances == self.log.state.instances

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def routed_exactly_what_the_model_says(self) -> None:
        s = self.log.state
        routed = {r.instance_id: (r.wg_public_key, r.tunnel_ip) for r in routing_table(s).routes}
        assert routed == {inst(i): (key(k), ip) for i, (k, ip) in self.alive.items()}

    @invariant()
    def no_address_or_key_is_held_twice(self) -> None:
        s = self.log.state
        ips = [lease.tunnel_ip for lease in s.leases.values()]
        keys_ = [lease.wg_public_key for lease in s.leases.values()]
        assert len(ips) == len(set(ips)) and len(keys_) == len(set(keys_))
        net = ipaddress.ip_network(PLAN.client_ip_range)
        for ip in ips:
            assert ip not in NODES.values() and ip != "10.0.0.1"
            assert ipaddress.ip_address(ip) in net

    @invariant()
    def peers_are_the_routes(self) -> None:
        t = routing_table(self.log.state)
        assert sorted((p.public_key, p.allowed_ip) for p in t.peers) == sorted(
            (r.wg_public_key, f"{r.tunnel_ip}/32") for r in t.routes
        )
        assert t.base_domains == (("gw.example.com",) if any(self.up.values()) else ())


TestClusterMachine = ClusterMachine.TestCase
TestClusterMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
