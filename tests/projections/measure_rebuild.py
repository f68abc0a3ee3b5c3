"""Measure read-model rebuild speed: ``python tests/projections/measure_rebuild.py [N]``.

Prints events/s (best of 3, wall clock and CPU time) for: the pure fold alone, fold + SQLite
write (``apply_batch``), and decode + fold + write (``apply_messages`` on sealed messages).
The last line is a JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from projections_given import seal_all, stamp, workload

from pydstack.adapters.sqlite import ReadModel
from pydstack.core.projections import fold

BATCH = 10_000


def best(n: int, run: Callable[[Path], None]) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as d:
            w, c = time.perf_counter(), time.process_time()
            run(Path(d) / "rm.db")
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return n / min(walls), n / min(cpus)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    events = workload(n)
    records = stamp(events)
    messages = seal_all(events)

    def pure(_: Path) -> None:
        fold(records)

    def batches(path: Path) -> None:
        with ReadModel.open(path) as rm:
            for i in range(0, len(records), BATCH):
                rm.apply_batch(records[i : i + BATCH])

    def raw(path: Path) -> None:
        with ReadModel.open(path) as rm:
            for i in range(0, len(messages), BATCH):
                rm.apply_messages(messages[i : i + BATCH])

    out = {"events": len(records)}
    for name, run in (("fold", pure), ("apply_batch", batches), ("apply_messages", raw)):
        wall, cpu = best(len(records), run)
        out[f"{name}_per_s"] = round(wall)
        out[f"{name}_cpu_per_s"] = round(cpu)
        print(f"{name:15} {wall:>10,.0f} events/s wall  {cpu:>10,.0f} events/s cpu")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
