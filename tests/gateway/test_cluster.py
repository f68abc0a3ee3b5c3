"""The cluster fold and its decisions: given events, a request, the events out (pure)."""

from __future__ import annotations

import base64

from pydstack.core.events import (
    CvmLiveness,
    CvmRegistered,
    CvmRemoved,
    GatewayNodeDown,
    GatewayNodeJoined,
    GatewayNodeUp,
    PortAttrs,
    TunnelIpAllocated,
    TunnelIpReleased,
)
from pydstack.core.gateway.cluster import (
    AddressPlan,
    Admission,
    ClusterState,
    Refused,
    RegisterRequest,
    decide_join,
    fold,
)
from pydstack.core.gateway.ports import DeclaredPorts
from pydstack.core.gateway.recycle import decide_liveness, decide_recycle
from pydstack.core.gateway.table import ClusterTable, TableIndex, routing_table

from .given import Log, app, hexid, inst, key, request

HOUR = 3600


def admitted(out: Admission | Refused) -> Admission:
    assert isinstance(out, Admission), out
    return out


def refused(out: Admission | Refused) -> Refused:
    assert isinstance(out, Refused), out
    return out


def test_first_address_is_the_lowest_free_one_skipping_reserved_and_node_addresses() -> None:
    """10.0.0.0 is the network, .1 reserved, .2 a node's: the first CVM gets .3, then .4."""
    log = Log()
    log.join("gw1", "10.0.0.2")
    assert admitted(log.register(request(1, 1, 1))).tunnel_ip == "10.0.0.3"
    assert admitted(log.register(request(2, 1, 2))).tunnel_ip == "10.0.0.4"


def test_admission_events_carry_identity_key_and_ports() -> None:
    """The ledger entry and the record agree; the record keeps the declared ports."""
    ports = DeclaredPorts.of(True, [PortAttrs(port=443, pp=True), PortAttrs(port=80)])
    a = admitted(Log().register(request(1, 2, 3, port_policy=ports)))
    assert a.ledger == TunnelIpAllocated(
        cluster="default",
        instance_id=inst(1),
        app_id=app(2),
        wg_public_key=key(3),
        tunnel_ip="10.0.0.2",
        compose_hash=hexid("compose", 2),
    )
    assert a.record.port_policy == "restrict"
    assert [p.port for p in a.record.ports] == [80, 443]
    assert a.record.tunnel_ip == a.ledger.tunnel_ip and not a.renewed


def test_reregistration_keeps_the_address_and_the_table() -> None:
    """A CVM that boots again gets the address it holds; nothing routable changed."""
    log = Log()
    first = admitted(log.register(request(1, 1, 1)))
    admitted(log.register(request(2, 1, 2)))
    before = routing_table(log.state).digest()
    again = admitted(log.register(request(1, 1, 1)))
    assert again.renewed and again.tunnel_ip == first.tunnel_ip
    assert routing_table(log.state).digest() == before


def test_reregistration_with_a_new_key_keeps_the_address_and_frees_the_old_key() -> None:
    log = Log()
    first = admitted(log.register(request(1, 1, 1)))
    moved = admitted(log.register(request(1, 1, 7)))
    assert moved.tunnel_ip == first.tunnel_ip
    assert [p.public_key for p in routing_table(log.state).peers] == [key(7)]
    admitted(log.register(request(2, 1, 1)))  # key 1 is free again


def test_key_owned_by_another_instance_is_refused() -> None:
    log = Log()
    admitted(log.register(request(1, 1, 1)))
    r = refused(log.register(request(2, 1, 1)))
    assert r.code == "key_in_use"


def test_instance_bound_to_another_app_is_refused_even_after_it_was_recycled() -> None:
    log = Log()
    admitted(log.register(request(1, 1, 1)))
    assert refused(log.register(request(1, 2, 2))).code == "app_mismatch"
    log.now_s += 11 * HOUR
    assert [r.instance_id for r in log.recycle(10 * HOUR)] == [inst(1)]
    assert refused(log.register(request(1, 2, 2))).code == "app_mismatch"


