"""HAProxy as a child process: check the version, start on a config, stop.

HAProxy runs in the foreground (``-db``, one process, no master) so the pid we hold is the
pid that serves; the plane never reloads it for a table change. Listening sockets can be
inherited (``bind fd@N``): the caller binds, so port 0 works and there is no bind race.

Usage::

    proc = await HaproxyProcess.start(paths, pass_fds=(listener.fileno(),))
    ...
    await proc.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from pathlib import Path

from .config import RunPaths
from .runtime import HaproxyError, RuntimeApi

MIN_VERSION = (2, 4)  # global set-var, runtime `set var`, map/server runtime commands


def haproxy_version(binary: str = "haproxy") -> tuple[int, int, int]:
    """The version of ``binary`` (``haproxy -v``), e.g. (2, 6, 12)."""
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HaproxyError(f"cannot run {binary!r} -v: {exc}; install Debian's haproxy") from exc
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise HaproxyError(f"{binary} -v printed no version: {out[:200]!r}")
    return int(m[1]), int(m[2]), int(m[3])


def check_config(paths: RunPaths, binary: str = "haproxy") -> None:
    """``haproxy -c``: raise with HAProxy's own alerts when the config is invalid."""
    done = subprocess.run(
        [binary, "-c", "-f", str(paths.config)], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise HaproxyError(f"invalid HAProxy config {paths.config}:\n{done.stderr.strip()}")


class HaproxyProcess:
    def __init__(self, proc: asyncio.subprocess.Process, paths: RunPaths, log_path: Path) -> None:
        self.proc, self.paths, self.log_path = proc, paths, log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(
        cls,
        paths: RunPaths,
        *,
        binary: str = "haproxy",
        pass_fds: tuple[int, ...] = (),
        ready_timeout: float = 10.0,
    ) -> HaproxyProcess:
        """Start HAProxy on ``paths.config``; return once its runtime API answers."""
        version = haproxy_version(binary)
        if version[:2] < MIN_VERSION:
            raise HaproxyError(f"HAProxy {version} is too old: need >= {MIN_VERSION}")
        log_path = paths.root / "haproxy.log"
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - a local file, opened once
            proc = await asyncio.create_subprocess_exec(
                binary, "-db", "-f", str(paths.config),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=pass_fds,
            )  # fmt: skip
        self = cls(proc, paths, log_path)
        api = RuntimeApi(paths.admin, timeout=1.0)
        deadline = asyncio.get_running_loop().time() + ready_timeout
        while True:
            if proc.returncode is not None:
                raise HaproxyError(f"HAProxy exited with {proc.returncode}: {self.log_tail()}")
            try:
                if (await api.info()).get("Pid") == str(proc.pid):
                    return self
            except HaproxyError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise HaproxyError(f"HAProxy not ready in {ready_timeout}s: {self.log_tail()}")
            await asyncio.sleep(0.02)

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:].strip()
        return ""

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (immediate stop), then SIGKILL if it lingers."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancel
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
