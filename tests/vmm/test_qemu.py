"""A real QEMU TCG guest through the whole stack: API → scheduler → VMM → supervisor → QEMU,
every step read back from the log (real nats-server).

One boot, because a TCG boot costs 40-80 s on these machines: the guest reaches "ready" and
answers HTTP on its forwarded port; the VMM and then its supervisor (kill -9) go away and the
running QEMU is adopted (same pid and CID, no second ``VmStarted``); a graceful stop powers the
guest off over ACPI (``VmStopped``); a start followed by kill -9 of QEMU gives ``VmExited``
and, with auto-restart on, ``VmRestartScheduled`` then ``VmStarted`` attempt 1; remove leaves
no QEMU. The image is built first when missing or stale (``make image``: ~3-4 min from
scratch, ~40 s after a code change, nothing when current).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pydstack.adapters.firewall import GuestEgress
from pydstack.adapters.nats import EventStore
from pydstack.adapters.qemu import Image, QemuBackend, images_dir
from pydstack.adapters.qemu.user import ensure_user
from pydstack.core.events import (
    VmBootProgress,
    VmExited,
    VmRemoved,
    VmRestartScheduled,
    VmStarted,
    VmStopped,
)

from ..cvm.contract import free_port
from ..netns import Netns, entered
from ..qemu.guest_image import IMAGE, built_image
from .conftest import FAST, Api, VmmHost, events_of, supervisor_pids, wait_until

READY_TIMEOUT_S = 240.0  # TCG on a busy 2-vCPU machine; 40-80 s is usual

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def guest_image() -> Image:
    return built_image()


@pytest.fixture
def guest_netns() -> Iterator[Netns]:
    """This test in a namespace of its own (NATS, the VMM's supervisor, QEMU, its hostfwd
    port): the VMM applies its guest egress rules there, never to the machine's ruleset."""
    with Netns.create("vmm-qemu") as ns, entered(ns):
        yield ns


@pytest.fixture
async def qemu_host(
    tmp_path: Path, guest_image: Image, guest_netns: Netns, store: EventStore, scheduled: None
) -> AsyncIterator[VmmHost]:
    h = VmmHost(tmp_path, images_dir(), store, backend="qemu")
    yield h
    await h.cleanup()


def http_get(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return dict(json.loads(r.read()))


def http_refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3).close()
    except OSError:
        return True
    return False