def test_malformed_keys_are_refused() -> None:
    raw = bytes(range(1, 33))
    good = base64.b64encode(raw).decode()
    non_canonical = good[:-2] + chr(ord(good[-2]) + 1) + "="  # same bytes, other spelling
    assert base64.b64decode(non_canonical) == raw
    for bad in (
        "",
        "not base64!",
        base64.b64encode(raw[:31]).decode(),
        non_canonical,
        base64.b64encode(bytes(32)).decode(),
    ):
        req = RegisterRequest(
            app_id=app(1), instance_id=inst(1), compose_hash="", wg_public_key=bad
        )
        r = refused(Log().register(req))
        assert r.code == "bad_key", bad


def test_empty_ids_are_refused() -> None:
    req = RegisterRequest(app_id="", instance_id=inst(1), compose_hash="", wg_public_key=key(1))
    r = refused(Log().register(req))
    assert r.code == "bad_request"


def test_exhausted_pool_is_refused() -> None:
    log = Log()
    plan = AddressPlan("10.9.0.0/30", ())  # two hosts
    admitted(log.register(request(1, 1, 1), plan))
    admitted(log.register(request(2, 1, 2), plan))
    assert refused(log.register(request(3, 1, 3), plan)).code == "pool_exhausted"


def test_recycled_instance_leaves_the_table_and_its_address_is_reused() -> None:
    log = Log()
    log.join("gw1", "10.0.0.200")
    a1 = admitted(log.register(request(1, 1, 1)))
    log.now_s += 5 * HOUR
    admitted(log.register(request(2, 1, 2)))
    log.now_s += 6 * HOUR  # instance 1 silent 11 h, instance 2 6 h
    assert [r.instance_id for r in log.recycle(10 * HOUR)] == [inst(1)]
    assert log.state.routed(inst(1)) is None
    assert log.state.instances[inst(1)].status == "recycled"
    assert [r.instance_id for r in routing_table(log.state).routes] == [inst(2)]
    assert admitted(log.register(request(3, 1, 3))).tunnel_ip == a1.tunnel_ip
    # instance 1 registers again: a fresh address, it is routed again
    back = admitted(log.register(request(1, 1, 1)))
    assert not back.renewed and back.tunnel_ip != a1.tunnel_ip
    assert log.state.routed(inst(1)) is not None
    assert routing_table(log.refold()).digest() == routing_table(log.state).digest()


def test_a_handshake_on_any_node_keeps_an_instance() -> None:
    log = Log()
    log.join("gw1", "10.0.0.100", n=901)
    log.join("gw2", "10.0.0.101", n=902)
    admitted(log.register(request(1, 1, 1)))
    log.now_s += 9 * HOUR
    log.add(CvmLiveness(instance_id=inst(1), node_id="gw2", last_handshake=log.now_s))
    log.now_s += 9 * HOUR  # 18 h since registration, 9 h since gw2's handshake
    assert log.recycle(10 * HOUR) == []
    log.now_s += 2 * HOUR
    assert len(log.recycle(10 * HOUR)) == 1


def test_liveness_from_an_unknown_node_counts_for_nothing() -> None:
    log = Log()
    admitted(log.register(request(1, 1, 1)))
    log.now_s += 11 * HOUR
    log.add(CvmLiveness(instance_id=inst(1), node_id="stranger", last_handshake=log.now_s))
    assert len(log.recycle(10 * HOUR)) == 1


def test_removed_instance_never_comes_back_from_later_events() -> None:
    """After CvmRemoved, neither liveness nor a replayed old record routes it again."""
    log = Log()
    a = admitted(log.register(request(1, 1, 1)))
    log.add(
        TunnelIpReleased(cluster="default", instance_id=inst(1), tunnel_ip=a.tunnel_ip),
        CvmRemoved(instance_id=inst(1), reason="vm removed"),
    )
    log.add(CvmLiveness(instance_id=inst(1), node_id="gw1", last_handshake=log.now_s + 5))
    log.add(a.record)  # the old record again, without a ledger entry
    assert log.state.routed(inst(1)) is None
    assert routing_table(log.state).routes == ()


