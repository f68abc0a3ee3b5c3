"""Typed client of the supervisor API, and a launcher for the supervisor process itself.

Usage::

    async with SupervisorClient(Path("/run/pydstack/supervisor.sock")) as sv:
        info = await sv.deploy(ProcessConfig(id="vm-1", command="qemu-system-x86_64", args=...))
        await sv.stop("vm-1", timeout_s=30)
        await sv.remove("vm-1")
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from ._model import ProcessConfig, ProcessInfo, Reply, StopRequest
from .errors import Conflict, SupervisorError, Unreachable, from_status

T = TypeVar("T")


class SupervisorClient:
    def __init__(self, socket_path: Path, *, timeout_s: float = 60.0) -> None:
        self.socket_path = socket_path
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path)),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def __aenter__(self) -> SupervisorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self, method: str, path: str, out: type[T], body: Any = None, process_id: str = ""
    ) -> T:
        data = None if body is None else msgspec.json.encode(body)
        try:
            async with self._session.request(method, f"http://supervisor{path}", data=data) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientConnectionError, FileNotFoundError) as e:
            raise Unreachable(str(self.socket_path), str(e) or type(e).__name__) from None
        try:
            reply = msgspec.json.decode(raw, type=Reply)
        except msgspec.DecodeError:
            raise SupervisorError(f"supervisor answered {status} with no JSON body") from None
        if status >= 400 or reply.error:
            raise from_status(status, reply.error or f"HTTP {status}", process_id)
        return msgspec.json.decode(reply.data, type=out)

    async def ping(self) -> bool:
        """True when a supervisor answers on the socket."""
        try:
            return await self._call("GET", "/ping", str) == "pong"
        except SupervisorError:
            return False

    async def list(self) -> list[ProcessInfo]:
        return await self._call("GET", "/list", list[ProcessInfo])

    async def info(self, process_id: str) -> ProcessInfo:
        return await self._call("GET", f"/info/{process_id}", ProcessInfo, process_id=process_id)

    async def deploy(self, config: ProcessConfig) -> ProcessInfo:
        return await self._call("POST", "/deploy", ProcessInfo, config, config.id)

    async def start(self, process_id: str) -> ProcessInfo:
        return await self._call("POST", f"/start/{process_id}", ProcessInfo, None, process_id)

    async def stop(self, process_id: str, timeout_s: float | None = None) -> ProcessInfo:
        req = StopRequest(timeout_s=timeout_s)
        return await self._call("POST", f"/stop/{process_id}", ProcessInfo, req, process_id)

    async def kill(self, process_id: str) -> ProcessInfo:
        """SIGKILL at once."""
        return await self.stop(process_id, timeout_s=0)

    async def remove(self, process_id: str) -> None:
        await self._call("DELETE", f"/remove/{process_id}", type(None), None, process_id)

    async def shutdown_if_idle(self) -> bool:
        """Ask the supervisor to exit; False (it stays) while any process runs under it."""
        try:
            await self._call("POST", "/shutdown", type(None))
        except Conflict:
            return False
        return True

    async def wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ping():
            if time.monotonic() > deadline:
                raise Unreachable(str(self.socket_path), f"no answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)


def launch_supervisor(
    socket_path: Path,
    state_dir: Path,
    *,
    log_file: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start a supervisor in its own session, so it outlives the caller (the VMM).

    Wait for it with ``SupervisorClient(socket_path).wait_ready()``.
    """
    log_path = log_file or state_dir / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pydstack.actors.supervisor", "--socket", str(socket_path),
             "--state-dir", str(state_dir), *extra_args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
