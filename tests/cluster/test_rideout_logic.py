"""Riding out an election: the backoff policy, and retried appends landing exactly once.

The store's retries resend the same sealed bytes and message ids. A try that was stored but
whose ack was lost (what a leader dying between storing and acking does) must be recognised,
not stored again and not reported as a conflict; a place really taken by another writer must
still be a conflict. Faults are injected on the client side of a real nats-server: a try
"lost" never reaches the server, an "ack_lost" try is stored and then its ack is dropped.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydstack.adapters.nats.store as store_module
from pydstack.adapters.nats import (
    NEW,
    Change,
    ConflictError,
    EventStore,
    NatsServer,
    NatsServerConfig,
    NoLeader,
    StreamMissing,
    StreamSettings,
    Version,
    _wire,
    riding_out,
)
from pydstack.adapters.nats._rideout import MIN_TRY_S
from pydstack.core.events import Signer, VmBootProgress, open_envelope
from pydstack.core.retry import Backoff

T = TypeVar("T")
FAST = Backoff(deadline_s=5.0, first_s=0.01, cap_s=0.05)


# -- the policy ---------------------------------------------------------------------------------

backoffs = st.builds(
    Backoff,
    deadline_s=st.floats(0, 120),
    first_s=st.floats(0.001, 1),
    factor=st.floats(1, 4),
    cap_s=st.floats(1, 5),
)


@given(backoffs, st.lists(st.floats(0, 3), min_size=1, max_size=200))
def test_backoff_never_sleeps_past_the_deadline(b: Backoff, try_times: list[float]) -> None:
    """However long each try takes, the sleeps stop at the deadline: the last try starts by
    then, and every sleep is positive and at most the cap."""
    elapsed, attempt = 0.0, 0
    for took in try_times:
        elapsed += took
        attempt += 1
        delay = b.delay(attempt, elapsed)
        if delay is None:
            assert elapsed >= b.deadline_s
            return
        assert 0 < delay <= b.cap_s
        assert elapsed + delay <= b.deadline_s + 1e-9
        elapsed += delay


@given(backoffs, st.integers(1, 10_000))
def test_backoff_grows_until_capped(b: Backoff, attempt: int) -> None:
    """Far from the deadline, each delay is at least the one before (no overflow either)."""
    far = Backoff(1e9, b.first_s, b.factor, b.cap_s)
    now, before = far.delay(attempt + 1, 0), far.delay(attempt, 0)
    assert now is not None and before is not None and now >= before


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="cap"):
        Backoff(deadline_s=10, first_s=2, cap_s=1)
    with pytest.raises(ValueError, match="attempt"):
        Backoff(10).delay(0, 0)


# -- lost acks on a real server ----------------------------------------------------------------


def _event(stage: str) -> VmBootProgress:
    return VmBootProgress(vm_id="v", stage=stage)


def _inject(store: EventStore, faults: list[str], seen: list[str]) -> None:
    """Make the store's tries suffer `faults` in order (then succeed); `seen` records them."""
    real = store._send

    async def send(subject: str, data: bytes, headers: dict[str, str]) -> int:
        fault = faults[len(seen)] if len(seen) < len(faults) else "ok"
        seen.append(fault)
        if fault == "lost":
            raise nats.errors.TimeoutError
        seq = await real(subject, data, headers)
        if fault == "ack_lost":
            raise nats.errors.TimeoutError
        return seq

    store._send = send  # type: ignore[method-assign]  # fault injection on the client side


async def _ids_on(store: EventStore, subject: str) -> list[str]:
    history, _ = await store.read_aggregate(subject)
    return [open_envelope(r.data).id for r in history]


async def test_append_whose_ack_was_lost_lands_once(store: EventStore) -> None:
    """Stored, ack lost, retried: one event on the log and the caller gets its sequence."""
    seen: list[str] = []
    _inject(store, ["ack_lost"], seen)
    with riding_out(FAST):
        v = await store.append("dstack.vm.v", [_event("a")], NEW, event_ids=["id-a"])
    # The retry was refused (the subject moved past 0: nats-server checks the expected sequence
    # before de-duplicating) and recognised as our own append.
    assert seen == ["ack_lost", "ok"]
    assert await _ids_on(store, "dstack.vm.v") == ["id-a"]
    assert v.seq == 1


