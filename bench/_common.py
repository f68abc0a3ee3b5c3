"""Shared bench helpers: a throwaway nats-server, timing, percentiles, the JSON last line."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydstack.adapters.nats import NatsServer, NatsServerConfig
from pydstack.core.events import PortMap, Signer, VmRequested, VmResources


def parse_quick(doc: str | None) -> bool:
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, finishes in ~20 s")
    return bool(ap.parse_args().quick)


@asynccontextmanager
async def temp_server() -> AsyncIterator[NatsServer]:
    """A nats-server with JetStream in a temp dir, stopped and removed at exit."""
    with tempfile.TemporaryDirectory(prefix="pydstack-bench-") as tmp:
        async with NatsServer(NatsServerConfig(data_dir=Path(tmp))) as server:
            yield server


def bench_signer(actor: str = "bench") -> Signer:
    return Signer.from_private_bytes(actor, os.urandom(32))


def vm_requested(i: int) -> VmRequested:
    """A realistic command event (~300 bytes sealed)."""
    return VmRequested(
        vm_id=f"vm-{i:08d}",
        app_id=f"{i * 2654435761 % (1 << 64):040x}"[:40],
        name=f"app-{i % 97}-replica-{i % 5}",
        resources=VmResources(vcpu=1 + i % 8, memory_mb=1024 * (1 + i % 16), disk_gb=20),
        image="dstack-0.5.3",
        compose_hash=f"{(i * 0x9E3779B97F4A7C15) % (1 << 256):064x}",
        ports=(PortMap(host_port=10000 + i % 5000, vm_port=443),),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank of `values` (need not be sorted)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def emit(result: dict[str, Any]) -> None:
    """Print the machine-readable result as the last line of output."""
    # NaN/inf (a percentile of nothing) are not JSON: null
    clean = {k: (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v
             for k, v in result.items()}  # fmt: skip
    print(json.dumps(clean), flush=True)


def finish(result: dict[str, Any], *, errors: int, attempts: int, what: str) -> int:
    """Emit ``result`` with ``errors``, ``attempts``, ``error_rate`` and ``ok``; return the exit
    status: 1 when any attempt failed (or none was made). Latencies and ratios computed over
    the requests that survived are not a figure: the run says so on stderr and fails.

        raise SystemExit(finish(result, errors=errors, attempts=n, what="bench.kms requests"))
    """
    rate = errors / attempts if attempts else 1.0
    ok = errors == 0 and attempts > 0
    if not ok:
        print(f"{what}: {errors} of {attempts} failed (error rate {rate:.2%}); the figures "
              "above are over the survivors only and are not a result", file=sys.stderr,
              flush=True)  # fmt: skip
    emit({**result, "errors": errors, "attempts": attempts, "error_rate": rate, "ok": ok,
          "load_1m": os.getloadavg()[0]})  # fmt: skip
    return 0 if ok else 1


def remove_vms(
    cli: Callable[..., subprocess.CompletedProcess[str]], home: Path, vms: Sequence[str]
) -> None:
    """Ask `up` in `home` to remove `vms` and wait (60 s at most) until the log says they are:
    CVMs outlive the VMM, so a bench that stops `up` first would leave them running."""
    for vm in vms:
        cli(home, "vm", "rm", vm, timeout=60)
    deadline = time.monotonic() + 60
    while vms and time.monotonic() < deadline:
        r = cli(home, "events", "--subject", "dstack.vm.*", "--json")
        if sum('"VmRemoved"' in x for x in r.stdout.splitlines()) >= len(vms):
            return
        time.sleep(0.5)
