"""VMM: time from ``VmRequested`` to ``VmStarted`` and to guest-ready, sandbox and QEMU TCG.

    python -m bench.vmm [--quick]      # --quick: sandbox only (QEMU TCG boots take ~30-80 s)

Every time is read from the log (each event's envelope time). The control-plane overhead is
``(request→VmStarted + one VMM poll) / request→ready``: scheduling, work dir and supervisor
spawn, plus the longest the VMM takes to notice "ready"; the rest is QEMU/docker. For
reference, ``*_outside_guest_clock`` is the share not on the guest's own uptime clock
(it also counts process start, firmware and kernel loading). Goals (issue 7):
sandbox ready <= 3 s, overhead <= 5 % of the QEMU boot. Last line: JSON
``{"sandbox_ready_s", "qemu_ready_s", "overhead_ratio", ...}`` (qemu fields null when no image).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import bench_signer, emit, median, parse_quick, temp_server
from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.supervisor import launch_supervisor
from pydstack.actors.vmm import Vmm, VmmConfig, VmmLaunch, running_vmm
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import (
    VmBootProgress,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmStarted,
    subject,
)
from pydstack.core.projections import applied

SERVICES = (
    "services:\n  web:\n    image: busybox:latest\n    command: httpd -f -p 8080 -h /www\n"
    "    ports: ['8080:8080']\n"
)
COMPOSE = json.dumps({"name": "bench", "docker_compose_file": SERVICES})


async def _times(store: EventStore, vm_id: str, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history, _ = await store.read_aggregate(subject("vm", vm_id))
        got: dict[str, float] = {}
        for rec in history:
            a = applied(rec.seq, rec.data)
            if a is None:
                continue
            t = a.time_ns / 1e9
            match a.event:
                case VmRequested():
                    got["requested"] = t
                case VmStarted():
                    got.setdefault("started", t)
                case VmBootProgress(stage="ready", detail=d):
                    got["ready"] = t
                    got["guest_ready_uptime"] = _uptime(d)
        if "ready" in got:
            return got
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{vm_id} was not ready within {timeout_s:.0f} s")


def _uptime(_: str) -> float:
    return float("nan")  # filled from the backend's event line (see _guest_uptime)


async def _run(backend: str, runs: int, image: str, vcpu: int, mem: int, timeout_s: float,
               images: Path | None) -> list[dict[str, float]]:  # fmt: skip
    out = []
    async with temp_server() as server:
        store = await EventStore.connect(server.url, bench_signer("vmm"))
        await store.ensure_stream()
        with tempfile.TemporaryDirectory(prefix="pydstack-bench-vmm-") as tmp:
            # The bench owns its supervisor (CVMs outlive a VMM by design, not a bench run).
            sock = Path(tmp) / "supervisor.sock"
            supervisor = launch_supervisor(sock, Path(tmp) / "supervisor")
            cfg = VmmConfig(host_id="bench", state_dir=Path(tmp), poll_interval_s=POLL_S,
                            vcpu=8, memory_mb=16384)  # fmt: skip
            rt = RuntimeConfig(reconcile_interval_s=5.0, fetch_timeout_s=0.2)
            launch = VmmLaunch(config=cfg, backend=backend, images=images, runtime=rt,
                               supervisor_socket=sock)  # fmt: skip
            sched = Scheduler(store, SchedulerConfig(name="scheduler"))
            rt = RuntimeConfig(fetch_timeout_s=0.2)
            try:
                async with (
                    store,
                    ActorRunner(store, sched, rt),
                    running_vmm(store, launch) as (vmm, _),
                ):
                    try:
                        for i in range(runs):
                            out.append(await _one(store, vmm, f"{backend}-{i}", image, vcpu,
                                                  mem, timeout_s))  # fmt: skip
                    finally:  # whatever is left (a run that timed out): gone with its dirs
                        for st in await vmm.backend.list():
                            await vmm.backend.remove(st.vm_id)
            finally:
                supervisor.terminate()
                await asyncio.to_thread(supervisor.wait, 30)
    return out


async def _one(store: EventStore, vmm: Vmm, vm_id: str, image: str, vcpu: int, mem: int,
               timeout_s: float) -> dict[str, float]:  # fmt: skip
    """Request one VM, time it to ready from the log, remove it and wait until it is gone."""
    req = VmRequested(
        vm_id=vm_id, app_id="b" * 40, name=vm_id, image=image, host="bench",
        resources=VmResources(vcpu=vcpu, memory_mb=mem), compose=COMPOSE.encode(),
    )  # fmt: skip
    subj = subject("vm", vm_id)
    await store.append(subj, [req], NEW)
    t = await _times(store, vm_id, timeout_s)
    events, _ = await vmm.backend.events(vm_id, 0)
    ready = [e for e in events if e.stage == "ready"]
    t["guest_ready_uptime"] = ready[-1].uptime_s if ready else float("nan")
    _, version = await store.read_aggregate(subj)
    await store.append(subj, [VmRemoveRequested(vm_id=vm_id)], version)
    deadline = time.monotonic() + 60
    while any(st.vm_id == vm_id for st in await vmm.backend.list()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm_id} was not removed within 60 s")
        await asyncio.sleep(0.1)
    return t


POLL_S = 0.05  # the VMM's poll interval here: the longest it takes to notice "ready"


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    total = [r["ready"] - r["requested"] for r in rows]
    started = [r["started"] - r["requested"] for r in rows]
    # Control plane: scheduling, work dir, supervisor spawn (request→VmStarted) plus, at most,
    # one poll before the VMM sees the guest's "ready". Everything else is QEMU/docker.
    overhead = [(s + POLL_S) / t for s, t in zip(started, total, strict=True)]
    # Not on the guest's clock: also counts process start, firmware, kernel loading.
    outside = [(t - r["guest_ready_uptime"]) / t for t, r in zip(total, rows, strict=True)]
    return {"ready_s": median(total), "started_s": median(started), "overhead": median(overhead),
            "outside_guest_clock": median(outside)}  # fmt: skip


def _report(what: str, s: dict[str, float]) -> None:
    print(f"{what}: requested→started {s['started_s']:.3f} s, →ready {s['ready_s']:.3f} s, "
          f"control-plane overhead {s['overhead']:.1%}")  # fmt: skip


async def main(quick: bool) -> None:
    result: dict[str, Any] = {}
    sandbox = _summary(await _run("sandbox", 2 if quick else 5, "sandbox-busybox", 1, 256, 60,
                                  None))  # fmt: skip
    _report("sandbox", sandbox)
    result.update(sandbox_ready_s=sandbox["ready_s"], sandbox_started_s=sandbox["started_s"],
                  sandbox_overhead_ratio=sandbox["overhead"],
                  sandbox_outside_guest_clock=sandbox["outside_guest_clock"])  # fmt: skip
    qemu: dict[str, float] | None = None
    from pydstack.adapters.qemu import images_dir

    if not quick and (images_dir() / "pydstack-dev" / "metadata.json").exists():
        qemu = _summary(await _run("qemu", 1, "pydstack-dev", 2, 1536, 300, None))
        _report("qemu (TCG)", qemu)
    elif not quick:
        print("qemu: no image (make image); skipped")
    result.update(
        qemu_ready_s=qemu["ready_s"] if qemu else None,
        qemu_started_s=qemu["started_s"] if qemu else None,
        qemu_outside_guest_clock=qemu["outside_guest_clock"] if qemu else None,
        overhead_ratio=qemu["overhead"] if qemu else sandbox["overhead"],
        overhead_of="qemu" if qemu else "sandbox",
        goal_sandbox_ready_s=3.0, goal_overhead_ratio=0.05, cpus=os.cpu_count(),
    )  # fmt: skip
    emit(result)


if __name__ == "__main__":
    asyncio.run(main(parse_quick(__doc__)))
