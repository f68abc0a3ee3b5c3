"""Live catch-up: how fast a running actor consumes a burst, against a raw ordered consumer.

    python -m bench.catchup [--quick]

Starts an ``ActorRunner`` whose actor only counts (so the figure is the runtime's own cost:
fetch, decode, signature check, write policy, ack), appends a burst of realistic VM-lifecycle
events (``bench.replay``'s workload, signed, pipelined) while it runs, and times from the first
append until the actor has handled them all. Then reads the same stream with a bare nats-py
ordered consumer that only counts. Signature verification is on. Goal (issue 18): ``ratio``
(actor / raw) >= 0.2.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import nats

from pydstack.actors.runtime import ActorRunner, Delivery, RuntimeConfig
from pydstack.adapters.nats import EventStore, StreamSettings
from pydstack.core.events import kind_filter
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


async def run(n: int) -> tuple[float, float]:
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
        await nc.close()
    return actor_eps, raw_eps


def main() -> None:
    from pydstack.logs import configure

    quick = parse_quick(__doc__)
    configure(level="warning")  # a debug line per event would be what is measured
    n = 20_000 if quick else 300_000
    actor_eps, raw_eps = run_loop(run(n))
    print(f"actor (counting) catch-up  {actor_eps:10.0f} ev/s")
    print(f"raw ordered-consumer read  {raw_eps:10.0f} ev/s   ratio {actor_eps / raw_eps:.3f}")
    emit({"ratio": actor_eps / raw_eps, "actor_eps": actor_eps, "raw_eps": raw_eps, "events": n})


if __name__ == "__main__":
    main()
