"""A real QEMU TCG boot of the guest image, run by the supervisor through ``QemuBackend``.

One VM, one test, because a TCG boot costs a minute: it reaches "ready", answers HTTP on a
forwarded port, outlives a kill -9 of its supervisor (adopted, same pid and CID), powers off
gracefully over QMP, boots again from the same disk, and a kill -9 of QEMU is reported as
such. The image is built first when missing or stale (``make image``: ~3-4 min from scratch,
~1 min after a code change, nothing when current).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec, CvmStatus
from pydstack.adapters.qemu import Image, QemuBackend, images_dir
from pydstack.core.events import PortMap

from .conftest import Host

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE_NAME", "pydstack-dev")
READY_TIMEOUT_S = 300  # TCG on a busy 2-vCPU machine; ~40-80 s is usual

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="session")
def guest_image() -> Image:
    t0 = time.monotonic()
    subprocess.run(["bash", str(REPO / "image" / "build.sh")], check=True)
    print(f"image ready in {time.monotonic() - t0:.0f} s")
    img = Image.load(images_dir() / IMAGE)
    img.verify()
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return dict(json.loads(r.read()))


async def wait_stage(backend: QemuBackend, vm_id: str, stage: str) -> float:
    t0 = time.monotonic()
    while (st := await backend.status(vm_id)).boot_stage != stage:
        assert st.state == "running", f"VM ended before {stage!r}: {st}"
        assert time.monotonic() - t0 < READY_TIMEOUT_S, f"no {stage!r} after {READY_TIMEOUT_S}s"
        await asyncio.sleep(0.25)
    return time.monotonic() - t0


async def wait_state(backend: QemuBackend, vm_id: str, state: str) -> CvmStatus:
    for _ in range(200):
        if (st := await backend.status(vm_id)).state == state:
            return st
        await asyncio.sleep(0.05)
    raise AssertionError(f"{vm_id} never became {state}: {await backend.status(vm_id)}")


async def test_tcg_boot_ready_http_adoption_graceful_stop(
    guest_image: Image, host: Host, record_property: pytest.RecordProperty
) -> None:
    port = free_port()
    compose = b'{"manifest_version":2,"name":"boot-test","runner":"docker-compose"}'
    spec = CvmSpec(vm_id="boot1", image=guest_image.name, vcpu=2, memory_mb=1536, cid=3001,
                   ports=(PortMap(host_port=port, vm_port=8080),), app_compose=compose)  # fmt: skip
    backend = await host.start()
    assert (await backend.create(spec)).state == "created"
    t0 = time.monotonic()
    started = await backend.start("boot1")
    assert started.state == "running" and started.pid
    boot_s = await wait_stage(backend, "boot1", "ready")
    record_property("boot_to_ready_s", round(boot_s, 1))
    print(f"TCG boot to guest ready: {time.monotonic() - t0:.1f} s")

    # The forwarded port reaches the guest's HTTP server; the host share was mounted.
    answer = await asyncio.to_thread(http_get, port)
    assert answer["hostname"] == "pydstack-guest" and "ready" in answer["stages"]  # type: ignore[operator]
    events, _ = await backend.events("boot1")
    assert [e.stage for e in events][:2] == ["booted", "ready"]
    assert "share=mounted" in events[1].detail

    # kill -9 of the supervisor: QEMU lives on and is adopted; its CID stays taken.
    await host.kill9()
    assert (await asyncio.to_thread(http_get, port))["stage"] == "ready"
    backend = await host.start()
    (adopted,) = await backend.list()
    assert (adopted.state, adopted.pid, adopted.cid) == ("running", started.pid, 3001)
    assert adopted.adopted and adopted.boot_stage == "ready"

    # Graceful stop: ACPI power button over QMP, the guest powers off by itself.
    t1 = time.monotonic()
    stopped = await backend.stop("boot1", timeout_s=120)
    assert stopped.state == "stopped" and "guest-shutdown" in stopped.reason, stopped
    print(f"graceful stop: {time.monotonic() - t1:.1f} s")

    # Boots again from the same disk; a kill -9 of QEMU is reported as exited, by SIGKILL.
    again = await backend.start("boot1")
    assert again.state == "running" and again.pid != started.pid and again.boot_stage == ""
    assert again.pid is not None
    os.kill(again.pid, 9)
    exited = await wait_state(backend, "boot1", "exited")
    assert exited.exit_code == -9 and exited.reason == "killed by signal SIGKILL"

    await backend.remove("boot1")
    assert await backend.list() == []
    assert not (host.root / "vms" / "boot1").exists()
