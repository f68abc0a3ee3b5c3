from projections_given import request, stamp

from pydstack.core.events import (
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
)
from pydstack.core.events.catalogue import AnyEvent
from pydstack.core.projections import Vm, vms

REQ = request("v1", vcpu=4, memory_mb=4096, ports=((20080, 80),))
SCHED = VmScheduled(vm_id="v1", host="h1", cid=1000, ports=REQ.ports)


def run(*events: AnyEvent) -> Vm:
    state = None
    for a in stamp(events):
        state = vms.apply(state, a)
    assert state is not None
    return state


def test_requested_vm_waits_for_placement_and_wants_to_run() -> None:
    vm = run(REQ)
    assert (vm.state, vm.desired, vm.host, vm.resources.vcpu, vm.requested_ports) == (
        "requested",
        "running",
        "",
        4,
        REQ.ports,
    )


def test_scheduled_vm_has_host_cid_and_ports() -> None:
    vm = run(REQ, SCHED)
    assert (vm.state, vm.host, vm.cid, vm.ports) == ("scheduled", "h1", 1000, REQ.ports)


def test_rejected_vm_carries_the_reason() -> None:
    vm = run(REQ, VmRejected(vm_id="v1", reason="no host has 4 vCPU free"))
    assert (vm.state, vm.reason) == ("rejected", "no host has 4 vCPU free")


def test_rejection_after_scheduling_is_ignored() -> None:
    assert run(REQ, SCHED, VmRejected(vm_id="v1", reason="late")).state == "scheduled"


def test_started_vm_is_starting_until_boot_is_done() -> None:
    vm = run(REQ, SCHED, VmStarted(vm_id="v1", host="h1", pid=42))
    assert (vm.state, vm.pid, vm.starts, vm.restarts) == ("starting", 42, 1, 0)
    vm = run(REQ, SCHED, VmStarted(vm_id="v1", host="h1"), VmBootProgress(vm_id="v1", stage="keys"))
    assert (vm.state, vm.boot_stage) == ("starting", "keys")
    vm = run(REQ, SCHED, VmStarted(vm_id="v1", host="h1"), VmBootProgress(vm_id="v1", stage="done"))
    assert (vm.state, vm.boot_stage) == ("running", "done")


def test_boot_error_is_kept_as_last_error() -> None:
    vm = run(
        REQ,
        SCHED,
        VmStarted(vm_id="v1", host="h1"),
        VmBootError(vm_id="v1", stage="kms", error="denied"),
    )
    assert (vm.state, vm.last_error) == ("starting", "kms: denied")


def test_exit_records_reason_and_code_and_next_start_counts_a_restart() -> None:
    started = VmStarted(vm_id="v1", host="h1", pid=7)
    vm = run(REQ, SCHED, started, VmExited(vm_id="v1", reason="crashed", exit_code=137))
    assert (vm.state, vm.reason, vm.exit_code, vm.pid) == ("exited", "crashed", 137, 0)
    vm = run(REQ, SCHED, started, VmExited(vm_id="v1", reason="crashed"), started)
    assert (vm.state, vm.reason, vm.exit_code, vm.restarts, vm.starts) == (
        "starting",
        "",
        None,
        1,
        2,
    )


def test_requests_change_desired_state_and_outcomes_change_state() -> None:
    started = VmStarted(vm_id="v1", host="h1")
    vm = run(REQ, SCHED, started, VmStopRequested(vm_id="v1"))
    assert (vm.state, vm.desired) == ("starting", "stopped")
    vm = run(REQ, SCHED, started, VmStopRequested(vm_id="v1"), VmStopped(vm_id="v1"))
    assert (vm.state, vm.desired) == ("stopped", "stopped")
    vm = run(REQ, SCHED, started, VmStopped(vm_id="v1"), VmStartRequested(vm_id="v1"))
    assert (vm.state, vm.desired) == ("stopped", "running")
    vm = run(REQ, VmRemoveRequested(vm_id="v1"))
    assert (vm.state, vm.desired) == ("requested", "removed")


def test_removed_vm_is_final() -> None:
    vm = run(REQ, SCHED, VmRemoved(vm_id="v1"), VmStarted(vm_id="v1", host="h2"))
    assert (vm.state, vm.host, vm.seq) == ("removed", "h1", 3)


def test_events_of_a_vm_never_requested_are_ignored() -> None:
    state = None
    for a in stamp([SCHED, VmStarted(vm_id="v1", host="h1")]):
        state = vms.apply(state, a)
    assert state is None


def test_duplicate_request_changes_nothing() -> None:
    assert run(REQ, request("v1", vcpu=1)) == run(REQ)


def test_scheduled_ports_are_what_the_placement_granted() -> None:
    granted = (PortMap(host_port=20081, vm_port=80),)
    vm = run(REQ, VmScheduled(vm_id="v1", host="h1", cid=1001, ports=granted))
    assert (vm.ports, vm.requested_ports) == (granted, REQ.ports)
