"""A host for VMM tests: nats-server, a scheduler, the sandbox backend under a real supervisor,
and the VMM (in-process with ``vmm_host``, or as its own process with ``VmmProcess``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig
from pydstack.actors.vmm import Vmm, VmmConfig, VmmLaunch, running_vmm
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.sandbox import build_busybox_image
from pydstack.adapters.secretfile import write_secret
from pydstack.core.events import AnyEvent, subject
from pydstack.core.projections import applied
from pydstack.core.vmm import RestartPolicy

COMPOSE = """services:
  web:
    image: busybox:latest
    command: httpd -f -p 8080 -h /www
    ports:
      - "8080:8080"
"""


def compose(name: str = "web") -> str:
    return json.dumps({"name": name, "docker_compose_file": COMPOSE})


FAST = RestartPolicy(interval_s=0.2, initial_backoff_s=0.3, max_backoff_s=1.0, max_retries=2,
                     reset_window_s=60)  # fmt: skip


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("the VMM tests run sandbox CVMs: root and dockerd (docker.io) needed")
    root = tmp_path_factory.mktemp("vmm-images")
    build_busybox_image(root)
    return root


@pytest.fixture
async def scheduled(store: EventStore) -> AsyncIterator[None]:
    """A scheduler places what the VMM API requests (pinned to the VMM's host)."""
    sched = Scheduler(store, SchedulerConfig(name="scheduler"))
    async with ActorRunner(store, sched, RuntimeConfig(reconcile_interval_s=1.0)):
        yield


async def events_of(store: EventStore, vm_id: str) -> list[AnyEvent]:
    history, _ = await store.read_aggregate(subject("vm", vm_id))
    out = []
    for rec in history:
        a = applied(rec.seq, rec.data)
        if a is not None:
            out.append(a.event)
    return out


async def wait_until(pred: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.1)


class Api:
    """The VMM API over its unix socket (``unix:/path``), as the CLI and dstack's vmm-cli."""

    def __init__(self, url: str) -> None:
        assert url.startswith("unix:"), url
        self.url = url

    async def call(self, method: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.url[5:])) as s,
            s.post(f"http://localhost/prpc/{method}", json=body or {}) as r,
        ):
            return r.status, await r.json()

    async def ok(self, method: str, body: dict[str, Any] | None = None) -> Any:
        status, data = await self.call(method, body)
        assert status == 200, (method, status, data)
        return data

    async def create(self, vm_id: str, host_port: int, **kw: Any) -> None:
        body = {"id": vm_id, "name": vm_id, "image": "sandbox-busybox", "vcpu": 1,
                "memory": 256, "compose_file": compose(vm_id),
                "ports": [{"host_port": host_port, "vm_port": 8080}], **kw}  # fmt: skip
        await self.ok("CreateVm", body)

    async def state(self, vm_id: str) -> dict[str, Any]:
        info = await self.ok("GetInfo", {"id": vm_id})
        return info.get("info") or {}

    async def wait_state(self, vm_id: str, status: str, timeout_s: float = 30) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            info = await self.state(vm_id)
            return info if info.get("status") == status else None

        result: dict[str, Any] = await wait_until(check, timeout_s, f"{vm_id} {status}")
        return result


@dataclass
class VmmHost:
    root: Path
    images: Path
    store: EventStore
    host_id: str = "h1"
    backend: str = "sandbox"  # or "qemu" (images: the guest image cache)

    def launch(self, policy: RestartPolicy = FAST, **kw: Any) -> VmmLaunch:
        cfg = VmmConfig(host_id=self.host_id, state_dir=self.root / "vmm", restart=policy,
                        poll_interval_s=0.2, heartbeat_interval_s=60, port_range=(1024, 65535),
                        vcpu=4, memory_mb=4096, **kw)  # fmt: skip
        return VmmLaunch(config=cfg, backend=self.backend, images=self.images,
                         supervisor_socket=self.root / "sv.sock",
                         runtime=RuntimeConfig(reconcile_interval_s=2.0))  # fmt: skip

    @contextlib.asynccontextmanager
    async def running(self, policy: RestartPolicy = FAST) -> AsyncIterator[tuple[Vmm, Api]]:
        async with running_vmm(self.store, self.launch(policy)) as (vmm, api):
            yield vmm, Api(api.url)

    async def cleanup(self) -> None:
        from pydstack.actors.supervisor import SupervisorClient

        sock = self.root / "sv.sock"
        async with SupervisorClient(sock, timeout_s=10) as sv:
            if await sv.ping():
                for p in await sv.list():
                    with contextlib.suppress(Exception):
                        await sv.kill(p.config.id)
                        await sv.remove(p.config.id)
        if self.backend == "sandbox":
            await asyncio.to_thread(cleanup_sandboxes, self.root / "vmm")
        for pid in supervisor_pids(sock):
            os.kill(pid, signal.SIGKILL)


def supervisor_pids(sock: Path) -> list[int]:
    """The supervisor serving exactly this socket (launched detached, so found by argv)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if b"pydstack.actors.supervisor" in argv and str(sock).encode() in argv:
                    out.append(int(d.name))
    return out


def cleanup_sandboxes(state_dir: Path) -> None:
    """Remove every namespace and mount the sandbox CVMs of this test left behind."""
    import hashlib

    from pydstack.adapters.sandbox import _netns

    vms = state_dir / "vms"
    for d in vms.iterdir() if vms.is_dir() else []:
        ns = "pds-" + hashlib.sha1(str(d.absolute()).encode()).hexdigest()[:10]
        _netns.kill_all(ns)
        _netns.unmount_under(d)
        _netns.delete(ns)


@pytest.fixture
async def vmm_host(
    tmp_path: Path, images: Path, store: EventStore, scheduled: None
) -> AsyncIterator[VmmHost]:
    h = VmmHost(tmp_path, images, store)
    yield h
    await h.cleanup()


class VmmProcess:
    """The VMM as its own process (``python -m pydstack.actors.vmm``), to kill -9 it."""

    def __init__(self, host: VmmHost, server: NatsServer) -> None:
        self.host, self.server = host, server
        self.proc: subprocess.Popen[bytes] | None = None
        self.url_file = host.root / "api.url"

    async def start(self) -> Api:
        self.url_file.unlink(missing_ok=True)
        r = self.host.root
        seed = r / "vmm-identity.seed"  # the host's VMM key (the store's signer), never random
        if not seed.exists():
            write_secret(seed, self.host.store.signer.sodium_key[:32].hex())
        log = (r / "vmm.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pydstack.actors.vmm", "--nats", self.server.url,
             "--host-id", self.host.host_id, "--state-dir", str(r / "vmm"),
             "--supervisor-socket", str(r / "sv.sock"), "--images", str(self.host.images),
             "--api-port", "0", "--api-url-file", str(self.url_file), "--vcpu", "4",
             "--memory-mb", "4096", "--port-range", "1024-65535", "--poll-interval", "0.2",
             "--restart-interval", "0.2", "--restart-backoff", "0.3",
             "--nkey-seed-file", str(seed)],
            stdout=log, stderr=log,
        )  # fmt: skip

        async def ready() -> bool:
            return self.url_file.exists() and bool(self.url_file.read_text())

        await wait_until(ready, 30, "the VMM process API")
        return Api(self.url_file.read_text())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
