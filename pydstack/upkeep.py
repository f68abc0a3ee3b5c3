"""What `pydstack up` does when a child it started dies: restart it with backoff, give up
only on repeated crashes within a window.

Usage::

    budget = RestartBudget()                      # 4 crashes within 60 s: give up
    await keep_nats_server(server, budget, on_restart=note)   # returns never; raises
                                                              # Crashing when out of budget

The embedded nats-server restarts on the same config, store dir and port, so JetStream
recovers the stream and every durable consumer from its files, and every client (nats-py
reconnects by itself) resumes where it was.

An `up` killed without its cleanup (kill -9, then a restart by systemd) finds the nats-server
it left still serving the data dir: `orphaned_nats_server` names it and `stop_orphan` stops
it, so the new `up` starts its own on the same store instead of failing on a taken port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import structlog

from pydstack.adapters.nats import NatsServer, StoreError

_log = structlog.get_logger("pydstack.up")


class Crashing(StoreError):
    """A component crashed too often within the window: `up` stops (one line, no traceback)."""


@dataclass
class RestartBudget:
    """How often a component may crash before `up` gives up, and how long to wait before
    each restart (doubling per recent crash, capped)."""

    limit: int = 4  # this many crashes within window_s: stop
    window_s: float = 60.0
    first_delay_s: float = 0.25
    max_delay_s: float = 5.0
    _crashes: deque[float] = field(default_factory=deque, init=False, repr=False)

    def crashed(self, now: float) -> float | None:
        """Note a crash at `now` (monotonic seconds); the delay before the restart, or None
        when this crash exhausts the budget."""
        self._crashes.append(now)
        while self._crashes and self._crashes[0] <= now - self.window_s:
            self._crashes.popleft()
        recent = len(self._crashes)
        if recent >= self.limit:
            return None
        return min(self.first_delay_s * 2.0 ** (recent - 1), self.max_delay_s)

    @property
    def recent(self) -> int:
        return len(self._crashes)


@dataclass(frozen=True, slots=True)
class Restarted:
    """One restart of a component, as `on_restart` sees it."""

    component: str
    reason: str  # e.g. "exited with code -9"
    down_s: float  # from noticing the crash to the component serving again
    recent: int  # crashes within the budget's window, this one included


async def _exit_code(server: NatsServer) -> int | None:
    proc = server.proc
    assert proc is not None
    return await asyncio.to_thread(proc.wait)


async def keep_nats_server(
    server: NatsServer,
    budget: RestartBudget,
    on_restart: Callable[[Restarted], None] | None = None,
) -> NoReturn:
    """Wait for the server to die and start it again on the same config, until the budget
    runs out (then raise `Crashing`, naming its log). `on_restart` is called after each
    restart (schedule slow work from it). Cancel this to stop watching: stopping the server
    is its owner's job."""
    loop = asyncio.get_running_loop()
    while True:
        code = await _exit_code(server)
        reason = f"exited with code {code}"
        noticed = loop.time()
        while True:
            delay = budget.crashed(loop.time())
            if delay is None:
                raise Crashing(
                    f"nats-server crashed {budget.recent} times within {budget.window_s:.0f}s "
                    f"(last: {reason}); see {server.log_path}; stopping the control plane"
                )
            _log.warning("nats-server crashed; restarting it", reason=reason, retry_in_s=delay,
                         crashes=budget.recent, log=str(server.log_path))  # fmt: skip
            await asyncio.sleep(delay)
            try:
                await server.start()
            except StoreError as exc:  # e.g. the port taken meanwhile: counts as a crash
                reason = f"restart failed: {exc}"
                continue
            break
        event = Restarted("nats-server", reason, loop.time() - noticed, budget.recent)
        _log.info("nats-server restarted", reason=reason, down_s=round(event.down_s, 2),
                  pid=server.proc.pid if server.proc else None)  # fmt: skip
        if on_restart is not None:
            on_restart(event)  # not awaited: watching goes on at once


