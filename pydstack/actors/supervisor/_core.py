"""The supervisor proper: spawn, watch, stop and forget processes; adopt them after a restart.

Every process is a session leader writing its own log files, so neither a client dying nor the
supervisor dying touches it. What the supervisor knows is on disk under
``<state_dir>/procs/<id>/`` (``config.json``, ``state.json``) and is rewritten on each change;
on start the supervisor reads it back and adopts every process that is still the one it
launched (same pid, start time and command line), and marks the others exited.

Exit is observed through a pidfd (readable when the process ends), for own children and
adopted processes alike; only own children yield an exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from pydstack.adapters.supervisor import (
    ID_PATTERN,
    Conflict,
    NotFound,
    ProcessConfig,
    ProcessInfo,
    ProcessState,
    SupervisorError,
)

from . import _procfs
from ._logs import open_for_child, rotate_if_large

log = structlog.get_logger("supervisor")

_UNKNOWN_EXIT = "exited while the supervisor was down (exit status unknown)"


@dataclass(eq=False)
class _Entry:
    config: ProcessConfig
    state: ProcessState
    dir: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    stopping: bool = False

    def log_path(self, which: str) -> Path:
        given = self.config.stdout if which == "stdout" else self.config.stderr
        return Path(given) if given else self.dir / f"{which}.log"

    def info(self) -> ProcessInfo:
        return ProcessInfo(
            config=self.config,
            state=msgspec.structs.replace(self.state),
            stdout_path=str(self.log_path("stdout")),
            stderr_path=str(self.log_path("stderr")),
        )


@dataclass(frozen=True, kw_only=True)
class SupervisorSettings:
    state_dir: Path
    log_max_bytes: int = 16 * 1024 * 1024
    log_backups: int = 3
    rotate_interval_s: float = 1.0
    proc: Path = Path("/proc")


class Supervisor:
    """Owns the processes of one state dir. Build with ``await Supervisor.open(settings)``.

    Usage::

        async with await Supervisor.open(SupervisorSettings(state_dir=d)) as sup:
            await sup.deploy(ProcessConfig(id="vm1", command="qemu-system-x86_64", args=(...)))
    """

    def __init__(self, settings: SupervisorSettings) -> None:
        self.settings = settings
        self._entries: dict[str, _Entry] = {}
        self._registry = asyncio.Lock()  # deploy/remove change the set of entries
        self._rotator: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: SupervisorSettings) -> Supervisor:
        sup = cls(settings)
        sup._procs_dir.mkdir(parents=True, exist_ok=True)
        sup._load_and_adopt()
        sup._rotator = asyncio.create_task(sup._rotate_loop(), name="supervisor-log-rotation")
        return sup

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, stop_all: bool = False) -> None:
        """Stop watching. Processes keep running unless ``stop_all`` (a later open adopts them)."""
        if self._rotator is not None:
            self._rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotator
            self._rotator = None
        if stop_all:
            await asyncio.gather(
                *(self.stop(e.config.id) for e in list(self._entries.values())),
                return_exceptions=True,
            )
        for e in self._entries.values():
            self._unwatch(e)

    @property
    def _procs_dir(self) -> Path:
        return self.settings.state_dir / "procs"

    # ---- queries ---------------------------------------------------------------------------

    def list(self) -> list[ProcessInfo]:
        return [e.info() for e in sorted(self._entries.values(), key=lambda e: e.config.id)]

    def info(self, process_id: str) -> ProcessInfo:
        return self._get(process_id).info()

    def _get(self, process_id: str) -> _Entry:
        try:
            return self._entries[process_id]
        except KeyError:
            raise NotFound(process_id) from None

    # ---- commands --------------------------------------------------------------------------

    async def deploy(self, config: ProcessConfig) -> ProcessInfo:
        """Register ``config`` and start it. An existing, not running id is replaced."""
        if not ID_PATTERN.match(config.id):
            raise SupervisorError(
                f"id {config.id!r}: use letters, digits, '_', '.', '-' (at most 128, "
                "not starting with '.' or '-')"
            )
        async with self._registry:
            old = self._entries.get(config.id)
            if old is not None and old.state.status == "running":
                raise Conflict(f"process {config.id!r} is running: stop it before deploying again")
            self._check_cid(config)
            entry = _Entry(
                config=config,
                state=old.state if old else ProcessState(),
                dir=self._procs_dir / config.id,
            )
            entry.dir.mkdir(parents=True, exist_ok=True)
            # Config before the spawn and state right after it (in _spawn): a crash in
            # between leaves no process that a restarted supervisor cannot find.
            _write_json(entry.dir / "config.json", config)
            try:
                self._spawn(entry)
            except SupervisorError:
                if old is None:
                    (entry.dir / "config.json").unlink(missing_ok=True)
                else:
                    _write_json(entry.dir / "config.json", old.config)
                raise
            self._entries[config.id] = entry
        log.info("deployed", id=config.id, pid=entry.state.pid, cid=config.cid)
        return entry.info()

    async def start(self, process_id: str) -> ProcessInfo:
        entry = self._get(process_id)
        async with entry.lock:
            if entry.state.status == "running":
                raise Conflict(f"process {process_id!r} is already running")
            async with self._registry:
                self._check_cid(entry.config)
            try:
                self._spawn(entry)
            except SupervisorError as e:
                entry.state.status, entry.state.reason = "error", str(e)
                self._persist(entry)
                raise
            self._persist(entry)
        log.info("started", id=process_id, pid=entry.state.pid)
        return entry.info()

    async def stop(self, process_id: str, timeout_s: float | None = None) -> ProcessInfo:
        """SIGTERM, then SIGKILL after ``timeout_s`` (0: SIGKILL at once); returns when gone."""
        entry = self._get(process_id)
        grace = entry.config.stop_timeout_s if timeout_s is None else max(0.0, timeout_s)
        async with entry.lock:
            if entry.state.status != "running":
                return entry.info()
            entry.stopping = True
            self._signal(entry, signal.SIGKILL if grace == 0 else signal.SIGTERM)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns when the exit and a
            # cancel arrive together, losing the cancel (close(stop_all=True) runs at shutdown).
            try:
                async with asyncio.timeout(grace or 10.0):
                    await entry.exited.wait()
            except TimeoutError:
                log.warning("stop timed out, killing", id=process_id, grace_s=grace)
                self._signal(entry, signal.SIGKILL)
                async with asyncio.timeout(10.0):
                    await entry.exited.wait()
        log.info("stopped", id=process_id, exit_code=entry.state.exit_code)
        return entry.info()

    async def remove(self, process_id: str) -> None:
        """Forget a process that is not running, with its state dir (and logs kept there)."""
        entry = self._get(process_id)
        async with entry.lock, self._registry:
            if entry.state.status == "running":
                raise Conflict(f"process {process_id!r} is running: stop it before removing")
            self._entries.pop(process_id, None)
            for p in sorted(entry.dir.glob("*"), reverse=True):
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                entry.dir.rmdir()
        log.info("removed", id=process_id)

    # ---- internals -------------------------------------------------------------------------

    def _check_cid(self, config: ProcessConfig) -> None:
        """A CID belongs to one deployed process, running or not (dstack #996), and never to a
        process on this host that the supervisor did not start (dstack #997)."""
        cid = config.cid
        if cid is None:
            return
        for other in self._entries.values():
            if other.config.id != config.id and other.config.cid == cid:
                raise Conflict(
                    f"cid {cid} is held by process {other.config.id!r} "
                    f"({other.state.status}); remove that process or pick another cid"
                )
        ours = {e.state.pid for e in self._entries.values() if e.state.pid}
        foreign = _procfs.cids_in_use({p for p in ours if p is not None}, self.settings.proc)
        if cid in foreign:
            raise Conflict(f"cid {cid} is used by pid {foreign[cid]}, not started by this "
                           "supervisor; pick another cid")  # fmt: skip

    def _spawn(self, entry: _Entry) -> None:
        cfg = entry.config
        out_path, err_path = entry.log_path("stdout"), entry.log_path("stderr")
        out_fd = open_for_child(out_path)
        err_fd = out_fd if err_path == out_path else open_for_child(err_path)
        user = cfg.user  # the log fds are opened above as root; the child gets only the fds
        try:
            popen = subprocess.Popen(
                cfg.argv,
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=err_fd,
                cwd=cfg.cwd or None,
                env={**os.environ, **cfg.env},
                start_new_session=True,  # signals to our group never reach it
                close_fds=True,
                # setgroups(groups) before setgid/setuid: none of root's groups are kept
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=list(user.groups) if user else None,
            )
        except OSError as e:
            raise SupervisorError(f"cannot start {cfg.command!r}: {e.strerror or e}") from None
        finally:
            os.close(out_fd)
            if err_fd != out_fd:
                os.close(err_fd)
        pid = popen.pid
        # Popen returns after exec succeeded, so /proc shows the new program already.
        entry.state = ProcessState(
            status="running",
            pid=pid,
            start_ticks=_procfs.start_ticks(pid, self.settings.proc),
            cmdline=_procfs.cmdline(pid, self.settings.proc) or cfg.argv,
            started_at_ns=time.time_ns(),
            starts=entry.state.starts + 1,
        )
        entry.popen, entry.stopping = popen, False
        entry.exited = asyncio.Event()
        self._persist(entry)
        if cfg.pidfile:
            Path(cfg.pidfile).write_text(f"{pid}\n")
        self._watch(entry, os.pidfd_open(pid))

    def _watch(self, entry: _Entry, pidfd: int) -> None:
        entry.pidfd = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, entry)

    def _unwatch(self, entry: _Entry) -> None:
        if entry.pidfd is not None:
            asyncio.get_running_loop().remove_reader(entry.pidfd)
            os.close(entry.pidfd)
            entry.pidfd = None

    def _on_exit(self, entry: _Entry) -> None:
        self._unwatch(entry)
        code = entry.popen.wait() if entry.popen is not None else None
        entry.popen = None
        st = entry.state
        st.status = "stopped" if entry.stopping else "exited"
        st.exit_code, st.stopped_at_ns = code, time.time_ns()
        if entry.stopping:
            st.reason = "stopped on request"
        elif code is None:
            st.reason = "exited (adopted process: exit status unknown)"
        elif code < 0:
            st.reason = f"killed by signal {signal.Signals(-code).name}"
        else:
            st.reason = f"exited with status {code}"
        self._persist(entry)
        entry.exited.set()
        log.info("process ended", id=entry.config.id, status=st.status, exit_code=code)

    def _signal(self, entry: _Entry, sig: signal.Signals) -> None:
        if entry.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(entry.pidfd, sig)

    def _persist(self, entry: _Entry) -> None:
        _write_json(entry.dir / "state.json", entry.state)

    def _load_and_adopt(self) -> None:
        for d in sorted(p for p in self._procs_dir.iterdir() if p.is_dir()):
            try:
                config = msgspec.json.decode((d / "config.json").read_bytes(), type=ProcessConfig)
                state_file = d / "state.json"
                state = (
                    msgspec.json.decode(state_file.read_bytes(), type=ProcessState)
                    if state_file.exists()
                    else ProcessState()
                )
            except (OSError, msgspec.DecodeError) as e:
                log.warning("skipping unreadable process state", dir=str(d), error=str(e))
                continue
            entry = _Entry(config=config, state=state, dir=d)
            self._entries[config.id] = entry
            if state.status == "running":
                self._adopt(entry)

    def _adopt(self, entry: _Entry) -> None:
        st, proc = entry.state, self.settings.proc
        pidfd: int | None = None
        if st.pid is not None and _procfs.is_same_process(st.pid, st.start_ticks, st.cmdline, proc):
            with contextlib.suppress(ProcessLookupError):
                pidfd = os.pidfd_open(st.pid)
        # The pidfd pins the pid: check again so a pid reused in between is not adopted.
        if (
            pidfd is not None
            and st.pid is not None
            and _procfs.is_same_process(st.pid, st.start_ticks, st.cmdline, proc)
        ):
            st.adopted = True
            self._watch(entry, pidfd)
            log.info("adopted", id=entry.config.id, pid=st.pid)
        else:
            if pidfd is not None:
                os.close(pidfd)
            st.status, st.exit_code, st.reason = "exited", None, _UNKNOWN_EXIT
            st.stopped_at_ns = time.time_ns()
            log.info("found exited", id=entry.config.id, pid=st.pid)
        self._persist(entry)

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rotate_interval_s)
            for e in list(self._entries.values()):
                if e.state.status != "running":
                    continue
                limit = e.config.log_max_bytes or self.settings.log_max_bytes
                keep = (
                    e.config.log_backups
                    if e.config.log_backups >= 0
                    else (self.settings.log_backups)
                )
                paths = {e.log_path("stdout"), e.log_path("stderr"), *map(Path, e.config.logs)}
                for p in paths:
                    try:
                        if await asyncio.to_thread(rotate_if_large, p, limit, keep):
                            log.info("log rotated", id=e.config.id, path=str(p))
                    except OSError as err:
                        log.warning("log rotation failed", path=str(p), error=str(err))


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(obj))
    os.replace(tmp, path)