def test_record_without_a_matching_lease_is_not_routed() -> None:
    """A CvmRegistered the ledger did not admit (forged, or another cluster's) is ignored."""
    log = Log()
    log.add(
        CvmRegistered(
            app_id=app(1),
            instance_id=inst(1),
            compose_hash="c",
            wg_public_key=key(1),
            tunnel_ip="10.0.0.2",
        )
    )
    assert routing_table(log.state).routes == ()


def test_ledger_entries_that_would_double_book_are_ignored() -> None:
    """Our deciders never write them; a fold stays sane if someone else does."""
    log = Log()
    log.join("gw1", "10.0.0.50")
    a = admitted(log.register(request(1, 1, 1)))
    for bad in (
        TunnelIpAllocated(
            cluster="default",
            instance_id=inst(2),
            app_id=app(1),
            wg_public_key=key(2),
            tunnel_ip=a.tunnel_ip,
        ),  # held address
        TunnelIpAllocated(
            cluster="default",
            instance_id=inst(2),
            app_id=app(1),
            wg_public_key=key(1),
            tunnel_ip="10.0.0.9",
        ),  # held key
        TunnelIpAllocated(
            cluster="default",
            instance_id=inst(2),
            app_id=app(1),
            wg_public_key=key(2),
            tunnel_ip="10.0.0.50",
        ),  # node address
        TunnelIpAllocated(
            cluster="other",
            instance_id=inst(2),
            app_id=app(1),
            wg_public_key=key(2),
            tunnel_ip="10.0.0.9",
        ),  # other cluster
    ):
        log.add(bad)
        assert inst(2) not in log.state.leases, bad


def test_node_down_refuses_registrations_through_it_and_hides_its_domain() -> None:
    log = Log()
    log.join("gw1", "10.0.0.100", domain="a.example", n=901)
    log.join("gw2", "10.0.0.101", domain="b.example", n=902)
    log.add(GatewayNodeDown(node_id="gw1", reason="maintenance"))
    assert refused(log.register(request(1, 1, 1), node_id="gw1")).code == "node_down"
    admitted(log.register(request(1, 1, 1), node_id="gw2"))
    table = routing_table(log.state)
    assert table.base_domains == ("b.example",)
    assert [(g.node_id, g.up) for g in table.gateways] == [("gw1", False), ("gw2", True)]
    log.add(GatewayNodeUp(node_id="gw1"))
    assert routing_table(log.state).base_domains == ("a.example", "b.example")


def test_join_refuses_an_address_in_use() -> None:
    log = Log()
    log.join("gw1", "10.0.0.100")
    a = admitted(log.register(request(1, 1, 1)))
    node = GatewayNodeJoined(
        node_id="gw2",
        wg_public_key=key(50),
        tunnel_ip=a.tunnel_ip,
        endpoint="192.0.2.1:51820",
        base_domain="x",
    )
    assert isinstance(decide_join(log.state, node), Refused)
    taken = GatewayNodeJoined(
        node_id="gw2",
        wg_public_key=key(50),
        tunnel_ip="10.0.0.100",
        endpoint="192.0.2.1:51820",
        base_domain="x",
    )
    assert isinstance(decide_join(log.state, taken), Refused)
    ok = GatewayNodeJoined(
        node_id="gw2",
        wg_public_key=key(50),
        tunnel_ip="10.0.0.101",
        endpoint="192.0.2.1:51820",
        base_domain="x",
    )
    assert decide_join(log.state, ok) is ok


def test_events_of_another_cluster_are_ignored() -> None:
    log = Log(cluster="blue")
    log.join("gw1", "10.0.0.100")
    green = GatewayNodeJoined(
        node_id="gw9",
        wg_public_key=key(9),
        tunnel_ip="10.0.0.9",
        endpoint="192.0.2.9:1",
        base_domain="x",
        cluster="green",
    )
    log.add(green)
    a = admitted(log.register(request(1, 1, 1)))
    assert a.ledger.cluster == "blue" and a.record.cluster == "blue"
    assert sorted(log.state.nodes) == ["gw1"]
    assert log.state.routed(inst(1)) is not None


