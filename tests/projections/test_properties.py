"""Properties of the folds: determinism, batching, and placement never over-commits."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from hypothesis import event, given, settings
from hypothesis import strategies as st
from projections_given import stamp

from pydstack.adapters.sqlite import ReadModel
from pydstack.core.events import (
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    KeyRequested,
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
)
from pydstack.core.events.catalogue import AnyEvent
from pydstack.core.projections import Host, Projections, apps, decide_placement, fold, hosts, vms

APP = st.sampled_from(["a1", "a2"])
VM = st.sampled_from(["v1", "v2", "v3", "v4"])
HOST = st.sampled_from(["h1", "h2", "h3"])
TEXT = st.sampled_from(["", "x", "done", "keys"])
RES = st.builds(VmResources, vcpu=st.integers(1, 8), memory_mb=st.integers(256, 4096))
PORTS = st.lists(
    st.builds(PortMap, host_port=st.integers(20000, 20003), vm_port=st.just(80)), max_size=2
).map(tuple)

EVENT: st.SearchStrategy[AnyEvent] = st.one_of(
    st.builds(AppRegistered, app_id=APP, compose_hash=TEXT, name=TEXT),
    st.builds(AppUpgraded, app_id=APP, compose_hash=TEXT, previous_compose_hash=TEXT),
    st.builds(AppRemoved, app_id=APP, reason=TEXT),
    st.builds(VmRequested, vm_id=VM, app_id=APP, name=TEXT, resources=RES, ports=PORTS),
    st.builds(VmScheduled, vm_id=VM, host=HOST, cid=st.integers(1000, 1003), ports=PORTS),
    st.builds(VmRejected, vm_id=VM, reason=TEXT),
    st.builds(VmStartRequested, vm_id=VM),
    st.builds(VmStopRequested, vm_id=VM),
    st.builds(VmRemoveRequested, vm_id=VM),
    st.builds(VmStarted, vm_id=VM, host=HOST, pid=st.integers(0, 3)),
    st.builds(VmBootProgress, vm_id=VM, stage=TEXT),
    st.builds(VmBootError, vm_id=VM, stage=TEXT, error=TEXT),
    st.builds(VmExited, vm_id=VM, reason=TEXT, exit_code=st.none() | st.integers(0, 2)),
    st.builds(VmStopped, vm_id=VM),
    st.builds(VmRemoved, vm_id=VM),
    st.builds(HostJoined, host_id=HOST, vcpu=st.integers(1, 20)),
    st.builds(HostHeartbeat, host_id=HOST, running_vms=st.integers(0, 3)),
    st.builds(HostLeft, host_id=HOST, reason=TEXT),
    st.builds(
        HostVmPlaced,
        host_id=HOST,
        vm_id=VM,
        cid=st.integers(1000, 1003),
        resources=RES,
        ports=PORTS,
    ),
    st.builds(HostVmReleased, host_id=HOST, vm_id=VM),
    st.builds(KeyRequested, request_id=TEXT, app_id=APP),
)
LOGS = st.lists(EVENT, max_size=60)


def chunks(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, n, *(c % (n + 1) for c in cuts)})
    return list(pairwise(points))


@given(LOGS)
def test_folding_the_same_events_twice_gives_the_same_state(events: list[AnyEvent]) -> None:
    assert fold(stamp(events)) == fold(stamp(events))


@given(LOGS)
def test_projections_fold_is_the_per_aggregate_folds(events: list[AnyEvent]) -> None:
    """Folding one aggregate at a time (as an actor does) agrees with folding everything."""
    whole = fold(stamp(events))
    for vm_id in ("v1", "v2", "v3", "v4"):
        state = None
        for a in stamp(events):
            if getattr(a.event, "vm_id", None) == vm_id and type(a.event).__name__[:2] == "Vm":
                state = vms.apply(state, a)
        assert state == whole.vms.get(vm_id)
    for host_id in ("h1", "h2", "h3"):
        host = None
        for a in stamp(events):
            if getattr(a.event, "host_id", None) == host_id:
                host = hosts.apply(host, a)
        assert host == whole.hosts.get(host_id)
    for app_id in ("a1", "a2"):
        app = None
        for a in stamp(events):
            if isinstance(a.event, AppRegistered | AppUpgraded | AppRemoved):
                if a.event.app_id == app_id:
                    app = apps.apply(app, a)
        assert app == whole.apps.get(app_id)


@given(LOGS, st.lists(st.integers(0, 60), max_size=6), st.integers(0, 10))
def test_any_split_into_batches_with_redelivery_gives_the_same_state(
    events: list[AnyEvent], cuts: list[int], overlap: int
) -> None:
    records = stamp(events)
    state = Projections()
    for lo, hi in chunks(len(records), cuts):
        state = fold(records[max(0, lo - overlap) : hi], start=state)  # re-sends a tail
    assert state == fold(records)


@settings(max_examples=50, deadline=None)
@given(LOGS, st.lists(st.integers(0, 60), max_size=6), st.integers(0, 10))
def test_read_model_in_any_batches_equals_the_fold(
    events: list[AnyEvent], cuts: list[int], overlap: int
) -> None:
    records = stamp(events)
    with ReadModel.open(":memory:") as rm:
        for lo, hi in chunks(len(records), cuts):
            rm.apply_batch(records[max(0, lo - overlap) : hi])
        assert rm.snapshot() == fold(records)
        assert rm.position() == len(records)


# -- placement -------------------------------------------------------------------------------

JOIN = st.tuples(
    st.just("join"), HOST, st.integers(1, 20), st.integers(1024, 8192), st.integers(1, 4)
)
VM_IDS = st.sampled_from([f"v{i}" for i in range(10)])
REQUEST = st.tuples(st.just("request"), VM_IDS, RES, PORTS, st.sampled_from(["", "", "h1", "h9"]))
OPS = st.tuples(
    st.lists(JOIN, min_size=1, max_size=3),
    st.lists(
        st.one_of(
            REQUEST,
            REQUEST,
            JOIN,
            st.tuples(st.just("release"), VM_IDS),
            st.tuples(st.just("leave"), HOST),
        ),
        max_size=60,
    ),
).map(lambda t: t[0] + t[1])


def check(host: Host) -> None:
    assert 0 <= host.vcpu_used <= host.vcpu
    assert 0 <= host.memory_used_mb <= host.memory_mb
    cids = [p.cid for p in host.placements.values()]
    assert len(cids) == len(set(cids))
    assert all(host.cid_start <= c < host.cid_start + host.cid_count for c in cids)
    ports = Counter((p.protocol, p.host_port) for _, p in host.ports_in_use)
    assert all(n == 1 for n in ports.values()), ports
    assert host.vcpu_used == sum(p.vcpu for p in host.placements.values())


@settings(max_examples=300)
@given(OPS)
def test_placements_decided_by_decide_placement_never_over_commit(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    log: list[AnyEvent] = []
    joined: dict[str, tuple[int, int, int]] = {}
    state = Projections()
    for op in ops:
        match op:
            case ("join", h, vcpu, mem, cids):
                joined.setdefault(h, (vcpu, mem, cids))  # capacity is fixed once joined
                vcpu, mem, cids = joined[h]
                new: AnyEvent = HostJoined(host_id=h, vcpu=vcpu, memory_mb=mem, cid_count=cids)
            case ("request", vm, res, ports, pin):
                req = VmRequested(
                    vm_id=vm, app_id="a1", name=vm, resources=res, ports=ports, host=pin
                )
                new = decide_placement(state.hosts, req)
                event(type(new).__name__)
            case ("release", vm):
                held = [h for h, host in state.hosts.items() if vm in host.placements]
                if not held:
                    continue
                new = HostVmReleased(host_id=held[0], vm_id=vm)
            case ("leave", h):
                new = HostLeft(host_id=h)
        log.append(new)
        state = fold(stamp([new], start=len(log)), start=state)
        for host in state.hosts.values():
            check(host)
    # The same decisions replayed from the log give the same hosts.
    assert fold(stamp(log)).hosts == state.hosts