def qemu_pids(vm_id: str) -> list[int]:
    """The QEMU processes of this VM (``-name <vm_id>`` with our work dir on the line)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-system-x86_64") and argv[1:3] == [b"-name", vm_id.encode()]:
                out.append(int(d.name))
    return out


async def test_qemu_guest_life_on_the_log(qemu_host: VmmHost, store: EventStore) -> None:
    port = free_port()
    vm = "qb1"

    async def kinds() -> list[tuple[str, int | None]]:
        watched = VmStarted | VmExited | VmStopped | VmRestartScheduled | VmRemoved
        return [(type(e).__name__, getattr(e, "attempt", None))
                for e in await events_of(store, vm) if isinstance(e, watched)]  # fmt: skip

    async def stage_logged(stage: str) -> bool:
        evs = await events_of(store, vm)
        return any(isinstance(e, VmBootProgress) and e.stage == stage for e in evs)

    async with qemu_host.running(FAST) as (vmm, api):
        assert isinstance(vmm.backend, QemuBackend)
        await create(api, vm, port)
        t0 = time.monotonic()
        await wait_until(lambda: stage_logged("ready"), READY_TIMEOUT_S, "guest ready")
        print(f"TCG boot, request to guest ready on the log: {time.monotonic() - t0:.1f} s")
        answer = await asyncio.to_thread(http_get, port)  # hostfwd reaches the guest
        assert answer["hostname"] == "pydstack-guest" and "ready" in answer["stages"]
        stages = [e for e in await events_of(store, vm) if isinstance(e, VmBootProgress)]
        assert [e.stage for e in stages][:2] == ["booted", "ready"]
        assert "share=mounted" in stages[1].detail  # the 9p host share reached the guest
        first = await vmm.backend.status(vm)
        assert first.state == "running" and first.pid and first.cid is not None
        assert qemu_pids(vm) == [first.pid]
        assert _uid(first.pid) == ensure_user().uid  # QEMU under its own user
        assert "jump guest" in await GuestEgress(_uid(first.pid)).listed()  # and its rules

    # The VMM goes away, then its supervisor is killed -9: QEMU lives on, and the next VMM
    # (with a new supervisor) adopts it: same pid and CID, no second start on the log.
    for pid in supervisor_pids(qemu_host.root / "sv.sock"):
        os.kill(pid, signal.SIGKILL)
    assert (await asyncio.to_thread(http_get, port))["stage"] == "ready"
    async with qemu_host.running(FAST) as (vmm, api):
        await asyncio.sleep(1.0)  # ~5 poll passes of the new VMM
        adopted = await vmm.backend.status(vm)
        assert (adopted.state, adopted.pid, adopted.cid, adopted.adopted) == (
            "running", first.pid, first.cid, True,
        )  # fmt: skip
        assert adopted.boot_stage == "ready"
        assert await kinds() == [("VmStarted", 0)]

        # Graceful stop: the ACPI power button over QMP, the guest powers itself off.
        t1 = time.monotonic()
        await api.ok("ShutdownVm", {"id": vm})
        await api.wait_state(vm, "stopped", timeout_s=120)
        print(f"graceful stop: {time.monotonic() - t1:.1f} s")
        stopped = await vmm.backend.status(vm)
        assert "guest-shutdown" in stopped.reason, stopped
        assert await kinds() == [("VmStarted", 0), ("VmStopped", None)]
        assert await asyncio.to_thread(http_refused, port)
        assert qemu_pids(vm) == []

        # Start again, kill -9 QEMU: an exit the VMM did not ask for, restarted by policy.
        await api.ok("StartVm", {"id": vm})
        await wait_until(lambda: _count(kinds, "VmStarted", 2), 30, "second start")
        again = await vmm.backend.status(vm)
        assert again.pid and again.pid != first.pid
        assert again.boot_stage == ""  # stages count from this start, not the last boot
        os.kill(again.pid, signal.SIGKILL)
        await wait_until(lambda: _count(kinds, "VmStarted", 3), 30, "auto-restart")
        assert await kinds() == [
            ("VmStarted", 0), ("VmStopped", None), ("VmStarted", 0), ("VmExited", None),
            ("VmRestartScheduled", 1), ("VmStarted", 1),
        ]  # fmt: skip
        exited = next(e for e in await events_of(store, vm) if isinstance(e, VmExited))
        assert (exited.exit_code, exited.reason) == (-9, "killed by signal SIGKILL")
        restarted = await vmm.backend.status(vm)
        assert restarted.state == "running" and restarted.pid not in (first.pid, again.pid)
        assert restarted.cid == first.cid

        await api.ok("RemoveVm", {"id": vm})
        await wait_until(lambda: _count(kinds, "VmRemoved", 1), 30, "VmRemoved")
        assert await vmm.backend.list() == []
        assert qemu_pids(vm) == []
    # The first VMM left the rules to the QEMU still running; this one, with none, removes them.
    assert await GuestEgress(ensure_user().uid).listed() == ""


async def create(api: Api, vm: str, port: int) -> None:
    compose = {"manifest_version": 2, "name": vm, "runner": "docker-compose"}
    await api.ok("CreateVm", {"id": vm, "name": vm, "image": IMAGE, "vcpu": 2, "memory": 1536,
                              "compose_file": json.dumps(compose),
                              "ports": [{"host_port": port, "vm_port": 8080}]})  # fmt: skip


async def _count(kinds: Any, name: str, n: int) -> bool:
    return sum(k == name for k, _ in await kinds()) >= n


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
