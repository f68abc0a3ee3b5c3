"""Live catch-up: how fast a running actor consumes a burst, against a raw ordered consumer.

    python -m bench.catchup [--quick]

Starts an ``ActorRunner`` whose actor only counts (so the figure is the runtime's own cost:
fetch, decode, signature check, write policy, ack), appends a burst of realistic VM-lifecycle
events (``bench.replay``'s workload, signed, pipelined) while it runs, and times from the first
append until the actor has handled them all. Then reads the same stream with a bare nats-py
ordered consumer that only counts. Signature verification is on. Goal (issue 18): ``ratio``
(actor / raw) >= 0.2.

Then the scheduler's start-up on that log: a fold of the whole log (``scheduler_full_s``,
which also writes its checkpoint), and after a tail of 1,000 more events a new scheduler
resuming from the checkpoint (``scheduler_resume_s``).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats
from nats.aio.client import Client

from pydstack.actors import Scheduler, SchedulerConfig
from pydstack.actors.runtime import ActorRunner, Delivery, RuntimeConfig
from pydstack.adapters.nats import EventStore, StreamSettings
from pydstack.core.events import HostHeartbeat, kind_filter, seal
from pydstack.loop import run as run_loop

from ._common import bench_signer, emit, parse_quick, temp_server
from .replay import fill, raw_read


class Counter:
    """An actor that handles every VM and host event by counting it."""

    name = "catchup-count"
    subjects: Sequence[str] = (kind_filter("vm"), kind_filter("host"))

    def __init__(self, want: int) -> None:
        self.seen = 0
        self.want = want
        self.done = asyncio.Event()

    async def handle(self, delivery: Delivery) -> None:
        self.seen += 1
        if self.seen >= self.want:
            self.done.set()

    async def reconcile(self) -> int:
        return 0


async def scheduler_start(nc: Client, store: EventStore, tail: int) -> tuple[float, float]:
    """Seconds to a caught-up scheduler: folding the whole log, then resuming after ``tail``."""
    with tempfile.TemporaryDirectory(prefix="pydstack-catchup-") as tmp:
        cfg = SchedulerConfig(checkpoint=Path(tmp) / "scheduler.db", checkpoint_every_s=0)
        t = time.perf_counter()
        full = Scheduler(store, cfg)
        await full.catch_up()
        full_s = time.perf_counter() - t
        js = nc.jetstream()
        for i in range(tail):  # heartbeats of the workload's hosts
            subj, hb = f"dstack.host.h{i % 200}", HostHeartbeat(host_id=f"h{i % 200}")
            data = seal(store.signer, hb, subject=subj, event_id=f"tail{i}", time_ns=i,
                        correlation="tail")  # fmt: skip
            await js.publish_async(subj, data)
        await js.publish_async_completed()
        t = time.perf_counter()
        resumed = Scheduler(store, cfg)
        await resumed.catch_up()
        resume_s = time.perf_counter() - t
        await full.catch_up()
        if resumed.view.folded != tail or resumed.view.rows() != full.view.rows():
            raise SystemExit("the resumed scheduler's view differs from a full fold")
        return full_s, resume_s


async def run(n: int) -> tuple[float, float, float, float]:
    async with temp_server() as server:
        nc = await nats.connect(server.url)
        settings = StreamSettings(duplicate_window_s=10)
        store = await EventStore.connect(server.url, bench_signer("reader"), settings=settings)
        async with store:
            await store.ensure_stream()
            actor = Counter(n)
            async with ActorRunner(store, actor, RuntimeConfig(reconcile_interval_s=3600)):
                await asyncio.sleep(0.2)  # the consumer exists before the burst
                t = time.perf_counter()
                fill_s = await fill(nc, store, n)
                print(f"burst of {n} appended in {fill_s:.1f} s", flush=True)
                await asyncio.wait_for(actor.done.wait(), timeout=600)
                actor_eps = n / (time.perf_counter() - t)
            raw_eps = await raw_read(nc, n)
            full_s, resume_s = await scheduler_start(nc, store, 1_000)
        await nc.close()
    return actor_eps, raw_eps, full_s, resume_s


def main() -> None:
    from pydstack.logs import configure

    quick = parse_quick(__doc__)
    configure(level="warning")  # a debug line per event would be what is measured
    n = 20_000 if quick else 300_000
    actor_eps, raw_eps, full_s, resume_s = run_loop(run(n))
    print(f"actor (counting) catch-up  {actor_eps:10.0f} ev/s")
    print(f"raw ordered-consumer read  {raw_eps:10.0f} ev/s   ratio {actor_eps / raw_eps:.3f}")
    print(
        f"scheduler start: whole log {full_s:.2f} s, from its checkpoint + 1,000 {resume_s:.2f} s"
    )
    emit({"ratio": actor_eps / raw_eps, "actor_eps": actor_eps, "raw_eps": raw_eps, "events": n,
          "scheduler_full_s": full_s, "scheduler_resume_s": resume_s})  # fmt: skip


if __name__ == "__main__":
    main()
