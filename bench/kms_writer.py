"""The KMS decision writer alone: group commit vs one append at a time, with a busy loop.

Each "request" makes the two appends a GetAppKey makes (KeyRequested, then its decision) on a
real nats-server. `busy` tasks spin the event loop in 1 ms slices, standing in for the TLS
handshakes and quote checks of concurrent clients. Compared: the KMS's `DecisionLog` (a lone
event is a plain append, queued ones share one atomic batch) and the same writer forced to
append one event at a time (what the KMS did before group commit came back).
Last line: {"group_c50_rps", "single_c50_rps", "group_c1_p50_ms", "single_c1_p50_ms",
"c50_rps_ratio" (group / single), "c1_p50_ratio", ...}.

    python -m bench.kms_writer [--quick]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from bench._common import bench_signer, emit, parse_quick, percentile, temp_server, vm_requested
from pydstack.actors.kms.writer import DecisionLog
from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.store import new_event_id
from pydstack.core.events import Event


class OneAtATime(DecisionLog):
    """The writer without group commit: every append waits for the one before it."""

    def __init__(self, store: EventStore, subject: str) -> None:
        super().__init__(store, subject)
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> OneAtATime:
        return self

    async def append(self, events: Sequence[Event]) -> None:
        async with self._lock:
            await self._commit(list(events), [new_event_id() for _ in events])


async def run(log: DecisionLog, n: int, conc: int, busy: int) -> tuple[float, float]:
    """(p50 ms of a request's two appends, requests per second)."""
    lat: list[float] = []
    stop = False

    async def spin() -> None:
        while not stop:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.001:
                pass
            await asyncio.sleep(0)

    sem = asyncio.Semaphore(conc)

    async def request(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await log.append([vm_requested(2 * i)])
            await log.append([vm_requested(2 * i + 1)])
            lat.append((time.perf_counter() - t) * 1000)

    spinners = [asyncio.create_task(spin()) for _ in range(busy)]
    t0 = time.perf_counter()
    await asyncio.gather(*(request(i) for i in range(n)))
    wall = time.perf_counter() - t0
    stop = True
    await asyncio.gather(*spinners)
    return percentile(lat, 50), n / wall


async def main(quick: bool) -> None:
    n1, n50 = (100, 150) if quick else (300, 600)
    out: dict[str, float] = {}
    async with temp_server() as nats:
        store = await EventStore.connect(nats.url, bench_signer())
        await store.ensure_stream()
        for name, cls in (("group", DecisionLog), ("single", OneAtATime)):
            async with cls(store, f"dstack.kms.bench-{name}") as log:
                p50, _ = await run(log, n1, 1, 0)
                c50_p50, rps = await run(log, n50, 50, 5)
            print(f"{name:6s} 1 client p50 {p50:.2f} ms   50 clients + busy loop: "
                  f"p50 {c50_p50:.1f} ms, {rps:.0f} req/s")  # fmt: skip
            out |= {f"{name}_c1_p50_ms": p50, f"{name}_c50_p50_ms": c50_p50,
                    f"{name}_c50_rps": rps}  # fmt: skip
        await store.close()
    # the ratios of the two writers, same run (group commit / one append at a time)
    out |= {"c50_rps_ratio": out["group_c50_rps"] / out["single_c50_rps"],
            "c1_p50_ratio": out["group_c1_p50_ms"] / out["single_c1_p50_ms"]}  # fmt: skip
    print(f"group / single: {out['c50_rps_ratio']:.2f}x req/s with 50 clients, "
          f"{out['c1_p50_ratio']:.2f}x p50 with 1")  # fmt: skip
    emit(out)


if __name__ == "__main__":
    asyncio.run(main(parse_quick(__doc__)))
