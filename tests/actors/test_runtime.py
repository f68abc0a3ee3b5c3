"""The actor runtime: malformed input, redelivery, graceful shutdown, metrics and logs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

import msgspec
import nats
import structlog
from structlog.testing import capture_logs

from pydstack.actors import ActorRunner, Delivery, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.metrics import sample
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.core.events import (
    Event,
    Signer,
    VmStartRequested,
    seal,
)

from .helpers import join, read_log, request, wait_decided, wait_for

FAST = RuntimeConfig(fetch_timeout_s=0.2, reconcile_interval_s=3600, nak_delay_s=0.1)


class FutureThing(Event, frozen=True, tag="FutureThing"):  # a type this version does not know
    x: int


class WrongShape(Event, frozen=True, tag="VmRequested"):  # known tag, body that does not fit
    vm_id: int


def _sealed(signer: Signer, event: Event, subj: str, eid: str) -> bytes:
    return seal(signer, event, subject=subj, event_id=eid, time_ns=1, correlation="c")


class Recorder:
    """A real actor that records what it is given; it fails each event's first delivery
    when ``flaky`` is set and sleeps ``pause`` seconds per event."""

    def __init__(self, name: str, flaky: bool = False, pause: float = 0.0) -> None:
        self.name = name
        self.subjects: Sequence[str] = ("dstack.vm.*",)
        self.flaky, self.pause = flaky, pause
        self.seen: list[tuple[int, int]] = []  # (seq, delivered)
        self.finished: list[int] = []
        self.lag_seen: list[float] = []

    async def handle(self, d: Delivery) -> None:
        self.seen.append((d.seq, d.delivered))
        self.lag_seen.append(sample("pydstack_actor_lag", {"actor": self.name}))
        if self.flaky and d.delivered == 1:
            raise RuntimeError("transient trouble")
        await asyncio.sleep(self.pause)
        self.finished.append(d.seq)

    async def reconcile(self) -> int:
        return 0


async def test_malformed_messages_are_logged_counted_and_do_not_stop_the_actor(
    store: EventStore, nats_server: NatsServer, signer: Signer
) -> None:
    name = "sched-malformed"
    await join(store, "h1")
    forger = Signer.from_private_bytes("forger", os.urandom(32))
    good = _sealed(forger, VmStartRequested(vm_id="x"), "dstack.vm.x", "e4")
    bad_sig = good[:-1] + bytes([good[-1] ^ 1])
    samples = {
        "not_msgpack": b"\xc1\xc1 this is not msgpack",
        "not_envelope": msgspec.msgpack.encode({"hello": "world"}),
        "unknown_type": _sealed(forger, FutureThing(x=1), "dstack.vm.x", "e1"),
        "bad_body": _sealed(forger, WrongShape(vm_id=5), "dstack.vm.x", "e2"),
        "subject_mismatch": _sealed(forger, VmStartRequested(vm_id="y"), "dstack.vm.y", "e3"),
        "bad_signature": bad_sig,
    }
    raw = await nats.connect(nats_server.url)
    js = raw.jetstream()
    seqs = {}
    for reason, data in samples.items():
        seqs[reason] = (await js.publish("dstack.vm.x", data)).seq
    before = {
        r: sample("pydstack_actor_malformed_total", {"actor": name, "reason": r}) for r in samples
    }
    scheduler = Scheduler(store, SchedulerConfig(name=name))
    with capture_logs() as logs:
        async with ActorRunner(store, scheduler, FAST) as runner:
            await wait_for(lambda: any(e.get("seq") == seqs["bad_signature"] for e in logs))
            await request(store, "after")  # handled by the consumer: reconcile is hours away
            await wait_decided(store, 1, timeout=10)
            assert runner._task is not None and not runner._task.done()
    await raw.close()
    for reason, seq in seqs.items():
        got = sample("pydstack_actor_malformed_total", {"actor": name, "reason": reason})
        assert got - before[reason] == 1, reason
        line = [
            e for e in logs if e.get("seq") == seq and e["event"] == "malformed message skipped"
        ]
        assert line and line[0]["reason"] == reason and line[0]["log_level"] == "warning"
    assert (await read_log(store)).state.vms["after"].state == "scheduled"
    # Terminated, not retried. Acks and terms are fire-and-forget publishes that the server's
    # consumer applies after it has answered an earlier info request, so a single read right
    # after the runner stopped can still see the last one pending (seen under full-suite load);
    # a message that was never terminated would stay pending for ack_wait (30 s), far longer.
    deadline = time.monotonic() + 10
    while (info := await store.js.consumer_info(store.stream, name)).num_ack_pending:
        assert time.monotonic() < deadline, f"still pending: {info.num_ack_pending}"
        await asyncio.sleep(0.05)
    assert info.num_redelivered == 0


async def test_a_failed_handler_is_redelivered_then_acked(store: EventStore) -> None:
    actor = Recorder("flaky-actor", flaky=True)
    errors = sample("pydstack_actor_errors_total", {"actor": actor.name, "kind": "handler"})
    await request(store, "a")
    async with ActorRunner(store, actor, FAST):
        await wait_for(lambda: actor.finished, timeout=10)
    seq = actor.finished[0]
    assert actor.seen == [(seq, 1), (seq, 2)]
    info = await store.js.consumer_info(store.stream, actor.name)
    assert info.ack_floor.stream_seq == seq  # acked after the second, successful delivery
    assert (
        sample("pydstack_actor_errors_total", {"actor": actor.name, "kind": "handler"})
        == errors + 1
    )
    assert sample("pydstack_actor_handled_total", {"actor": actor.name}) >= 1


async def test_stop_finishes_the_message_in_flight_and_acks_it(store: EventStore) -> None:
    actor = Recorder("slow-actor", pause=0.6)
    await request(store, "a")
    await request(store, "b")
    runner = ActorRunner(store, actor, RuntimeConfig(fetch_timeout_s=0.2, batch=10))
    async with runner:
        await wait_for(lambda: actor.seen, timeout=10)
        runner.stop()
        await asyncio.wait_for(runner.wait(), 3)
    assert actor.finished == [actor.seen[0][0]]  # the first one finished, the second not begun
    info = await store.js.consumer_info(store.stream, actor.name)
    assert info.ack_floor.stream_seq == actor.finished[0]  # it was acked before stopping
    # The unhandled one was handed back: a successor gets it now, not after ack_wait (30 s).
    successor = Recorder("slow-actor")
    async with ActorRunner(store, successor, FAST):
        await wait_for(lambda: successor.finished, timeout=5)
    assert successor.finished == [actor.finished[0] + 1]


async def test_cancelling_the_runner_still_finishes_the_message_in_flight(
    store: EventStore,
) -> None:
    actor = Recorder("cancelled-actor", pause=0.5)
    await request(store, "a")
    runner = ActorRunner(store, actor, FAST)
    task = asyncio.create_task(runner.run())
    await wait_for(lambda: actor.seen, timeout=10)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert actor.finished == [actor.seen[0][0]]


async def test_lag_gauge_counts_what_is_still_waiting(store: EventStore) -> None:
    actor = Recorder("lag-actor")
    for i in range(5):
        await request(store, f"v{i}")
    async with ActorRunner(store, actor, RuntimeConfig(fetch_timeout_s=0.2, batch=1)):
        await wait_for(lambda: len(actor.finished) == 5, timeout=10)
    # After the first of five was acked, four were still pending on the consumer.
    assert actor.lag_seen[1] == 4
    assert sample("pydstack_actor_lag", {"actor": actor.name}) == 0


async def test_reconcile_logs_one_summary_line_bound_to_the_actor(store: EventStore) -> None:
    await join(store, "h1")
    await request(store, "a")
    with capture_logs() as logs:
        async with ActorRunner(store, Scheduler(store, SchedulerConfig(name="sched-log")), FAST):
            await wait_decided(store, 1, timeout=10)
            await wait_for(lambda: any(e["event"] == "reconciled" for e in logs))
    summary = next(e for e in logs if e["event"] == "reconciled")
    assert summary["actor"] == "sched-log" and summary["acted"] == 1
    decision = next(e for e in logs if e["event"] == "vm scheduled")
    assert decision["vm_id"] == "a" and decision["cid"] == 1000 and decision["correlation"]


def test_configure_writes_json_lines(capsys: object) -> None:
    import io
    import json

    from pydstack.logs import configure

    out = io.StringIO()
    configure(json=True, stream=out)
    try:
        structlog.get_logger().bind(actor="t").info("hello", seq=3)
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["event"] == "hello" and line["seq"] == 3 and line["actor"] == "t"
    assert line["level"] == "info" and "timestamp" in line
