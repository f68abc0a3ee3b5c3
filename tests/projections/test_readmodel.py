import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from projections_given import Message, request, seal_all, stamp, workload

from pydstack.adapters.sqlite import SCHEMA, ReadModel
from pydstack.core.events import AppRegistered, KeyRequested, VmRequested
from pydstack.core.events.catalogue import AnyEvent
from pydstack.core.projections import Applied, fold

EVENTS = workload(3_000, hosts=5)


def dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, in primary-key order."""
    conn = sqlite3.connect(path)
    try:
        tables = ["apps", "vms", "hosts", "checkpoints"]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


def build(path: Path, events: list[AnyEvent], batch: int = 500) -> None:
    records = stamp(events)
    with ReadModel.open(path) as rm:
        for i in range(0, len(records), batch):
            rm.apply_batch(records[i : i + batch])


def test_open_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    with ReadModel.open(path) as rm:
        rm.apply_batch(stamp(EVENTS[:10]))
    with ReadModel.open(path) as rm:
        assert rm.position() == 10
        assert rm.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rows_match_the_pure_fold(tmp_path: Path) -> None:
    build(tmp_path / "rm.db", EVENTS)
    with ReadModel.open(tmp_path / "rm.db") as rm:
        assert rm.snapshot() == fold(stamp(EVENTS))


def test_rebuild_after_deleting_the_file_gives_identical_rows(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    build(path, EVENTS, batch=777)
    first = dump(path)
    for f in tmp_path.iterdir():
        f.unlink()
    build(path, EVENTS, batch=5000)
    assert dump(path) == first
    assert first["checkpoints"] == [("main", len(EVENTS), SCHEMA)]


def test_redelivered_events_are_no_ops(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    records = stamp(EVENTS)
    with ReadModel.open(path) as rm:
        rm.apply_batch(records[:2000])
        before = dump(path)
        got = rm.apply_batch(records[1500:2000])
        assert (got.applied, got.redelivered, got.position) == (0, 500, 2000)
        assert dump(path) == before
        got = rm.apply_batch(records[1900:])
        assert (got.redelivered, got.applied + got.ignored) == (100, len(EVENTS) - 2000)
    assert dump(path) == dump_of_one_batch(tmp_path / "one.db")


def dump_of_one_batch(path: Path) -> dict[str, list[tuple[object, ...]]]:
    build(path, EVENTS, batch=len(EVENTS))
    return dump(path)


def test_exception_mid_batch_leaves_rows_and_checkpoint_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    records = stamp(EVENTS)
    with ReadModel.open(path) as rm:
        rm.apply_batch(records[:1000])
        before = dump(path)

        def broken() -> Iterator[Applied]:
            yield from records[1000:1500]
            raise RuntimeError("consumer lost")

        with pytest.raises(RuntimeError):
            rm.apply_batch(broken())
        assert dump(path) == before
        assert rm.position() == 1000


def test_failed_checkpoint_write_rolls_back_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    records = stamp(EVENTS)
    with ReadModel.open(path) as rm:
        rm.apply_batch(records[:1000])
        before = dump(path)
        # The rows of the batch are written first; make the checkpoint update after them fail.
        rm.db.execute(
            "CREATE TRIGGER no_ckpt BEFORE UPDATE ON checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            rm.apply_batch(records[1000:1500])
        assert dump(path) == before
        rm.db.execute("DROP TRIGGER no_ckpt")
        rm.apply_batch(records[1000:])
    assert dump(path) == dump_of_one_batch(tmp_path / "one.db")


def test_messages_are_decoded_and_bad_ones_still_advance_the_checkpoint(tmp_path: Path) -> None:
    events: list[AnyEvent] = [
        AppRegistered(app_id="a1", compose_hash="h1"),
        KeyRequested(request_id="r1", app_id="a1"),
        request("v1"),
    ]
    msgs = seal_all(events)
    msgs.insert(1, Message(99, b"\x00" * 200))  # garbage: not an envelope
    msgs = [Message(i, m.data, subject=m.subject) for i, m in enumerate(msgs, 1)]
    msgs.append(Message(5, msgs[0].data, subject=msgs[0].subject))  # an app event repeated
    with ReadModel.open(tmp_path / "rm.db") as rm:
        got = rm.apply_messages(msgs)
        assert (got.applied, got.ignored, got.malformed, got.position) == (3, 1, 1, 5)
        vm = rm.get_vm("v1")
        assert vm is not None and vm.state == "requested" and vm.seq == 4
        assert rm.apply_messages(msgs).redelivered == 5


def test_queries_filter_by_host_app_and_state(tmp_path: Path) -> None:
    build(tmp_path / "rm.db", EVENTS)
    expected = fold(stamp(EVENTS))
    with ReadModel.open(tmp_path / "rm.db") as rm:
        vms = rm.list_vms(host="h001", state="running")
        assert vms and all(v.host == "h001" and v.state == "running" for v in vms)
        assert [v.vm_id for v in vms] == sorted(
            k for k, v in expected.vms.items() if v.host == "h001" and v.state == "running"
        )
        assert {v.app_id for v in rm.list_vms(app="a007")} == {"a007"}
        assert rm.get_vm(vms[0].vm_id) == vms[0]
        assert rm.get_vm("nope") is None
        assert len(rm.list_apps()) == 100
        assert rm.get_app("a001") == expected.apps["a001"]
        hosts = rm.list_hosts()
        assert [h.host_id for h in hosts] == [f"h{i:03}" for i in range(5)]
        assert rm.get_host("h002") == expected.hosts["h002"]
        assert all(h.vcpu_used <= h.vcpu for h in hosts)


def test_file_of_another_schema_is_emptied_for_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "rm.db"
    build(path, EVENTS[:100])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE checkpoints SET schema = -1")
    conn.commit()
    conn.close()
    with ReadModel.open(path) as rm:
        assert rm.position() == 0
        assert rm.list_vms() == [] and rm.list_hosts() == []


def test_reset_forgets_everything(tmp_path: Path) -> None:
    with ReadModel.open(tmp_path / "rm.db") as rm:
        rm.apply_batch(stamp(EVENTS[:100]))
        rm.reset()
        assert rm.position() == 0 and rm.list_hosts() == []


def test_rebuild_is_fast(tmp_path: Path) -> None:
    """Fold + write path: above 100k events/s of CPU time on a developer machine; CI gets slack.

    CPU time, not wall time, so that other jobs on a shared runner do not make it flaky."""
    events = workload(60_000, hosts=50)
    records = stamp(events)
    with ReadModel.open(tmp_path / "rm.db") as rm:
        t = time.process_time()
        for i in range(0, len(records), 10_000):
            rm.apply_batch(records[i : i + 10_000])
        rate = len(records) / (time.process_time() - t)
    print(f"rebuild: {rate:,.0f} events/s")
    assert rate > 30_000


def test_unknown_vm_request_field_values_round_trip(tmp_path: Path) -> None:
    req = VmRequested(
        vm_id="v1",
        app_id="a1",
        name="n",
        resources=request().resources,
        encrypted_env=b"\x01\x02",
        host="h1",
    )
    with ReadModel.open(tmp_path / "rm.db") as rm:
        rm.apply_batch(stamp([req]))
        vm = rm.get_vm("v1")
        assert vm is not None and (vm.encrypted_env, vm.pinned_host) == (b"\x01\x02", "h1")


def test_read_model_can_be_used_from_another_thread(tmp_path: Path) -> None:
    import threading

    rm = ReadModel.open(tmp_path / "rm.db")
    worker = threading.Thread(target=rm.apply_batch, args=(stamp(EVENTS[:50]),))
    worker.start()
    worker.join()
    assert rm.position() == 50
    rm.close()
