from collections.abc import Iterable

from projections_given import T0, request, stamp

from pydstack.core.events import (
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    PortMap,
    VmRejected,
    VmRequested,
)
from pydstack.core.events.catalogue import AnyEvent
from pydstack.core.projections import Host, Projections, decide_placement, fold


def hosts_of(*events: AnyEvent) -> dict[str, Host]:
    return fold(stamp(events)).hosts


def place_all(hosts: dict[str, Host], requests: Iterable[VmRequested]) -> dict[str, Host]:
    """Decide and fold each request in turn, as the scheduler does."""
    events: list[AnyEvent] = []
    for r in requests:
        got = decide_placement(hosts, r)
        assert isinstance(got, HostVmPlaced), got
        events.append(got)
        hosts = fold(stamp([got], start=1000 + len(events)), start=_proj(hosts)).hosts
    return hosts


def _proj(hosts: dict[str, Host]) -> Projections:
    return Projections(hosts=hosts)


def reason(got: object) -> str:
    assert isinstance(got, VmRejected), got
    return got.reason


H1 = HostJoined(host_id="h1")
H2 = HostJoined(host_id="h2")


def test_first_vm_gets_the_lowest_cid_of_the_pool() -> None:
    got = decide_placement(hosts_of(H1), request("v1"))
    assert got == HostVmPlaced(
        host_id="h1", vm_id="v1", cid=1000, resources=request("v1").resources
    )


def test_cids_are_handed_out_lowest_free_first_and_reused_after_release() -> None:
    hosts = place_all(hosts_of(H1), [request("v1"), request("v2"), request("v3")])
    assert hosts["h1"].cids_in_use == {1000, 1001, 1002}
    released = fold(
        stamp([HostVmReleased(host_id="h1", vm_id="v2")], start=5000), start=_proj(hosts)
    )
    got = decide_placement(released.hosts, request("v4"))
    assert isinstance(got, HostVmPlaced) and got.cid == 1001


def test_exhausted_cid_pool_rejects() -> None:
    hosts = place_all(
        hosts_of(HostJoined(host_id="h1", cid_count=2)), [request("v1"), request("v2")]
    )
    assert reason(decide_placement(hosts, request("v3"))) == (
        "no host can take vm v3: h1 has no free CID (pool 1000..1001 in use)"
    )


def test_vcpu_limit_names_the_largest_free_host() -> None:
    hosts = place_all(hosts_of(H1, H2), [request("v1", vcpu=16), request("v2", vcpu=18)])
    assert reason(decide_placement(hosts, request("v3", vcpu=8))) == (
        "no host has 8 vCPU free (largest free: 4 on h1)"
    )


def test_memory_limit_names_the_host_with_most_memory_free() -> None:
    hosts = place_all(hosts_of(H1), [request("v1", vcpu=1, memory_mb=100 * 1024 - 512)])
    assert reason(decide_placement(hosts, request("v2", vcpu=1, memory_mb=1024))) == (
        "no host has 1 vCPU and 1024 MB memory free (most memory free with 1 vCPU: 512 MB on h1)"
    )


def test_a_vm_can_use_exactly_the_whole_host() -> None:
    got = decide_placement(hosts_of(H1), request("v1", vcpu=20, memory_mb=100 * 1024))
    assert isinstance(got, HostVmPlaced)


def test_host_port_in_use_is_rejected_naming_the_port_and_vm() -> None:
    hosts = place_all(hosts_of(H1), [request("v1", ports=((20080, 80),))])
    assert reason(decide_placement(hosts, request("v2", ports=((20080, 8080),)))) == (
        "no host can take vm v2: host port tcp/20080 on h1 is in use by vm v1"
    )


def test_port_collision_moves_the_vm_to_another_host() -> None:
    hosts = place_all(hosts_of(H1, H2), [request("v1", ports=((20080, 80),))])
    got = decide_placement(hosts, request("v2", vcpu=1, ports=((20080, 80),)))
    assert isinstance(got, HostVmPlaced) and got.host_id == "h2"


def test_wildcard_address_collides_with_any_address_but_other_protocols_do_not() -> None:
    wild = PortMap(host_address="0.0.0.0", host_port=20080, vm_port=80)
    udp = PortMap(protocol="udp", host_port=20080, vm_port=80)
    other_ip = PortMap(host_address="10.0.0.1", host_port=20080, vm_port=80)
    public = HostJoined(host_id="h1", public_ports=True)  # its operator allows 10.0.0.1
    hosts = place_all(hosts_of(public), [request("v1", ports=((20080, 80),))])
    for port, ok in ((wild, False), (udp, True), (other_ip, True)):
        r = VmRequested(
            vm_id="v2", app_id="a1", name="v2", resources=request().resources, ports=(port,)
        )
        assert isinstance(decide_placement(hosts, r), HostVmPlaced) is ok, port


def test_released_reservation_frees_its_ports() -> None:
    hosts = place_all(hosts_of(H1), [request("v1", ports=((20080, 80),))])
    freed = fold(stamp([HostVmReleased(host_id="h1", vm_id="v1")], 9000), start=_proj(hosts))
    got = decide_placement(freed.hosts, request("v2", ports=((20080, 80),)))
    assert isinstance(got, HostVmPlaced) and (got.cid, got.host_id) == (1000, "h1")


