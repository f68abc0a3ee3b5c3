"""Rebuild the VM read model from the log against a raw ordered-consumer read, same stream.

    python -m bench.replay [--quick]

Fills a stream with realistic VM lifecycles (1M events, 100k with --quick; the fill is not
measured), then reads the whole stream with a bare nats-py ordered consumer that only counts
messages, and rebuilds the SQLite read model from scratch with ``EventStore.read`` →
``ReadModel.apply_messages`` (decode, fold, batched upserts + checkpoint in one transaction).
Goal: rebuild >= 0.5x the raw read rate.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from pydstack.adapters.nats import EventStore, Recorded, StreamSettings
from pydstack.adapters.sqlite import ReadModel
from pydstack.core.events import (
    ALL_SUBJECTS,
    Event,
    HostHeartbeat,
    HostJoined,
    Signer,
    VmBootProgress,
    VmExited,
    VmRemoved,
    VmScheduled,
    VmStarted,
    VmStopped,
    VmStopRequested,
    message_hash,
    seal,
)
from pydstack.loop import run as run_loop

from ._common import bench_signer, emit, median, parse_quick, temp_server, vm_requested

BATCH = 5_000  # messages per read-model transaction
T0 = 1_700_000_000_000_000_000


def workload(n: int, hosts: int = 200) -> Iterator[tuple[str, Event]]:
    """(subject, event) pairs: hosts join, then VMs are requested, placed, booted, some stop."""
    rnd = random.Random(7)
    for h in range(hosts):
        yield f"dstack.host.h{h}", HostJoined(host_id=f"h{h}", address=f"10.0.{h // 250}.{h % 250}",
                                              vcpu=64, memory_mb=262_144)  # fmt: skip
    made, vm = hosts, 0
    while made < n:
        subj, vid, host = f"dstack.vm.vm-{vm:08d}", f"vm-{vm:08d}", f"h{rnd.randrange(hosts)}"
        life: list[Event] = [
            vm_requested(vm),
            VmScheduled(vm_id=vid, host=host, cid=1000 + vm % 1000),
            VmStarted(vm_id=vid, host=host, pid=10_000 + vm % 50_000),
            VmBootProgress(vm_id=vid, stage="kms", detail="keys received"),
            VmBootProgress(vm_id=vid, stage="done"),
        ]
        roll = rnd.random()
        if roll < 0.2:
            life += [VmStopRequested(vm_id=vid), VmStopped(vm_id=vid)]
        elif roll < 0.3:
            life += [
                VmExited(vm_id=vid, reason="guest shutdown", exit_code=0),
                VmRemoved(vm_id=vid),
            ]
        for e in life:
            yield subj, e
        made += len(life)
        if vm % 50 == 0:
            hh = rnd.randrange(hosts)
            yield f"dstack.host.h{hh}", HostHeartbeat(host_id=f"h{hh}")
            made += 1
        vm += 1


def sealed(n: int, signer: Signer) -> Iterator[tuple[str, bytes]]:
    """The workload as stored messages: signed envelopes, hash-chained per subject."""
    heads: dict[str, bytes] = {}
    for i, (subj, event) in enumerate(workload(n)):
        if i >= n:
            return
        data = seal(signer, event, subject=subj, event_id=f"{i:032x}", time_ns=T0 + i,
                    correlation=f"c{i // 8}", prev=heads.get(subj, b""))  # fmt: skip
        heads[subj] = message_hash(data)
        yield subj, data


async def fill(nc: Client, store: EventStore, n: int) -> float:
    """Publish n sealed events pipelined (publish_async); returns seconds taken."""
    js = nc.jetstream(timeout=30, publish_async_max_pending=8_000)
    t = time.perf_counter()
    futs = []
    for subj, data in sealed(n, bench_signer("filler")):
        futs.append(await js.publish_async(subj, data))
        if len(futs) >= 20_000:
            await asyncio.gather(*futs)
            futs.clear()
    await asyncio.gather(*futs)
    last = await store.last_seq()
    if last != n:
        raise SystemExit(f"fill stored {last} events, expected {n}")
    return time.perf_counter() - t


async def raw_read(nc: Client, n: int) -> float:
    """A bare ordered consumer over the whole stream, counting messages; events/s."""
    js = nc.jetstream()
    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    t = time.perf_counter()
    sub = await js.subscribe(ALL_SUBJECTS, ordered_consumer=True, config=cfg,
                             pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)  # fmt: skip
    count = 0
    while count < n:
        await sub.next_msg(timeout=10)
        count += 1
    await sub.unsubscribe()
    return n / (time.perf_counter() - t)


async def rebuild(store: EventStore, db: Path, n: int) -> float:
    """Our rebuild of the read model from scratch; events/s."""
    await asyncio.to_thread(db.unlink, missing_ok=True)
    t = time.perf_counter()
    with ReadModel.open(db) as rm:
        batch: list[Recorded] = []
        async for rec in store.read():
            batch.append(rec)
            if len(batch) >= BATCH:
                rm.apply_messages(batch)
                batch = []
        if batch:
            rm.apply_messages(batch)
        got = rm.position()
        vms = rm.db.execute("SELECT count(*) FROM vms").fetchone()[0]
    if got != n or not vms:
        raise SystemExit(f"rebuild stopped at {got} of {n} events ({vms} VMs)")
    return n / (time.perf_counter() - t)


async def run(n: int, rounds: int) -> tuple[list[float], list[float], float]:
    raw_eps: list[float] = []
    ours_eps: list[float] = []
    async with temp_server() as server:
        nc = await nats.connect(server.url)
        settings = StreamSettings(duplicate_window_s=10)
        store = await EventStore.connect(server.url, bench_signer("reader"), settings=settings)
        async with store:
            await store.ensure_stream()
            fill_s = await fill(nc, store, n)
            print(f"filled {n} events in {fill_s:.1f} s (not measured)", flush=True)
            with tempfile.TemporaryDirectory(prefix="pydstack-replay-") as tmp:
                db = Path(tmp) / "readmodel.db"
                await raw_read(nc, min(n, 20_000))  # warm up
                for _ in range(rounds):
                    raw_eps.append(await raw_read(nc, n))
                    ours_eps.append(await rebuild(store, db, n))
                    print(f"  raw {raw_eps[-1]:10.0f} ev/s   rebuild {ours_eps[-1]:10.0f} ev/s",
                          flush=True)  # fmt: skip
        await nc.close()
    return raw_eps, ours_eps, fill_s


def main() -> None:
    quick = parse_quick(__doc__)
    n, rounds = (100_000, 2) if quick else (1_000_000, 3)
    raw_eps, ours_eps, _ = run_loop(run(n, rounds))  # the control plane's loop, both sides
    raw, ours = median(raw_eps), median(ours_eps)
    print(f"raw ordered-consumer read  {raw:10.0f} ev/s")
    print(f"rebuild VM read model      {ours:10.0f} ev/s   ratio {ours / raw:.2f} (goal >= 0.5)")
    emit({"ratio": ours / raw, "ours_eps": ours, "raw_eps": raw, "events": n})


if __name__ == "__main__":
    main()
