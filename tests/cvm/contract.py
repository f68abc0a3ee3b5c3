"""The contract every ``CvmBackend`` keeps, one subclass per backend (test_sandbox, test_qemu).

A subclass provides the ``host`` fixture (a real supervisor process plus the backend on it,
restartable) and ``spec()`` (a CVM of that backend whose guest answers HTTP on ``HTTP_PORT``
once it reported ``ready``). Booting is the slow part, so one test walks a CVM through its
whole life and the others never boot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ClassVar, Protocol

import pytest

from pydstack.actors.supervisor import SupervisorClient, launch_supervisor
from pydstack.adapters.cvm import CvmBackend, CvmError, CvmNotFound, CvmSpec, CvmStatus
from pydstack.adapters.ports import free_port
from pydstack.core.events import PortMap


class Host:
    """A supervisor process and a backend built on it; ``restart_supervisor`` kills -9 it."""

    def __init__(self, root: Path, make: Callable[[SupervisorClient], CvmBackend]) -> None:
        self.root, self.make = root, make
        self.socket = root / "sv.sock"
        self.proc: object = None
        self.client: SupervisorClient | None = None
        self.backend: CvmBackend | None = None

    async def start(self) -> CvmBackend:
        self.proc = launch_supervisor(self.socket, self.root / "supervisor")
        self.client = SupervisorClient(self.socket)
        await self.client.wait_ready()
        self.backend = self.make(self.client)
        return self.backend

    async def kill_supervisor(self) -> None:
        import subprocess

        assert isinstance(self.proc, subprocess.Popen) and self.client is not None
        self.proc.kill()
        self.proc.wait()
        await self.client.close()

    async def close(self) -> None:
        import subprocess

        if self.backend is not None:
            for st in await self.backend.list():
                await self.backend.remove(st.vm_id)
        if self.client is not None:
            await self.client.close()
        if isinstance(self.proc, subprocess.Popen) and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def http_get(port: int, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        return int(r.status)


async def wait_for(
    backend: CvmBackend, vm_id: str, pred: Callable[[CvmStatus], bool], timeout_s: float
) -> CvmStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        st = await backend.status(vm_id)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm_id} never got there; last status {st}")
        await asyncio.sleep(0.1)


class _HasSpec(Protocol):
    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec: ...


class CvmBackendContract:
    """Subclass, set ``BOOT_TIMEOUT_S``/``HTTP_PORT``, provide ``host`` and ``spec``."""

    BOOT_TIMEOUT_S: ClassVar[float] = 30.0
    HTTP_PORT: ClassVar[int] = 8080  # the port inside the guest that answers once ready

    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec:
        raise NotImplementedError

    @pytest.fixture
    async def backend(self, host: Host) -> AsyncIterator[CvmBackend]:
        yield await host.start()

    async def test_create_prepares_without_starting(self, backend: CvmBackend) -> None:
        """create writes the work dir and keeps the CID; nothing runs yet; twice is the same."""
        spec = self.spec("c1", cid=1234)
        st = await backend.create(spec)
        assert (st.state, st.cid, st.pid) == ("created", 1234, None)
        again = await backend.create(spec)
        assert (again.state, again.cid) == ("created", 1234)
        assert [s.vm_id for s in await backend.list()] == ["c1"]
        assert (await backend.events("c1", 0))[0] == []

    async def test_unknown_and_invalid_ids_are_refused(self, backend: CvmBackend) -> None:
        """Every verb on an unknown CVM raises CvmNotFound; an id with a slash is refused."""
        for call in (backend.start, backend.status, backend.kill, backend.remove):
            with pytest.raises(CvmNotFound):
                await call("nope")
        with pytest.raises(CvmNotFound):
            await backend.stop("nope", timeout_s=1)
        with pytest.raises(CvmError):
            await backend.status("../etc")

    async def test_remove_forgets_a_created_cvm(self, backend: CvmBackend) -> None:
        await backend.create(self.spec("r1", cid=1001))
        await backend.remove("r1")
        assert await backend.list() == []
        with pytest.raises(CvmNotFound):
            await backend.status("r1")

    async def test_lifecycle(self, host: Host, backend: CvmBackend) -> None:
        """start → ready (port map answers) → adopted across a supervisor kill -9 with the same
        pid and CID → a killed guest is "exited", not "stopped" → start again → graceful stop is
        "stopped" → kill of a stopped CVM is a no-op → remove."""
        port = free_port()
        spec = self.spec("l1", cid=1500, ports=(PortMap(host_port=port, vm_port=self.HTTP_PORT),))
        await backend.create(spec)
        st = await backend.start("l1")
        assert st.state == "running" and st.pid and st.cid == 1500
        first_pid = st.pid
        assert (await backend.start("l1")).pid == first_pid  # idempotent: no second guest
        await wait_for(backend, "l1", lambda s: s.boot_stage == "ready", self.BOOT_TIMEOUT_S)
        events, offset = await backend.events("l1", 0)
        stages = [e.stage for e in events]
        assert stages[0] == "booted" and "ready" in stages, stages
        assert (await backend.events("l1", offset))[0] == []
        assert await asyncio.to_thread(http_get, port) == 200

        await host.kill_supervisor()
        backend = await host.start()
        [adopted] = await backend.list()
        assert (adopted.state, adopted.pid, adopted.cid, adopted.adopted) == (
            "running", first_pid, 1500, True,
        )  # fmt: skip
        assert await asyncio.to_thread(http_get, port) == 200

        os.kill(first_pid, signal.SIGKILL)  # the guest dies on its own: a crash
        crashed = await wait_for(backend, "l1", lambda s: s.state != "running", 15)
        assert crashed.state in ("exited", "error"), crashed

        st = await backend.start("l1")
        assert st.state == "running" and st.pid != first_pid and st.cid == 1500
        await wait_for(backend, "l1", lambda s: s.boot_stage == "ready", self.BOOT_TIMEOUT_S)
        assert await asyncio.to_thread(http_get, port) == 200

        stopped = await backend.stop("l1", timeout_s=self.BOOT_TIMEOUT_S)
        assert stopped.state == "stopped", stopped
        assert (await backend.kill("l1")).state == "stopped"
        with pytest.raises(OSError):
            await asyncio.to_thread(http_get, port, 2.0)
        await backend.remove("l1")
        assert await backend.list() == []
