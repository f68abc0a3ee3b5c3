"""The JetStream event store against a real nats-server: OCC, idempotence, atomic commits, reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import nats
import pytest

from pydstack.adapters.nats import (
    NEW,
    Change,
    ConflictError,
    EventStore,
    NatsServer,
    StoreClosed,
    StoreError,
    StreamMissing,
    StreamSettings,
    Unreachable,
    Version,
    free_port,
)
from pydstack.core.events import (
    HostLeft,
    Signer,
    VmRejected,
    VmStopped,
    message_hash,
    open_envelope,
    verify,
)

V1 = "dstack.vm.v1"


def rejected(reason: str = "r") -> VmRejected:
    return VmRejected(vm_id="v1", reason=reason)


async def test_expected_zero_means_subject_is_new(store: EventStore) -> None:
    """On this server version, expected-last-subject-sequence 0 accepts only an empty subject."""
    v = await store.append(V1, [rejected()], NEW)
    assert v.seq == 1
    with pytest.raises(ConflictError, match="moved past sequence 0"):
        await store.append(V1, [rejected()], NEW)


async def test_expected_sequence_is_per_subject(store: EventStore) -> None:
    """Appends to other subjects do not move this subject's expected sequence."""
    v = await store.append(V1, [rejected()], NEW)
    await store.append("dstack.vm.v2", [VmRejected(vm_id="v2", reason="x")], NEW)
    v2 = await store.append(V1, [rejected("again")], v)
    assert v2.seq == 3
    with pytest.raises(ConflictError):
        await store.append(V1, [rejected("stale")], v)


async def test_append_with_int_expected_looks_up_the_hash(store: EventStore) -> None:
    v = await store.append(V1, [rejected()], NEW)
    v2 = await store.append(V1, [rejected("b")], v.seq)
    recs, _ = await store.read_aggregate(V1)
    assert open_envelope(recs[1].data).prev == v.hash == message_hash(recs[0].data)
    assert v2.seq == recs[1].seq


async def test_int_expected_of_another_subject_is_a_conflict(store: EventStore) -> None:
    await store.append("dstack.vm.v2", [VmRejected(vm_id="v2", reason="x")], NEW)
    with pytest.raises(ConflictError, match=r"belongs to dstack\.vm\.v2"):
        await store.append(V1, [rejected()], 1)


async def test_multi_event_append_chains_hashes(store: EventStore) -> None:
    v = await store.append(V1, [rejected("a"), rejected("b"), VmStopped(vm_id="v1")], NEW)
    recs, version = await store.read_aggregate(V1)
    assert [r.seq for r in recs] == [1, 2, 3]
    assert version == v
    prevs = [open_envelope(r.data).prev for r in recs]
    assert prevs == [b"", message_hash(recs[0].data), message_hash(recs[1].data)]


async def test_server_checks_expected_sequence_before_dedupe(store: EventStore) -> None:
    """nats-server 2.15: a duplicate Msg-Id with a stale expected sequence is a conflict, not a
    duplicate ack; without the expected header it is a duplicate ack. The store relies on this."""
    headers = {"Nats-Msg-Id": "m1", "Nats-Expected-Last-Subject-Sequence": "0"}
    ack = await store.js.publish(V1, b"x", headers=dict(headers))
    assert ack.seq == 1
    with pytest.raises(nats.js.errors.APIError) as info:
        await store.js.publish(V1, b"x", headers=dict(headers))
    assert info.value.err_code == 10071
    dup = await store.js.publish(V1, b"x", headers={"Nats-Msg-Id": "m1"})
    assert dup.seq == 1 and dup.duplicate


async def test_same_event_id_is_stored_once(store: EventStore) -> None:
    """Re-appending an event that already landed (same id, same bytes) returns its sequence."""
    ids = ["fixed-id"]
    v = await store.append(V1, [rejected()], NEW, event_ids=ids, correlation="c")
    recs, _ = await store.read_aggregate(V1)
    # Replay exactly what the first attempt sent, as a retry after a lost ack would.
    again = await store._publish_one(
        V1, recs[0].data, {"Nats-Msg-Id": "fixed-id", "Nats-Expected-Last-Subject-Sequence": "0"}, 0
    )
    assert again == v.seq
    assert await store.last_seq() == 1
    with pytest.raises(ConflictError):  # a different event with a stale version still conflicts
        await store.append(V1, [rejected("other")], NEW, event_ids=ids)