async def test_own_landed_append_is_recognised_after_another_writer(
    store: EventStore, signer: Signer
) -> None:
    """Our try landed, then someone else appended, then our retry arrives: still ours (the
    first message after our expected sequence), not a conflict, and not stored twice."""
    other = EventStore(
        store.nc, store.js, Signer.from_private_bytes("other", os.urandom(32)), store.url
    )
    real = store._send

    async def send(subject: str, data: bytes, headers: dict[str, str]) -> int:
        seq = await real(subject, data, headers)
        if seq == 1:  # ours landed; before its ack arrives, another writer follows on
            await other.append(subject, [_event("theirs")], 1)
            raise nats.errors.TimeoutError
        return seq

    store._send = send  # type: ignore[method-assign]
    with riding_out(FAST):
        v = await store.append("dstack.vm.v", [_event("ours")], NEW, event_ids=["ours"])
    assert v.seq == 1
    assert (await _ids_on(store, "dstack.vm.v"))[0] == "ours"
    assert len(await _ids_on(store, "dstack.vm.v")) == 2


@pytest.mark.parametrize("others_follow", [False, True])
async def test_atomic_batch_whose_ack_was_lost_lands_once(
    store: EventStore, monkeypatch: pytest.MonkeyPatch, others_follow: bool
) -> None:
    """A two-aggregate commit stored with its ack lost (and, before the retry, maybe another
    writer appending to both aggregates): the retry returns the stored versions."""
    real = _wire.request
    dropped: list[int] = []
    a, b = "dstack.vm.a", "dstack.vm.b"
    other = EventStore(
        store.nc, store.js, Signer.from_private_bytes("o", os.urandom(32)), store.url
    )

    async def request(*args: Any, **kw: Any) -> Any:
        reply = await real(*args, **kw)
        headers = args[4] if len(args) > 4 else kw.get("headers")
        if headers and "Nats-Batch-Commit" in headers and not dropped:
            dropped.append(1)
            if others_follow:
                await other.append(a, [_event("theirs")], 1)
                await other.append(b, [_event("theirs")], 2)
            raise nats.errors.TimeoutError
        return reply

    monkeypatch.setattr(store_module, "request", request)
    with riding_out(FAST):
        out = await store.commit(
            [Change(a, [_event("1")], NEW, ["ea"]), Change(b, [_event("2")], NEW, ["eb"])]
        )
    assert dropped == [1]
    assert (await _ids_on(store, a))[0] == "ea" and (await _ids_on(store, b))[0] == "eb"
    assert (out[a].seq, out[b].seq) == (1, 2)
    assert await store.last_seq() == (4 if others_follow else 2)


async def test_an_expected_sequence_past_the_subject_is_a_conflict_at_once(
    store: EventStore,
) -> None:
    """Nothing after our expected sequence because the subject never got there (not a replica
    lagging the leader): a conflict at once, not a wait for a leader."""
    await store.append("dstack.vm.v", [_event("a")], NEW)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with riding_out(Backoff(deadline_s=10)), pytest.raises(ConflictError):
        await store.append("dstack.vm.v", [_event("b")], Version(99, b"h"))
    assert loop.time() - t0 < 1


async def test_no_leader_until_the_deadline_is_one_line(store: EventStore) -> None:
    """Every try unanswered: `NoLeader` once the deadline passes, nothing stored."""
    _inject(store, ["lost"] * 1000, [])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with riding_out(Backoff(deadline_s=0.5, first_s=0.05, cap_s=0.1)), pytest.raises(NoLeader) as e:
        await store.append("dstack.vm.v", [_event("a")], NEW)
    assert 0.5 <= loop.time() - t0 < 3
    assert "still has no leader after 0.5 s" in str(e.value) and "\n" not in str(e.value)
    assert await store.last_seq() == 0


