"""A replicated stream survives kill -9 of a node: each acknowledged event is there once, in order.

A writer appends continuously (OCC-guarded, hash-chained, some atomic two-event batches) while
one node of three is killed with SIGKILL and later restarted on the same data dir. Afterwards
each node is read on its own and must hold the same, complete, gap-free log.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import pytest

from pydstack.adapters.nats import (
    NEW,
    EventStore,
    NatsCluster,
    StoreError,
    StreamSettings,
    Version,
    new_event_id,
    read_node,
)
from pydstack.core.events import (
    Signer,
    VmBootProgress,
    message_hash,
    open_envelope,
    verify,
)
from pydstack.core.events import subject as subject_of

pytestmark = pytest.mark.slow

STREAM = "DSTACK"


@dataclass
class Acks:
    """What the server acknowledged: (subject, event id, stream seq), in ack order."""

    acked: list[tuple[str, str, int]] = field(default_factory=list)
    errors: int = 0

    def count(self) -> int:
        return len(self.acked)


async def _writer(store: EventStore, subjects: list[str], acks: Acks, stop: asyncio.Event) -> None:
    versions: dict[str, Version] = dict.fromkeys(subjects, NEW)
    n = 0
    while not stop.is_set():
        subj = subjects[n % len(subjects)]
        n += 1
        size = 2 if n % 7 == 0 else 1  # now and then an atomic multi-event append
        ids = [new_event_id() for _ in range(size)]
        events = [
            VmBootProgress(vm_id=subj.rsplit(".", 1)[1], stage=f"s{n}.{i}") for i in range(size)
        ]
        try:
            v = await store.append(subj, events, versions[subj], event_ids=ids)
        except StoreError:
            # Timed out (the event may or may not be stored) or conflicted with such an event:
            # learn the aggregate's real version and go on. Followers may lag, so retry later.
            acks.errors += 1
            await asyncio.sleep(0.05)
            last = await _last(store, subj)
            if last is not None:
                versions[subj] = last
            continue
        for i, eid in enumerate(ids):
            acks.acked.append((subj, eid, v.seq - size + 1 + i))
        versions[subj] = v


async def _last(store: EventStore, subj: str) -> Version | None:
    try:
        rec = await store.last_by_subject(subj)
    except (StoreError, TimeoutError, Exception):
        return None
    return NEW if rec is None else Version(rec.seq, message_hash(rec.data))


async def _wait_progress(acks: Acks, more: int, timeout: float) -> None:
    target = acks.count() + more
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while acks.count() < target:
        assert loop.time() < deadline, f"writers stalled at {acks.count()} acks (wanted {target})"
        await asyncio.sleep(0.05)


async def _stream_leader(store: EventStore) -> str:
    info = await store.js.stream_info(STREAM)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


def _check_log(msgs: list[tuple[int, str, bytes]], acks: Acks) -> None:
    seqs = [s for s, _, _ in msgs]
    assert seqs == list(range(1, len(msgs) + 1)), "stream sequences have gaps or are out of order"
    by_seq = {s: (subj, data) for s, subj, data in msgs}
    ids: dict[str, int] = {}
    heads: dict[str, bytes] = {}
    for seq, subj, data in msgs:
        env = verify(data)  # signature intact
        assert env.subject == subj
        assert env.id not in ids, f"event {env.id} stored twice (seq {ids[env.id]} and {seq})"
        ids[env.id] = seq
        assert env.prev == heads.get(subj, b""), f"hash chain of {subj} broken at seq {seq}"
        heads[subj] = message_hash(data)
    last_seq: dict[str, int] = {}
    for subj, eid, seq in acks.acked:
        assert seq in by_seq, f"acknowledged seq {seq} ({subj} {eid}) is missing"
        stored_subj, data = by_seq[seq]
        assert (stored_subj, open_envelope(data).id) == (subj, eid), (
            f"seq {seq} holds another event"
        )
        assert seq > last_seq.get(subj, 0), f"{subj}: acknowledged events out of order"
        last_seq[subj] = seq


async def _node_log(url: str) -> list[tuple[int, str, bytes]]:
    msgs = await read_node(url, STREAM)
    return [(int((m.headers or {})["Nats-Sequence"]), (m.headers or {})["Nats-Subject"], m.data)
            for m in msgs]  # fmt: skip


@pytest.mark.parametrize("victim", ["follower", "leader"])
async def test_kill_one_node_keeps_every_acknowledged_event(
    nats_cluster: NatsCluster, victim: str
) -> None:
    """kill -9 a stream follower or the leader under load, restart it: no ack lost or doubled."""
    signer = Signer.from_private_bytes("cluster-writer", os.urandom(32))
    store = await EventStore.connect(
        nats_cluster.url, signer, settings=StreamSettings(name=STREAM, replicas=3)
    )
    store.timeout = 2.0
    async with store:
        await store.ensure_stream()
        leader = await _stream_leader(store)
        li = nats_cluster.index_of(leader)
        target = li if victim == "leader" else (li + 1) % 3

        acks, stop = Acks(), asyncio.Event()
        groups = [[subject_of("vm", f"w{w}-{k}") for k in range(4)] for w in range(6)]
        writers = [asyncio.create_task(_writer(store, g, acks, stop)) for g in groups]
        try:
            await _wait_progress(acks, 300, timeout=15)
            nats_cluster.kill(target)
            before_restart = acks.count()
            await asyncio.sleep(1.5)  # a real outage window, not just the first failed publish
            await _wait_progress(acks, 300, timeout=25)  # the survivors keep accepting appends
            await nats_cluster.restart(target)
            await _wait_progress(acks, 300, timeout=15)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert acks.count() > before_restart
        print(f"victim={victim} acked={acks.count()} append errors={acks.errors}")

        states = await nats_cluster.wait_converged(STREAM, timeout=20)
        logs = [await _node_log(u) for u in nats_cluster.urls]
        assert len(logs[0]) == states[0].messages
        for i, log in enumerate(logs):
            assert log == logs[0], f"node {i} differs from node 0"
        _check_log(logs[0], acks)

    # The restarted node alone (the others down) still serves the whole log from its own disk.
    for i in range(3):
        if i != target:
            nats_cluster.kill(i)
    assert await _isolated_log(nats_cluster, target) == logs[0]


async def _isolated_log(cluster: NatsCluster, i: int) -> list[tuple[int, str, bytes]]:
    # A follower that lost its leader stops serving direct gets for a moment, then resumes.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        await cluster.wait_serves_direct(i, STREAM)
        try:
            return await _node_log(cluster.urls[i])
        except StoreError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