async def test_commit_is_atomic_across_aggregates(store: EventStore) -> None:
    """If one aggregate moved, no event of the commit is stored."""
    vm = await store.append(V1, [rejected()], NEW)
    host = "dstack.host.h1"
    out = await store.commit(
        [Change(V1, [VmStopped(vm_id="v1")], vm), Change(host, [HostLeft(host_id="h1")], NEW)]
    )
    assert out[V1].seq == 2 and out[host].seq == 3
    with pytest.raises(ConflictError) as info:
        await store.commit(
            [
                Change(V1, [VmStopped(vm_id="v1")], out[V1]),
                Change(host, [HostLeft(host_id="h1")], NEW),
            ]
        )
    assert info.value.subject == host
    assert await store.last_seq() == 3


async def test_commit_rejects_duplicate_subjects(store: EventStore) -> None:
    with pytest.raises(ValueError, match="each subject once"):
        await store.commit([Change(V1, [rejected()], NEW), Change(V1, [rejected()], NEW)])


async def test_read_aggregate_pages_past_one_batch(store: EventStore) -> None:
    v = NEW
    for chunk in range(3):
        v = await store.append(V1, [rejected(f"{chunk}-{i}") for i in range(120)], v)
    await store.append("dstack.vm.other", [VmRejected(vm_id="other", reason="x")], NEW)
    recs, version = await store.read_aggregate(V1)
    assert len(recs) == 360 and version.seq == 360
    assert all(r.subject == V1 for r in recs)
    later, _ = await store.read_aggregate(V1, after=300)
    assert [r.seq for r in later] == list(range(301, 361))


async def test_read_empty_aggregate(store: EventStore) -> None:
    assert await store.read_aggregate("dstack.vm.none") == ([], NEW)


async def test_read_from_sequence_and_time(store: EventStore) -> None:
    await store.append(V1, [rejected("a"), rejected("b")], NEW)
    await asyncio.sleep(0.05)
    mark = time.time()
    await asyncio.sleep(0.05)
    await store.append("dstack.vm.v2", [VmRejected(vm_id="v2", reason="c")], NEW)
    assert [r.seq async for r in store.read()] == [1, 2, 3]
    assert [r.seq async for r in store.read(from_seq=2)] == [2, 3]
    assert [r.seq async for r in store.read(from_time=mark)] == [3]
    assert [r.seq async for r in store.read(subject="dstack.vm.v2")] == [3]
    assert [r.seq async for r in store.read(subject="dstack.host.*")] == []  # at once, no stall
    assert all(r.time_ns > 0 for r in [r async for r in store.read()])


async def test_follow_sees_new_events(store: EventStore) -> None:
    await store.append(V1, [rejected()], NEW)
    seen: list[int] = []

    async def follower() -> None:
        async for r in store.read(follow=True):
            seen.append(r.seq)
            if len(seen) == 3:
                return

    task = asyncio.create_task(follower())
    await asyncio.sleep(0.1)
    v = await store.append("dstack.vm.v2", [VmRejected(vm_id="v2", reason="x")], NEW)
    await store.append("dstack.vm.v2", [VmRejected(vm_id="v2", reason="y")], v)
    await asyncio.wait_for(task, 5)
    assert seen == [1, 2, 3]


async def test_stored_messages_verify(store: EventStore, signer: Signer) -> None:
    await store.append(V1, [rejected()], NEW, correlation="corr-1", causation="cmd-9")
    (rec,), _ = await store.read_aggregate(V1)
    env = verify(rec.data)
    assert (env.actor, env.key, env.correlation, env.causation, env.subject) == (
        signer.actor,
        signer.public_key,
        "corr-1",
        "cmd-9",
        V1,
    )