async def test_a_missing_stream_is_said_at_once_not_waited_for(
    nats_server: NatsServer, signer: Signer
) -> None:
    """No responders because the stream does not exist (not an election): `StreamMissing`
    within a second for a read, an append and an atomic append, even inside `riding_out`."""
    async with await EventStore.connect(nats_server.url, signer) as s:
        loop = asyncio.get_running_loop()
        with riding_out(Backoff(deadline_s=10)):
            for call in (
                lambda: s.read_aggregate("dstack.vm.v"),
                lambda: s.append("dstack.vm.v", [_event("a")], NEW),
                lambda: s.commit([Change("dstack.vm.a", [_event("a")], NEW),
                                  Change("dstack.vm.b", [_event("b")], NEW)]),
            ):  # fmt: skip
                t0 = loop.time()
                with pytest.raises(StreamMissing):
                    await call()
                assert loop.time() - t0 < 1


async def test_no_server_at_all_is_named_when_the_wait_runs_out(
    nats_server: NatsServer, store: EventStore
) -> None:
    """The only server gone: the one-line error says no server answers, not just "no leader",
    and comes about when the deadline says, not a whole try's timeout (5 s) later."""
    await nats_server.stop()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with riding_out(Backoff(deadline_s=0.5)), pytest.raises(NoLeader) as e:
        await store.append("dstack.vm.v", [_event("a")], NEW)
    assert f"no NATS server of {store.url} answers" in str(e.value)
    assert loop.time() - t0 < 0.5 + MIN_TRY_S + 0.5


# -- any schedule of faults: exactly once, or a real conflict ----------------------------------


class _LoopThread:
    """One event loop in a thread, so hypothesis' synchronous examples can await the store."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_LoopThread, NatsServer]]:
    lt = _LoopThread()
    server = NatsServer(NatsServerConfig(data_dir=Path(tmp_path_factory.mktemp("rideout"))))
    lt.run(server.start())
    try:
        yield lt, server
    finally:
        lt.run(server.stop())
        lt.close()


async def _schedule(
    server: NatsServer, faults: list[str], rival_before: int
) -> tuple[str, list[str], str]:
    """Append one event under `faults`, a rival appending to the same aggregate just before
    try number `rival_before` (0-based; past the end: never). Returns (outcome, ids on the
    log, our id)."""
    subj = f"dstack.vm.{uuid.uuid4().hex}"
    ours = uuid.uuid4().hex
    signer = Signer.from_private_bytes("w", os.urandom(32))
    async with await EventStore.connect(server.url, signer, settings=StreamSettings()) as s:
        await s.ensure_stream()
        rival = EventStore(s.nc, s.js, Signer.from_private_bytes("rival", os.urandom(32)), s.url)
        seen: list[str] = []
        _inject(s, faults, seen)
        faulty = s._send

        async def send(subject: str, data: bytes, headers: dict[str, str]) -> int:
            if len(seen) == rival_before:
                last = await s.last_by_subject(subj)
                await rival.append(subj, [_event("rival")], last.seq if last else 0)
            return await faulty(subject, data, headers)

        s._send = send  # type: ignore[method-assign]
        try:
            with riding_out(FAST):
                await s.append(subj, [_event("ours")], NEW, event_ids=[ours])
            outcome = "appended"
        except ConflictError:
            outcome = "conflict"
        return outcome, await _ids_on(s, subj), ours


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(["lost", "ack_lost", "ok"]), min_size=1, max_size=5),
    st.integers(0, 6),
)
def test_any_fault_schedule_stores_once_or_conflicts(
    shared: tuple[_LoopThread, NatsServer], faults: list[str], rival_before: int
) -> None:
    """Ours is stored exactly once iff a try of ours reached the slot before the rival; else
    the append is a conflict and ours is not on the log at all."""
    lt, server = shared
    faults = faults[: faults.index("ok") + 1] if "ok" in faults else faults
    outcome, ids, ours = lt.run(_schedule(server, faults, rival_before))
    stored_try = next((i for i, f in enumerate(faults) if f != "lost"), len(faults))
    we_won = stored_try < rival_before
    assert ids.count(ours) == (1 if we_won else 0)
    assert outcome == ("appended" if we_won else "conflict")
    if we_won:
        assert ids[0] == ours  # in the place it was decided for