def test_port_outside_the_host_range_is_rejected() -> None:
    assert reason(decide_placement(hosts_of(H1), request("v1", ports=((8080, 80),)))) == (
        "no host can take vm v1: host port tcp/8080 is outside h1's range 20000..29999"
    )


def test_port_mapped_twice_in_one_request_is_rejected() -> None:
    r = request("v1", ports=((20080, 80), (20080, 81)))
    assert reason(decide_placement(hosts_of(H1), r)) == "host port tcp/20080 is mapped twice"


def test_pinned_host_is_honoured_even_when_another_has_more_room() -> None:
    hosts = place_all(hosts_of(H1, H2), [request("v1", vcpu=10, host="h2")])
    got = decide_placement(hosts, request("v2", host="h2"))
    assert isinstance(got, HostVmPlaced) and got.host_id == "h2"


def test_pinned_unknown_host_is_rejected() -> None:
    assert reason(decide_placement(hosts_of(H1), request("v1", host="h9"))) == (
        "pinned host h9 is not known"
    )


def test_full_pinned_host_is_rejected_even_when_another_has_room() -> None:
    hosts = place_all(hosts_of(H1, H2), [request("v1", vcpu=20, host="h1")])
    assert reason(decide_placement(hosts, request("v2", host="h1"))) == (
        "pinned host: h1 has only 0 vCPU free"
    )


def test_no_hosts_at_all() -> None:
    assert reason(decide_placement({}, request("v1"))) == "no host has joined"


def test_host_that_left_takes_nothing() -> None:
    hosts = hosts_of(H1, HostLeft(host_id="h1", reason="drained"))
    assert reason(decide_placement(hosts, request("v1"))) == (
        "no host can take vm v1: h1 has left (drained)"
    )


def test_silent_host_is_skipped_when_a_deadline_is_given() -> None:
    hosts = hosts_of(H1, H2, HostHeartbeat(host_id="h2"))  # h1 at T0+1s, h2 last heard T0+3s
    got = decide_placement(hosts, request("v1"), now_ns=T0 + 62 * 10**9, max_silence_ns=60 * 10**9)
    assert isinstance(got, HostVmPlaced) and got.host_id == "h2"
    assert isinstance(decide_placement(hosts, request("v1")), HostVmPlaced)


def test_tie_break_is_most_free_vcpu_then_host_id() -> None:
    hosts = hosts_of(HostJoined(host_id="b"), HostJoined(host_id="a"), HostJoined(host_id="c"))
    got = decide_placement(hosts, request("v1"))
    assert isinstance(got, HostVmPlaced) and got.host_id == "a"
    hosts = place_all(hosts, [request("v1", vcpu=3)])
    got = decide_placement(hosts, request("v2"))
    assert isinstance(got, HostVmPlaced) and got.host_id == "b"


def test_a_vm_already_placed_gets_its_reservation_back() -> None:
    hosts = place_all(hosts_of(H1, H2), [request("v1", ports=((20080, 80),))])
    again = decide_placement(hosts, request("v1", ports=((20080, 80),)))
    assert again == HostVmPlaced(
        host_id="h1",
        vm_id="v1",
        cid=1000,
        resources=request("v1").resources,
        ports=(PortMap(host_port=20080, vm_port=80),),
    )


def test_nonpositive_resources_are_rejected() -> None:
    assert reason(decide_placement(hosts_of(H1), request("v1", vcpu=0))) == (
        "vm v1 asks for 0 vCPU and 2048 MB memory; both must be > 0"
    )


def test_a_repeated_request_with_other_resources_gets_the_original_reservation() -> None:
    hosts = place_all(hosts_of(H1), [request("v1", vcpu=2)])
    again = decide_placement(hosts, request("v1", vcpu=8))
    assert isinstance(again, HostVmPlaced) and again.resources.vcpu == 2


def test_a_non_loopback_port_goes_only_to_a_host_whose_operator_allows_public_ports() -> None:
    public = HostJoined(host_id="h2", public_ports=True)
    hosts = hosts_of(H1, public)
    wild = PortMap(host_address="0.0.0.0", host_port=20080, vm_port=80)
    r = VmRequested(vm_id="v", app_id="a1", name="v", resources=request().resources, ports=(wild,))
    got = decide_placement(hosts, r)
    assert isinstance(got, HostVmPlaced) and got.host_id == "h2"
    pinned = decide_placement(hosts_of(H1), r)
    assert isinstance(pinned, VmRejected) and "forwards only loopback ports" in pinned.reason


def test_a_host_address_that_is_not_an_ip_literal_is_rejected_on_every_host() -> None:
    hosts = hosts_of(HostJoined(host_id="h1", public_ports=True))
    evil = PortMap(host_address="127.0.0.1:1-:1,guestfwd=tcp:10.0.2.100:4444-cmd:id",
                   host_port=20080, vm_port=80)  # fmt: skip
    r = VmRequested(vm_id="v", app_id="a1", name="v", resources=request().resources, ports=(evil,))
    got = decide_placement(hosts, r)
    assert isinstance(got, VmRejected) and "is not an IP address" in got.reason
