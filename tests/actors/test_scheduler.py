"""The scheduler's decisions against a real stream, one behaviour per test."""

from __future__ import annotations

from pydstack.actors import HostDefaults, Scheduler, SchedulerConfig
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import (
    HostVmPlaced,
    VmRejected,
    VmRemoveRequested,
    VmScheduled,
    subject,
)

from .helpers import assert_no_double_booking, join, read_log, request


async def test_places_on_a_host_with_room_with_lowest_cids(store: EventStore) -> None:
    await join(store, "h1")
    for i in range(3):
        await request(store, f"vm{i}", vcpu=2, memory_mb=2048)
    assert await Scheduler(store).reconcile() == 3
    log = await read_log(store)
    assert [log.state.vms[f"vm{i}"].cid for i in range(3)] == [1000, 1001, 1002]
    assert all(log.state.vms[f"vm{i}"].host == "h1" for i in range(3))
    assert log.state.hosts["h1"].vcpu_used == 6
    assert_no_double_booking(log)


async def test_reuses_a_released_cid_first(store: EventStore) -> None:
    await join(store, "h1")
    await request(store, "a")
    await request(store, "b")
    sched = Scheduler(store)
    await sched.reconcile()
    from pydstack.core.events import HostVmReleased

    _, version = await store.read_aggregate(subject("host", "h1"))
    await store.append(subject("host", "h1"), [HostVmReleased(host_id="h1", vm_id="a")], version)
    await request(store, "c")
    assert await sched.schedule("c") == "scheduled"
    assert (await read_log(store)).state.vms["c"].cid == 1000


async def test_rejects_with_the_reason_when_every_host_is_full(store: EventStore) -> None:
    await join(store, "h1", vcpu=4, memory_mb=4096)
    await request(store, "fits", vcpu=4, memory_mb=1024)
    await request(store, "toobig", vcpu=2, memory_mb=1024)
    await Scheduler(store).reconcile()
    log = await read_log(store)
    assert log.state.vms["fits"].state == "scheduled"
    rejected = log.decisions["toobig"][0]
    assert isinstance(rejected, VmRejected)
    assert "2 vCPU" in rejected.reason and "h1" in rejected.reason
    assert log.state.hosts["h1"].vcpu_used == 4


async def test_memory_limit_and_cid_pool_are_enforced(store: EventStore) -> None:
    await join(store, "h1", memory_mb=3000, cid_start=5, cid_count=2)
    await request(store, "a", memory_mb=1000)
    await request(store, "b", memory_mb=1000)
    await request(store, "c", memory_mb=500)  # memory left, but the CID pool 5..6 is used up
    await request(store, "d", memory_mb=1001)
    await Scheduler(store).reconcile()
    log = await read_log(store)
    assert [log.state.vms[v].cid for v in "ab"] == [5, 6]
    assert "CID" in log.state.vms["c"].reason
    assert log.state.vms["d"].state == "rejected"


async def test_port_collision_moves_the_vm_to_another_host(store: EventStore) -> None:
    await join(store, "h1")
    await join(store, "h2", vcpu=10)  # h1 has more room, so it is preferred
    await request(store, "a", ports=((20080, 80),))
    await request(store, "b", ports=((20080, 80),))
    await Scheduler(store).reconcile()
    log = await read_log(store)
    assert log.state.vms["a"].host == "h1"
    assert log.state.vms["b"].host == "h2"
    assert log.state.vms["b"].ports[0].host_port == 20080
    assert_no_double_booking(log)


async def test_port_collision_on_a_pinned_host_is_rejected(store: EventStore) -> None:
    await join(store, "h1")
    await join(store, "h2")
    await request(store, "a", ports=((20080, 80),), host="h1")
    await request(store, "b", ports=((20080, 8080),), host="h1")
    await Scheduler(store).reconcile()
    log = await read_log(store)
    assert log.state.vms["a"].host == "h1"
    assert log.state.vms["b"].state == "rejected"
    assert "20080" in log.state.vms["b"].reason and "in use" in log.state.vms["b"].reason


async def test_no_host_means_a_rejection_naming_it(store: EventStore) -> None:
    await request(store, "lonely")
    await Scheduler(store).reconcile()
    assert "no host" in (await read_log(store)).state.vms["lonely"].reason


async def test_deciding_again_is_a_no_op(store: EventStore) -> None:
    await join(store, "h1")
    await request(store, "a")
    first, second = Scheduler(store), Scheduler(store)
    assert await first.schedule("a") == "scheduled"
    assert await second.schedule("a") == "noop"  # a fresh scheduler sees it decided
    assert await first.reconcile() == 0
    log = await read_log(store)
    assert len(log.decisions["a"]) == 1 and len(log.placed["h1"]) == 1


async def test_a_stale_scheduler_conflicts_rereads_and_does_not_decide_twice(
    store: EventStore,
) -> None:
    await join(store, "h1")
    await request(store, "a")
    stale, fresh = Scheduler(store), Scheduler(store)
    await stale.catch_up()
    plan = stale.plan("a")
    assert plan is not None and isinstance(plan.decision, HostVmPlaced)
    assert await fresh.schedule("a") == "scheduled"
    # The stale scheduler's own retry loop re-reads and finds the VM decided.
    assert await stale._schedule("a") == "noop"
    log = await read_log(store)
    assert len(log.decisions["a"]) == 1
    assert len(log.placed["h1"]) == 1


async def test_host_defaults_fill_only_what_the_host_did_not_say(store: EventStore) -> None:
    await join(store, "small")  # says nothing: the scheduler's default (2 vCPU) applies
    await join(store, "big", vcpu=32)
    cfg = SchedulerConfig(defaults=HostDefaults(vcpu=2))
    sched = Scheduler(store, cfg)
    await sched.catch_up()
    assert sched.view.hosts["small"].vcpu == 2
    assert sched.view.hosts["big"].vcpu == 32
    assert sched.view.hosts["small"].memory_mb == 100 * 1024  # other fields: dstack's defaults


async def test_a_vm_removed_before_scheduling_is_rejected_not_placed(store: EventStore) -> None:
    await join(store, "h1")
    await request(store, "a")
    _, v = await store.read_aggregate(subject("vm", "a"))
    await store.append(subject("vm", "a"), [VmRemoveRequested(vm_id="a")], v)
    await Scheduler(store).reconcile()
    log = await read_log(store)
    assert isinstance(log.decisions["a"][0], VmRejected)
    assert not log.placed["h1"]


async def test_scheduled_vm_and_host_reservation_are_one_atomic_commit(store: EventStore) -> None:
    await join(store, "h1")
    await request(store, "a")
    await Scheduler(store).reconcile()
    host_recs, _ = await store.read_aggregate(subject("host", "h1"))
    vm_recs, _ = await store.read_aggregate(subject("vm", "a"))
    # Consecutive sequences: the batch landed as one unit, host first.
    assert vm_recs[-1].seq == host_recs[-1].seq + 1
    log = await read_log(store)
    scheduled = log.decisions["a"][0]
    assert isinstance(scheduled, VmScheduled)
    assert scheduled.placement_event  # names the HostVmPlaced that reserved the room
    assert NEW.seq == 0


async def test_a_rejection_is_decided_on_the_newest_log_not_the_cached_view(
    store: EventStore,
) -> None:
    sched = Scheduler(store)
    await request(store, "a")
    await sched.catch_up()  # the view has the request but no host yet
    await join(store, "late")  # a host joins after the view was built
    async with sched._lock:
        assert await sched._schedule("a") == "scheduled"
    assert (await read_log(store)).state.vms["a"].host == "late"
