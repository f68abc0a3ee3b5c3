"""A real supervisor process on a unix socket in a temp dir, and helpers to kill it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from pydstack.actors.supervisor import (
    ProcessConfig,
    ProcessState,
    SupervisorClient,
    launch_supervisor,
)
from pydstack.actors.supervisor._procfs import is_same_process


def sleeper(pid_id: str, *, seconds: int = 600, cid: int | None = None) -> ProcessConfig:
    """A long-running child whose command line names it (so leftovers are easy to spot)."""
    return ProcessConfig(
        id=pid_id,
        command=sys.executable,
        args=("-c", f"import time; print('up', flush=True); time.sleep({seconds})", pid_id),
        cid=cid,
        stop_timeout_s=5,
    )


@dataclass
class SupervisorHarness:
    socket: Path
    state_dir: Path
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)

    async def start(self) -> SupervisorClient:
        self.proc = launch_supervisor(self.socket, self.state_dir, extra_args=self.extra_args)
        client = SupervisorClient(self.socket, timeout_s=30)
        await client.wait_ready()
        return client

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 10)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[SupervisorHarness]:
    h = SupervisorHarness(
        socket=tmp_path / "sv.sock",
        state_dir=tmp_path / "state",
        extra_args=("--rotate-interval", "0.2"),
    )
    yield h
    await h.stop()
    _kill_leftovers(h)


def _kill_leftovers(h: SupervisorHarness) -> None:
    """Whatever a test left running (processes outlive the supervisor by design) is killed."""
    procs = h.state_dir / "procs"
    if not procs.exists():
        return
    for state_file in procs.glob("*/state.json"):
        st = msgspec.json.decode(state_file.read_bytes(), type=ProcessState)
        if st.pid and is_same_process(st.pid, st.start_ticks, st.cmdline):
            try:
                os.kill(st.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
