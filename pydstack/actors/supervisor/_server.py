"""Run a supervisor on a unix socket until SIGTERM/SIGINT (or, when idle, POST /shutdown).

One supervisor per state dir: an exclusive ``flock`` on ``<state_dir>/supervisor.lock`` makes a
second one fail at once instead of adopting (and then double-managing) the same processes.
On exit the processes keep running for the next supervisor to adopt, unless ``stop_all``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
from pathlib import Path

import structlog
from aiohttp import web

from pydstack.adapters.supervisor import SupervisorError

from ._api import make_app
from ._core import Supervisor, SupervisorSettings

log = structlog.get_logger("supervisor")


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SupervisorError(
            f"another supervisor already owns {state_dir}; talk to it, or stop it first"
        ) from None
    return fd


def _clear_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a supervisor that was killed
            return
    raise SupervisorError(f"{path} is in use by a running server; pick another --socket")


async def serve(
    socket_path: Path, settings: SupervisorSettings, *, stop_all_on_exit: bool = False
) -> None:
    lock_fd = _lock_state_dir(settings.state_dir)
    bound = False  # only a socket this process bound is its to remove
    try:
        _clear_stale_socket(socket_path)
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        async with await Supervisor.open(settings) as sup:
            done = asyncio.Event()  # SIGTERM/SIGINT, or POST /shutdown when idle
            runner = web.AppRunner(make_app(sup, done), handle_signals=False)
            await runner.setup()
            try:
                await web.UnixSite(runner, str(socket_path)).start()
                bound = True
                os.chmod(socket_path, 0o600)
                log.info("supervisor ready", socket=str(socket_path), processes=len(sup.list()))
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, done.set)
                await done.wait()
                log.info("supervisor exiting", stop_all=stop_all_on_exit)
            finally:
                await runner.cleanup()
            if stop_all_on_exit:
                await sup.close(stop_all=True)
    finally:
        if bound:  # a start refused "in use" must not take a running supervisor's socket
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
        os.close(lock_fd)
