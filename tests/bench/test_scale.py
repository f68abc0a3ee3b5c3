"""bench.scale's double-booking check counts what would be a wrong placement."""

from __future__ import annotations

from bench._scale_log import VM_MB, Watch, double_bookings
from pydstack.core.events import HostJoined


def _watch(placed: dict[str, str], vcpu: int = 2) -> Watch:
    w = Watch()
    w.hosts = {h: HostJoined(host_id=h, vcpu=vcpu, memory_mb=vcpu * VM_MB)
               for h in set(placed.values())}  # fmt: skip
    for vm, host in placed.items():
        w.scheduled[vm] += 1
        w.host_of[vm] = host
    return w


def test_a_fleet_within_capacity_has_no_double_booking() -> None:
    w = _watch({"a": "h1", "b": "h1", "c": "h2"})
    assert double_bookings(w, ["a", "b", "c"]) == 0


def test_a_vm_scheduled_twice_is_counted() -> None:
    w = _watch({"a": "h1", "b": "h2"})
    w.scheduled["a"] += 1
    assert double_bookings(w, ["a", "b"]) == 1


def test_a_host_over_its_vcpus_counts_its_vms() -> None:
    w = _watch({"a": "h1", "b": "h1", "c": "h1"})
    assert double_bookings(w, ["a", "b", "c"]) == 3


def test_a_vm_on_a_host_that_never_joined_is_counted() -> None:
    w = _watch({"a": "h1"})
    w.host_of["b"], w.scheduled["b"] = "ghost", 1
    assert double_bookings(w, ["a", "b"]) == 1