async def test_ensure_stream_is_idempotent_and_protective(
    nats_server: NatsServer, signer: Signer
) -> None:
    async with await EventStore.connect(nats_server.url, signer) as s:
        await s.ensure_stream()
        await s.append(V1, [rejected()], NEW)
        await s.ensure_stream()  # second call keeps the data
        assert await s.last_seq() == 1
        info = await s.js.stream_info(s.stream)
        assert info.config.deny_delete and info.config.deny_purge
        assert info.config.discard == "old" and info.config.max_msgs == -1
        with pytest.raises(nats.js.errors.APIError):
            await s.js.delete_msg(s.stream, 1)


async def test_missing_stream_is_a_clear_error(nats_server: NatsServer, signer: Signer) -> None:
    settings = StreamSettings(name="NOPE")
    async with await EventStore.connect(nats_server.url, signer, settings=settings) as s:
        with pytest.raises(StreamMissing, match="'NOPE' does not exist"):
            await s.last_seq()
        with pytest.raises(StreamMissing):
            await s.read_aggregate(V1)


async def test_unreachable_server_is_a_clear_error(signer: Signer) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match="unreachable"):
        await EventStore.connect(url, signer, connect_timeout=0.5)


async def test_append_on_a_closed_store_is_a_typed_error(
    nats_server: NatsServer, signer: Signer
) -> None:
    """Shutdown racing an append: StoreClosed (a StoreError), for one event and for a batch."""
    s = await EventStore.connect(nats_server.url, signer)
    await s.ensure_stream()
    await s.close()
    with pytest.raises(StoreClosed, match=r"connection to NATS .* is closed"):
        await s.append(V1, [rejected()], NEW)
    changes = [Change(V1, [rejected()], NEW), Change("dstack.vm.v2", [rejected()], NEW)]
    with pytest.raises(StoreClosed):
        await s.commit(changes)


async def test_version_equality_is_by_value() -> None:
    assert Version(3, b"x") == Version(3, b"x") and NEW == Version()


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """kill(SIGSTOP) returns before every thread of the target has stopped (group stop is
    asynchronous): wait until each of the server's threads is in state T, so the append below
    really goes to a server that cannot answer (once, under load, it still did)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(st in ("T", "t") for st in states):
            return
        assert time.monotonic() < deadline, f"nats-server not stopped: {states}"
        time.sleep(0.01)


async def test_an_unanswered_append_times_out_with_a_typed_error(
    store: EventStore, nats_server: NatsServer
) -> None:
    """A server that stops answering (SIGSTOP) fails the append after the store's timeout with a
    typed error; the append was sent, so once the server runs again it is there exactly once and
    a blind repeat conflicts (the caller re-folds instead of writing it twice)."""
    assert nats_server.proc is not None
    store.timeout, store.retries = 0.3, 0
    v = await store.append(V1, [rejected("before")], NEW)
    os.kill(nats_server.proc.pid, signal.SIGSTOP)
    try:
        _wait_stopped(nats_server.proc.pid)
        t = time.monotonic()
        with pytest.raises(StoreError, match=f"append to {V1} got no answer"):
            await store.append(V1, [rejected("stuck")], v)
        waited = time.monotonic() - t
        assert 0.3 <= waited < 1.5, waited
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    store.timeout = 5.0
    with pytest.raises(ConflictError):
        await store.append(V1, [rejected("stuck")], v)
    records, _ = await store.read_aggregate(V1)
    assert len(records) == 2 and b"stuck" in records[1].data


async def test_a_retry_after_a_lost_ack_returns_the_stored_sequence(
    store: EventStore, nats_server: NatsServer
) -> None:
    """The store's own retry resends the same bytes; the server stored the first try, so the
    retry is recognised as that append (one event, its sequence returned)."""
    assert nats_server.proc is not None
    store.timeout, store.retries = 0.3, 3
    v = await store.append(V1, [rejected("before")], NEW)
    os.kill(nats_server.proc.pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, os.kill, nats_server.proc.pid, signal.SIGCONT)
    try:
        landed = await store.append(V1, [rejected("retried")], v)
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    records, last = await store.read_aggregate(V1)
    assert len(records) == 2 and last == landed and b"retried" in records[1].data