ORPHAN_STOP_S = 10.0  # as NatsServer.stop: JetStream flushes its store on SIGTERM


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def orphaned_nats_server(nats_dir: Path, conf_path: Path) -> int | None:
    """The pid of a nats-server that an `up` killed without its cleanup (kill -9, OOM) left
    serving this data dir, found by the ports file it writes (``ports/nats-server_<pid>.ports``;
    state.json may be gone, a later failed `up` removes it). Only a live nats-server started
    on this data dir's config counts: a pid the kernel reused for anything else is never
    touched."""
    try:
        names = [p.name for p in (nats_dir / "ports").iterdir()]
    except OSError:
        return None
    for name in names:
        stem = name.removeprefix("nats-server_").removesuffix(".ports")
        if not stem.isdigit() or int(stem) <= 1 or not _alive(int(stem)):
            continue
        argv = _cmdline(int(stem))
        if argv and Path(argv[0]).name == "nats-server" and str(conf_path) in argv:
            return int(stem)
    return None


async def stop_orphan(pid: int, what: str) -> None:
    """SIGTERM, then SIGKILL after ORPHAN_STOP_S; returns once it is gone (not our child:
    polled, not waited for)."""
    _log.warning("stopping what a killed `up` left running", component=what, pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ORPHAN_STOP_S
    while _alive(pid):
        if loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = loop.time() + ORPHAN_STOP_S
        await asyncio.sleep(0.05)


Failed = Callable[[], Awaitable[str]]  # returns (or raises) when the component stopped working
Opener = Callable[[contextlib.AsyncExitStack], Awaitable[Failed]]


class KeptComponent:
    """One component inside `up` (an actor, the gateway node) rebuilt in place when it fails,
    with backoff, while the others go on; only repeated failures within the budget's window
    stop `up` (`Crashing`, naming it).

    ``open`` enters everything the component needs into the stack it is given (its own NATS
    connection included, so a restart shares no state with the failed instance) and returns
    what to await for its failure. The first start is the caller's (its errors stop `up` as
    any start-up error does); ``watch`` then runs for as long as `up` does."""

    def __init__(
        self,
        name: str,
        open: Opener,
        budget: RestartBudget,
        on_restart: Callable[[Restarted], None] | None = None,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.name = name
        self._open = open
        self.budget = budget
        self._on_restart = on_restart
        self._grace = stop_grace_s
        self._stack = contextlib.AsyncExitStack()
        self._failed: Failed | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._failed = await self._open(self._stack)
        except BaseException:
            await self._close_stack()
            raise

    def watching(self) -> asyncio.Task[None]:
        self._watch = asyncio.create_task(self._watch_forever(), name=self.name)
        return self._watch

    async def _reason(self) -> str:
        assert self._failed is not None
        try:
            return await self._failed()
        except Exception as exc:  # the component's own failure: its text is the reason
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _watch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            reason = await self._reason()
            noticed = loop.time()
            await self._close_stack()
            while True:
                delay = self.budget.crashed(loop.time())
                if delay is None:
                    raise Crashing(
                        f"{self.name} failed {self.budget.recent} times within "
                        f"{self.budget.window_s:.0f}s (last: {reason}); see up's log; "
                        "stopping the control plane"
                    )
                _log.warning(f"{self.name} failed; restarting it", reason=reason,
                             retry_in_s=delay, crashes=self.budget.recent)  # fmt: skip
                await asyncio.sleep(delay)
                try:
                    self._failed = await self._open(self._stack)
                except Exception as exc:  # e.g. NATS still down: counts as another failure
                    reason = f"restart failed: {exc}"
                    await self._close_stack()
                    continue
                break
            event = Restarted(self.name, reason, loop.time() - noticed, self.budget.recent)
            _log.info(f"{self.name} restarted", reason=reason, down_s=round(event.down_s, 2))
            if self._on_restart is not None:
                self._on_restart(event)

    async def _close_stack(self) -> None:
        """Close what the current instance holds, bounded; its own errors (a failed instance
        often fails again while closing) are logged, never raised."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(self._grace):
                await stack.aclose()
        except TimeoutError:
            _log.error("component did not stop in time; abandoned", component=self.name)
        except Exception as exc:
            _log.info("component closed with an error", component=self.name, error=str(exc))

    async def aclose(self) -> None:
        """At `up`'s stop: no more restarts, then close the instance running now."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        await self._close_stack()