def test_digest_does_not_depend_on_batching_or_on_seq() -> None:
    log = Log()
    log.join("gw1", "10.0.0.100")
    for i in range(20):
        admitted(log.register(request(i, i % 3, i)))
    one_by_one = ClusterState()
    for a in log.events:
        one_by_one = fold([a], one_by_one)
    t1, t2 = routing_table(log.refold()), routing_table(one_by_one)
    assert t1 == t2 and t1.digest() == t2.digest()
    log.add(CvmLiveness(instance_id=inst(3), node_id="gw1", last_handshake=log.now_s))
    t3 = routing_table(log.state)
    assert t3.seq != t1.seq and t3.digest() == t1.digest()  # liveness is not routing
    assert ClusterTable.decode(t3.encode()).digest() == t3.digest()
    admitted(log.register(request(99, 0, 99)))
    assert routing_table(log.state).digest() != t1.digest()


def test_fold_does_not_mutate_its_input() -> None:
    log = Log()
    admitted(log.register(request(1, 1, 1)))
    snapshot = log.state
    copy = (dict(snapshot.leases), dict(snapshot.instances), snapshot.seq)
    admitted(log.register(request(2, 1, 2)))
    assert (snapshot.leases, snapshot.instances, snapshot.seq) == copy


def test_index_resolves_instances_and_apps_and_ports_fail_closed() -> None:
    log = Log()
    restrict = DeclaredPorts.of(True, [PortAttrs(port=8080, pp=True)])
    admitted(log.register(request(1, 1, 1, port_policy=restrict)))
    admitted(log.register(request(2, 1, 2)))
    index = TableIndex.of(routing_table(log.state))
    (only,) = index.resolve(inst(1).upper())
    assert only.tunnel_ip == "10.0.0.2" and only.wg_public_key == key(1)
    assert [r.instance_id for r in index.resolve(app(1))] == sorted([inst(1), inst(2)])
    assert index.resolve("nope") == ()
    policy = only.port_policy
    assert policy.allows(8080) and policy.proxy_protocol(8080)
    assert not policy.allows(80) and not policy.allows(0)
    assert index.by_instance[inst(2)].port_policy.allows(80)


def test_liveness_is_reported_coarsely() -> None:
    log = Log()
    log.join("gw1", "10.0.0.100")
    admitted(log.register(request(1, 1, 1)))
    admitted(log.register(request(2, 1, 2)))
    t = log.now_s
    out = decide_liveness(log.state, "gw1", {key(1): t, key(2): 0, key(77): t}, min_interval_s=60)
    assert out == [CvmLiveness(instance_id=inst(1), node_id="gw1", last_handshake=t)]
    log.add(*out)
    assert decide_liveness(log.state, "gw1", {key(1): t + 30}, min_interval_s=60) == []
    assert len(decide_liveness(log.state, "gw1", {key(1): t + 60}, min_interval_s=60)) == 1


def test_recycle_releases_a_lease_whose_record_already_ended() -> None:
    """A CvmRecycled written alone leaves the address held; the next pass releases it."""
    log = Log()
    a = admitted(log.register(request(1, 1, 1)))
    log.add(CvmRemoved(instance_id=inst(1)))
    assert log.state.ip_holder == {a.tunnel_ip: inst(1)}
    (r,) = decide_recycle(log.state, now_s=log.now_s, timeout_s=10 * HOUR)
    assert r.record is None and r.ledger.tunnel_ip == a.tunnel_ip
    log.add(r.ledger)
    assert log.state.ip_holder == {}


def test_a_replayed_record_does_not_refresh_an_instance() -> None:
    """Each ledger entry admits one record: appending an old one again keeps nothing alive."""
    log = Log()
    a = admitted(log.register(request(1, 1, 1)))
    log.now_s += 9 * HOUR
    log.add(a.record)
    log.now_s += 2 * HOUR
    assert [r.instance_id for r in log.recycle(10 * HOUR)] == [inst(1)]
