"""VMM: time from ``VmRequested`` to ``VmStarted`` and to guest-ready, against the backend alone.

    python -m bench.vmm [--quick]      # --quick: sandbox only (QEMU TCG boots take ~30-80 s)

The VMM runs as the product configures it (``VmmConfig`` and ``RuntimeConfig`` defaults): it
starts a VM as soon as its runner delivers the scheduler's ``VmScheduled`` (event-driven), and
notices the guest's own progress ("ready") at its poll, every ``poll_interval_s`` (0.5 s), since
no event announces it. Every time is read from the log (each event's envelope time).

Baseline, same run: the same backend alone (create + start the spec the VMM built, then its
event file read every 10 ms until "ready"), under a supervisor of its own (a VMM removes CVMs
the log does not know). After a warm-up pair, each run is a pair, in alternating order.
``*_ratio`` = request→ready through the control plane / the backend alone.

The control-plane overhead is ``(request→VmStarted + one VMM poll) / request→ready``:
scheduling, work dir and supervisor spawn, plus the longest the VMM takes to notice "ready" at
the product's poll interval; the rest is QEMU/docker. For reference, ``*_outside_guest_clock``
is the share not on the guest's own uptime clock (it also counts process start, firmware and
kernel loading). Goals (issue 7): sandbox ready <= 3 s, overhead
<= 5 % of the QEMU boot. Last line: JSON ``{"sandbox_ready_s", "sandbox_alone_ready_s",
"sandbox_ratio", "qemu_ready_s", "overhead_ratio", "poll_interval_s", ...}`` (qemu fields null
when no image or with --quick).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from bench._common import bench_signer, emit, median, parse_quick, temp_server
from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.supervisor import launch_supervisor
from pydstack.actors.vmm import (
    Vmm,
    VmmConfig,
    VmmLaunch,
    build_backend,
    running_vmm,
)
from pydstack.actors.vmm._workdir import build_spec
from pydstack.adapters.cvm import CvmBackend, CvmSpec
from pydstack.adapters.nats import NEW, EventStore
from pydstack.adapters.supervisor import SupervisorClient
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
    """A warm-up pair, then ``runs`` pairs of (through the VMM, backend alone), in alternating
    order so that neither side always goes first."""
    out = []
    async with temp_server() as server:
        store = await EventStore.connect(server.url, bench_signer("vmm"))
        await store.ensure_stream()
        with tempfile.TemporaryDirectory(prefix="pydstack-bench-vmm-") as tmp_s:
            tmp = Path(tmp_s)
            # The bench owns its supervisors (CVMs outlive a VMM by design, not a bench run).
            # The baseline's CVMs have their own: the VMM removes CVMs the log does not know.
            supervisors = [launch_supervisor(tmp / f"{n}.sock", tmp / n) for n in ("sv", "sva")]
            for n in ("sv", "sva"):  # ready before anyone pings it (or launches another)
                async with SupervisorClient(tmp / f"{n}.sock") as ready:
                    await ready.wait_ready()
            # The product's poll interval and runtime settings: only the host is the bench's.
            cfg = VmmConfig(host_id="bench", state_dir=tmp / "vmm", vcpu=8, memory_mb=16384)
            launch = VmmLaunch(config=cfg, backend=backend, images=images,
                               supervisor_socket=tmp / "sv.sock")  # fmt: skip
            sched = Scheduler(store, SchedulerConfig(name="scheduler"))
            sva = SupervisorClient(tmp / "sva.sock")
            try:
                async with (
                    store,
                    ActorRunner(store, sched, RuntimeConfig()),
                    running_vmm(store, launch) as (vmm, _),
                ):
                    # the VMM's own config, platform as it resolved it (qemu: tdx, kvm or tcg)
                    alone_cfg = replace(vmm.config, state_dir=tmp / "alone")
                    alone = await build_backend(replace(launch, config=alone_cfg), sva)
                    try:
                        spec = None
                        for i in range(runs + 1):
                            row: dict[str, float] = {}
                            if spec is not None and i % 2 == 0:
                                row["alone_ready"] = await _alone(alone, spec, i, timeout_s)
                            row |= await _one(store, vmm, f"{backend}-{i}", image, vcpu, mem,
                                              timeout_s)  # fmt: skip
                            spec = _spec_of(vmm, f"{backend}-{i}")
                            if "alone_ready" not in row:
                                row["alone_ready"] = await _alone(alone, spec, i, timeout_s)
                            await _remove(store, vmm, f"{backend}-{i}")
                            _print_run(backend, i, row)
                            if i:
                                out.append(row)
                    finally:  # whatever is left (a run that timed out): gone with its dirs
                        for b in (vmm.backend, alone):
                            for st in await b.list():
                                await b.remove(st.vm_id)
            finally:
                await sva.close()
                for sv in supervisors:
                    sv.terminate()
                    await asyncio.to_thread(sv.wait, 30)
    return out


def _print_run(backend: str, i: int, row: dict[str, float]) -> None:
    print(f"{backend} run {i}{' (warm-up)' if not i else ''}: requested→started "
          f"{row['started'] - row['requested']:.3f} s, →ready {row['ready'] - row['requested']:.3f}"
          f" s; backend alone →ready {row['alone_ready']:.3f} s", flush=True)  # fmt: skip


def _spec_of(vmm: Vmm, vm_id: str) -> CvmSpec:
    """The spec the VMM built for ``vm_id`` (the same one the backend alone then gets)."""
    v = vmm.view
    return build_spec(v.vms[vm_id], v.composes, app_compose=v.app_compose)


async def _alone(backend: CvmBackend, spec: CvmSpec, i: int, timeout_s: float) -> float:
    """Seconds from create to the guest's "ready" with the backend alone: create, start, then
    its event file read every 10 ms (no log, no scheduler, no VMM); removed after."""
    vm_id = f"alone-{i}"
    spec = msgspec.structs.replace(spec, vm_id=vm_id, name=vm_id)
    t = time.monotonic()
    try:
        await backend.create(spec)
        await backend.start(vm_id)
        while time.monotonic() - t < timeout_s:
            events, _ = await backend.events(vm_id, 0)
            if any(e.stage == "ready" for e in events):
                return time.monotonic() - t
            await asyncio.sleep(0.01)
        raise TimeoutError(f"{vm_id} (backend alone) not ready within {timeout_s:.0f} s")
    finally:
        await backend.remove(vm_id)


async def _one(store: EventStore, vmm: Vmm, vm_id: str, image: str, vcpu: int, mem: int,
               timeout_s: float) -> dict[str, float]:  # fmt: skip
    """Request one VM and time it to ready from the log."""
    req = VmRequested(
        vm_id=vm_id, app_id="b" * 40, name=vm_id, image=image, host="bench",
        resources=VmResources(vcpu=vcpu, memory_mb=mem), compose=COMPOSE.encode(),
    )  # fmt: skip
    await store.append(subject("vm", vm_id), [req], NEW)
    t = await _times(store, vm_id, timeout_s)
    events, _ = await vmm.backend.events(vm_id, 0)
    ready = [e for e in events if e.stage == "ready"]
    t["guest_ready_uptime"] = ready[-1].uptime_s if ready else float("nan")
    return t


async def _remove(store: EventStore, vmm: Vmm, vm_id: str) -> None:
    """Remove ``vm_id`` through the log and wait until the backend no longer has it."""
    subj = subject("vm", vm_id)
    _, version = await store.read_aggregate(subj)
    await store.append(subj, [VmRemoveRequested(vm_id=vm_id)], version)
    deadline = time.monotonic() + 60
    while any(st.vm_id == vm_id for st in await vmm.backend.list()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm_id} was not removed within 60 s")
        await asyncio.sleep(0.1)


# The product's poll interval: the longest the VMM takes to notice the guest's "ready"
POLL_S = VmmConfig(host_id="", state_dir=Path()).poll_interval_s


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    total = [r["ready"] - r["requested"] for r in rows]
    started = [r["started"] - r["requested"] for r in rows]
    alone = [r["alone_ready"] for r in rows]
    # Control plane: scheduling, work dir, supervisor spawn (request→VmStarted) plus, at most,
    # one poll before the VMM sees the guest's "ready". Everything else is QEMU/docker.
    overhead = [(s + POLL_S) / t for s, t in zip(started, total, strict=True)]
    # Not on the guest's clock: also counts process start, firmware, kernel loading.
    outside = [(t - r["guest_ready_uptime"]) / t for t, r in zip(total, rows, strict=True)]
    return {"ready_s": median(total), "started_s": median(started), "overhead": median(overhead),
            "outside_guest_clock": median(outside), "alone_ready_s": median(alone),
            "ratio": median([t / a for t, a in zip(total, alone, strict=True)])}  # fmt: skip


def _report(what: str, s: dict[str, float]) -> None:
    print(f"{what}: requested→started {s['started_s']:.3f} s, →ready {s['ready_s']:.3f} s, "
          f"control-plane overhead {s['overhead']:.1%} (poll {POLL_S} s counted once); "
          f"backend alone →ready {s['alone_ready_s']:.3f} s, ratio {s['ratio']:.2f}")  # fmt: skip


async def main(quick: bool) -> None:
    result: dict[str, Any] = {}
    sandbox = _summary(await _run("sandbox", 2 if quick else 5, "sandbox-busybox", 1, 256, 60,
                                  None))  # fmt: skip
    _report("sandbox", sandbox)
    result.update(sandbox_ready_s=sandbox["ready_s"], sandbox_started_s=sandbox["started_s"],
                  sandbox_alone_ready_s=sandbox["alone_ready_s"], sandbox_ratio=sandbox["ratio"],
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
        qemu_alone_ready_s=qemu["alone_ready_s"] if qemu else None,
        qemu_ratio=qemu["ratio"] if qemu else None,
        qemu_outside_guest_clock=qemu["outside_guest_clock"] if qemu else None,
        overhead_ratio=qemu["overhead"] if qemu else sandbox["overhead"],
        overhead_of="qemu" if qemu else "sandbox",
        goal_sandbox_ready_s=3.0, goal_overhead_ratio=0.05, cpus=os.cpu_count(),
        poll_interval_s=POLL_S, load_1m=os.getloadavg()[0],
    )  # fmt: skip
    emit(result)


if __name__ == "__main__":
    asyncio.run(main(parse_quick(__doc__)))
