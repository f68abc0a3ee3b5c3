from projections_given import T0, stamp

from pydstack.core.events import (
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    PortMap,
    VmResources,
)
from pydstack.core.events.catalogue import AnyEvent
from pydstack.core.projections import Host, Placement, hosts

JOIN = HostJoined(host_id="h1", address="10.0.0.1")
P80 = (PortMap(host_port=20080, vm_port=80),)


def placed(vm: str, cid: int, vcpu: int = 2, mem: int = 2048, ports: tuple[PortMap, ...] = ()):
    return HostVmPlaced(
        host_id="h1",
        vm_id=vm,
        cid=cid,
        resources=VmResources(vcpu=vcpu, memory_mb=mem),
        ports=ports,
    )


def run(*events: AnyEvent) -> Host | None:
    state = None
    for a in stamp(events):
        state = hosts.apply(state, a)
    return state


def test_joined_host_has_dstack_defaults_and_no_usage() -> None:
    h = run(JOIN)
    assert h is not None
    assert (h.vcpu, h.memory_mb, h.cid_start, h.cid_count, h.port_range) == (
        20,
        100 * 1024,
        1000,
        1000,
        (20000, 29999),
    )
    assert (h.vcpu_used, h.memory_used_mb, h.placements, h.left) == (0, 0, {}, False)
    assert h.lowest_free_cid() == 1000


def test_placement_reserves_vcpu_memory_cid_and_ports() -> None:
    h = run(JOIN, placed("v1", 1000, vcpu=4, mem=8192, ports=P80))
    assert h is not None
    assert (h.vcpu_used, h.memory_used_mb, h.vcpu_free, h.memory_free_mb) == (4, 8192, 16, 94208)
    assert h.cids_in_use == {1000}
    assert h.ports_in_use == (("v1", P80[0]),)
    assert h.placements["v1"] == Placement(
        cid=1000, resources=VmResources(vcpu=4, memory_mb=8192), ports=P80, seq=2, event="e2"
    )


def test_release_frees_what_the_placement_reserved() -> None:
    h = run(
        JOIN,
        placed("v1", 1000, ports=P80),
        placed("v2", 1001),
        HostVmReleased(host_id="h1", vm_id="v1"),
    )
    assert h is not None
    assert (h.vcpu_used, h.memory_used_mb, h.cids_in_use, h.ports_in_use) == (2, 2048, {1001}, ())
    assert h.lowest_free_cid() == 1000


def test_releasing_an_unknown_vm_changes_nothing() -> None:
    before = run(JOIN, placed("v1", 1000))
    after = run(JOIN, placed("v1", 1000), HostVmReleased(host_id="h1", vm_id="v9"))
    assert after == before


def test_placing_the_same_vm_again_replaces_its_reservation() -> None:
    h = run(JOIN, placed("v1", 1000, vcpu=2), placed("v1", 1000, vcpu=3))
    assert h is not None
    assert (h.vcpu_used, len(h.placements)) == (3, 1)


def test_heartbeat_updates_liveness() -> None:
    h = run(JOIN, HostHeartbeat(host_id="h1", running_vms=3))
    assert h is not None
    assert (h.running_vms, h.last_heartbeat_ns, h.joined_ns) == (3, T0 + 2 * 10**9, T0 + 10**9)


def test_left_host_keeps_its_reservations_and_rejoining_updates_capacity() -> None:
    h = run(JOIN, placed("v1", 1000), HostLeft(host_id="h1", reason="maintenance"))
    assert h is not None
    assert (h.left, h.left_reason, h.vcpu_used) == (True, "maintenance", 2)
    h = run(JOIN, placed("v1", 1000), HostLeft(host_id="h1"), HostJoined(host_id="h1", vcpu=32))
    assert h is not None
    assert (h.left, h.vcpu, h.vcpu_used, list(h.placements)) == (False, 32, 2, ["v1"])


def test_events_of_a_host_that_never_joined_are_ignored() -> None:
    assert run(placed("v1", 1000), HostHeartbeat(host_id="h1")) is None


def test_the_platform_is_the_last_join_s_and_unknown_before_the_field_existed() -> None:
    """HostJoined.platform (`up --platform`): "" on a join that predates it; a re-join with
    another platform (a new probe, another --platform) replaces it, placements kept."""
    assert run(JOIN).platform == ""  # type: ignore[union-attr]
    tcg = HostJoined(host_id="h1", platform="tcg", platform_reason="auto: no TDX (x); no KVM (y)")
    h = run(JOIN, placed("vm1", 1000), tcg)
    assert h is not None and (h.platform, h.platform_reason) == ("tcg", tcg.platform_reason)
    h = run(JOIN, placed("vm1", 1000), tcg, HostJoined(host_id="h1", platform="kvm"))
    assert h is not None and (h.platform, h.platform_reason) == ("kvm", "")
    assert list(h.placements) == ["vm1"]
