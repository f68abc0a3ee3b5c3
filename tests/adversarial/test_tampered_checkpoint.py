"""Attack: whoever can write the scheduler's checkpoint file (but not sign as the scheduler)
makes a full host look empty, so the next VM lands on it. Every spoiled file (an edited row, a
MAC forged with a guessed key, a valid-looking file whose chain head is not on the log, a
truncated file, a stale schema) is refused and rebuilt from the log: the decision stays the
honest one (the second VM is rejected, the host keeps one placement)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from msgspec.structs import replace
from structlog.testing import capture_logs

from pydstack.actors import Scheduler, SchedulerConfig
from pydstack.actors._placement_view import SCHEMA, PlacementView
from pydstack.actors._scheduler_checkpoint import checkpoint_key
from pydstack.actors.trust import Judge
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.sqlite import CheckpointFile, Snapshot
from pydstack.core.events import HostJoined, HostVmPlaced, VmRejected, VmRequested, VmResources
from pydstack.core.projections import Host, decide_placement

from ..actors.helpers import join, read_log, request
from ..policy.given import ADMIN, OPERATOR, SCHEDULER, STRANGER, VMM1
from .writers import forge, keyed_store, wanted

HOST = "h1"
CAPACITY = {"vcpu": 2, "memory_mb": 4096, "cid_count": 3}


def _forged(snap: Snapshot) -> Snapshot:
    """The snapshot with HOST emptied: no placements, nothing used."""
    host = msgspec.msgpack.decode(snap.rows["host"][HOST], type=Host)
    empty = replace(host, vcpu_used=0, memory_used_mb=0, placements={})
    rows = {**snap.rows, "host": {**snap.rows["host"], HOST: msgspec.msgpack.encode(empty)}}
    return Snapshot(snap.seq, snap.head_subject, snap.head_hash, rows)


def edit_row(path: Path, snap: Snapshot, key: bytes) -> None:
    with sqlite3.connect(path) as db:  # the MAC is left as it was
        db.execute("UPDATE rows SET data = ? WHERE kind = 'host' AND key = ?",
                   [_forged(snap).rows["host"][HOST], HOST])  # fmt: skip


def guessed_key(path: Path, snap: Snapshot, key: bytes) -> None:
    guess = hashlib.sha256(b"pydstack scheduler checkpoint\0").digest()  # no secret to start from
    CheckpointFile.open(path, actor="scheduler", schema=SCHEMA, key=guess).save(_forged(snap))


def head_not_on_log(path: Path, snap: Snapshot, key: bytes) -> None:
    # A file only the key holder could write (valid MAC) that names a head the log does not
    # hold, as a checkpoint of another log or of a stream since recreated would.
    f = _forged(snap)
    other = Snapshot(f.seq, f.head_subject, hashlib.sha256(b"another log").digest(), f.rows)
    CheckpointFile.open(path, actor="scheduler", schema=SCHEMA, key=key).save(other)


def truncated(path: Path, snap: Snapshot, key: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def stale_schema(path: Path, snap: Snapshot, key: bytes) -> None:
    CheckpointFile.open(path, actor="scheduler", schema=SCHEMA - 1, key=key).save(_forged(snap))


Tamper = Callable[[Path, Snapshot, bytes], None]


async def _scheduler(store: EventStore, path: Path) -> Scheduler:
    cfg = SchedulerConfig(name="scheduler", checkpoint=path, checkpoint_every_s=0)
    return Scheduler(store, cfg)


@pytest.mark.parametrize(
    "tamper", [edit_row, guessed_key, head_not_on_log, truncated, stale_schema],
    ids=lambda f: f.__name__,
)  # fmt: skip
async def test_a_spoiled_checkpoint_never_changes_a_decision(
    store: EventStore, tmp_path: Path, tamper: Tamper
) -> None:
    path = tmp_path / "scheduler.db"
    await join(store, HOST, **CAPACITY)
    await request(store, "v1", vcpu=2)
    first = await _scheduler(store, path)
    assert await first.reconcile() == 1  # v1 fills the host
    await first.catch_up()  # and the checkpoint now holds it
    assert first.checkpoint is not None
    first.checkpoint.close()
    key = checkpoint_key(store.signer)
    snap, _ = CheckpointFile.open(path, actor="scheduler", schema=SCHEMA, key=key).load()
    assert snap is not None
    held = msgspec.msgpack.decode(snap.rows["host"][HOST], type=Host)
    assert list(held.placements) == ["v1"]  # the checkpoint knows the host is full
    # Were the forged rows believed, the next 2-vCPU VM would be placed on the full host.
    forged = PlacementView.restored(snap.seq, _forged(snap).rows, first.config.defaults, True,
                                    Judge("probe"), store.anchor)  # fmt: skip
    ask = VmRequested(
        vm_id="v2", app_id="app", name="v2", resources=VmResources(vcpu=2, memory_mb=1024)
    )
    assert isinstance(decide_placement(forged.hosts, ask), HostVmPlaced)

    tamper(path, snap, key)
    await request(store, "v2", vcpu=2)
    second = await _scheduler(store, path)
    with capture_logs() as logs:
        await second.reconcile()
    refused = [e for e in logs if e["event"] == "checkpoint not used; folding the whole log"]
    assert refused and refused[0]["log_level"] == "warning", logs
    assert second.view.folded == await store.last_seq() - 1  # the whole log (less v2's outcome)
    log = await read_log(store)
    assert [type(d) for d in log.decisions["v2"]] == [VmRejected]
    assert [p.vm_id for p in log.placed[HOST]] == ["v1"]


async def test_an_intact_checkpoint_is_resumed_and_decides_the_same(
    store: EventStore, tmp_path: Path
) -> None:
    path = tmp_path / "scheduler.db"
    await join(store, HOST, **CAPACITY)
    await request(store, "v1", vcpu=2)
    first = await _scheduler(store, path)
    await first.reconcile()
    await first.catch_up()
    saved = first.view.cursor
    assert first.checkpoint is not None
    first.checkpoint.close()
    await request(store, "v2", vcpu=2)
    second = await _scheduler(store, path)
    await second.reconcile()
    assert second.view.folded < saved  # resumed: only the tail was read
    log = await read_log(store)
    assert [type(d) for d in log.decisions["v2"]] == [VmRejected]
    assert [p.vm_id for p in log.placed[HOST]] == ["v1"]


async def test_a_resumed_scheduler_judges_the_tail_with_the_keyring_it_checkpointed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # After the resume, a stranger (in no keyring) announces a roomy host: folded as a
    # pre-keyring event by a view that lost its keyring, it would take the next VM.
    url, path = nats_server.url, tmp_path / "scheduler.db"
    entries = wanted(OPERATOR, SCHEDULER, VMM1)
    async with keyed_store(url, SCHEDULER, entries) as store:
        async with await EventStore.connect(url, VMM1, anchor=ADMIN.public_key) as vmm:
            await join(vmm, HOST, **CAPACITY)
        async with await EventStore.connect(url, OPERATOR, anchor=ADMIN.public_key) as op:
            await request(op, "v1", vcpu=2)
            first = await _scheduler(store, path)
            assert await first.reconcile() == 1
            await first.catch_up()
            assert first.checkpoint is not None
            first.checkpoint.close()
            saved = first.view.cursor
            roomy = HostJoined(host_id="h9", vcpu=64, memory_mb=65536)
            await forge(url, STRANGER, "dstack.host.h9", roomy)
            await request(op, "v2", vcpu=2)
        second = await _scheduler(store, path)
        with capture_logs() as logs:
            await second.reconcile()
        assert any(e["event"] == "resumed from checkpoint" for e in logs), logs
        assert second.view.folded == 2 and second.view.cursor == saved + 2  # the tail only
        assert "h9" not in second.view.hosts
        log = await read_log(store)
        assert [type(d) for d in log.decisions["v2"]] == [VmRejected]
        assert "h9" not in log.placed
