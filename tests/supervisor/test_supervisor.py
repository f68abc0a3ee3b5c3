"""The supervisor as its own process: lifecycle, exit reasons, CIDs, adoption after kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from pydstack.actors.supervisor import (
    Conflict,
    NotFound,
    ProcessConfig,
    ProcessInfo,
    SupervisorClient,
    SupervisorError,
    launch_supervisor,
)
from pydstack.actors.supervisor._procfs import is_alive
from pydstack.adapters.supervisor import RunAs

from .conftest import SupervisorHarness, sleeper


async def until(pred: Callable[[], Awaitable[bool] | bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await _value(pred()):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _value(v: Awaitable[bool] | bool) -> bool:
    return v if isinstance(v, bool) else await v


def count_processes_with(marker: str) -> int:
    """How many live processes carry ``marker`` as an argument (catches duplicates)."""
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and is_alive(int(d.name)):
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            n += marker.encode() in argv
    return n


async def test_deploy_runs_logs_stops_and_removes(harness: SupervisorHarness) -> None:
    """A deployed process runs with its output in its log; stop ends it, remove forgets it."""
    async with await harness.start() as sv:
        info = await sv.deploy(sleeper("p1"))
        assert info.running and info.state.pid and is_alive(info.state.pid)
        await until(lambda: _log_has(info.stdout_path, "up"))
        stopped = await sv.stop("p1")
        assert stopped.state.status == "stopped" and stopped.state.exit_code == -15
        assert not is_alive(info.state.pid)
        await sv.remove("p1")
        with pytest.raises(NotFound):
            await sv.info("p1")
        assert not (harness.state_dir / "procs" / "p1").exists()


def _log_has(path: str, text: str) -> bool:
    return Path(path).exists() and text in Path(path).read_text()


async def test_exit_status_and_reason_are_reported(harness: SupervisorHarness) -> None:
    """A process that exits on its own is ``exited`` with its status, not ``stopped``."""
    async with await harness.start() as sv:
        cfg = ProcessConfig(id="dies", command=sys.executable, args=("-c", "exit(3)"))
        await sv.deploy(cfg)
        await until(lambda: _status_is(sv, "dies", "exited"))
        st = (await sv.info("dies")).state
        assert (st.exit_code, st.reason) == (3, "exited with status 3")


async def _status_is(sv: SupervisorClient, pid_id: str, status: str) -> bool:
    return (await sv.info(pid_id)).state.status == status


async def test_stop_escalates_to_sigkill_after_the_grace(harness: SupervisorHarness) -> None:
    """A process ignoring SIGTERM is killed once its stop timeout has passed."""
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    async with await harness.start() as sv:
        await sv.deploy(ProcessConfig(id="stubborn", command=sys.executable, args=("-c", code)))
        await asyncio.sleep(0.3)  # let it install the handler
        t0 = time.monotonic()
        st = (await sv.stop("stubborn", timeout_s=0.5)).state
        assert st.status == "stopped" and st.exit_code == -9
        assert 0.5 <= time.monotonic() - t0 < 5


async def test_running_process_cannot_be_redeployed_or_removed(harness: SupervisorHarness) -> None:
    async with await harness.start() as sv:
        await sv.deploy(sleeper("busy"))
        with pytest.raises(Conflict, match="running"):
            await sv.deploy(sleeper("busy"))
        with pytest.raises(Conflict, match="stop it before removing"):
            await sv.remove("busy")
        await sv.kill("busy")
        await sv.remove("busy")


async def test_bad_requests_name_the_problem(harness: SupervisorHarness) -> None:
    async with await harness.start() as sv:
        with pytest.raises(SupervisorError, match=r"id '\.\./x'"):
            await sv.deploy(ProcessConfig(id="../x", command="true"))
        with pytest.raises(SupervisorError, match="cannot start '/nonexistent/bin'"):
            await sv.deploy(ProcessConfig(id="nobin", command="/nonexistent/bin"))
        with pytest.raises(NotFound):
            await sv.info("nobin")  # a failed deploy registers nothing
        async with harness_raw_post(
            harness, "/deploy", {"id": "x", "command": "a", "bogus": 1}
        ) as (
            status,
            body,
        ):
            assert status == 400 and "bogus" in body["error"]


class harness_raw_post:
    """POST raw JSON to the supervisor socket, to send what the typed client never would."""

    def __init__(self, h: SupervisorHarness, path: str, body: object) -> None:
        self.h, self.path, self.body = h, path, body

    async def __aenter__(self) -> tuple[int, dict[str, str]]:
        import aiohttp

        conn = aiohttp.UnixConnector(path=str(self.h.socket))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.post(f"http://x{self.path}", data=json.dumps(self.body)) as r:
                return r.status, await r.json()

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_cid_of_a_stopped_process_stays_reserved(harness: SupervisorHarness) -> None:
    """dstack #996: a stopped process keeps its CID, also across a supervisor restart."""
    async with await harness.start() as sv:
        await sv.deploy(sleeper("vm-a", cid=1000))
        await sv.stop("vm-a")
    harness.kill9()
    async with await harness.start() as sv:
        with pytest.raises(Conflict, match="cid 1000 is held by process 'vm-a'"):
            await sv.deploy(sleeper("vm-b", cid=1000))
        await sv.remove("vm-a")
        assert (await sv.deploy(sleeper("vm-b", cid=1000))).running
        await sv.kill("vm-b")


async def test_cid_used_by_an_unsupervised_process_is_refused(
    harness: SupervisorHarness,
) -> None:
    """dstack #997: a QEMU started outside the supervisor still holds its CID."""
    foreign = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(600)",
            "-device",
            "vhost-vsock-pci,guest-cid=4242",
        ]
    )
    try:
        async with await harness.start() as sv:
            with pytest.raises(Conflict, match=f"cid 4242 is used by pid {foreign.pid}"):
                await sv.deploy(sleeper("vm-c", cid=4242))
    finally:
        foreign.kill()
        foreign.wait()


async def test_killed_client_loses_nothing(harness: SupervisorHarness, tmp_path: Path) -> None:
    """kill -9 of a client mid-request: processes keep running and its stop still completes."""
    code = (
        "import signal,time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('got TERM', flush=True))\n"
        "while True: time.sleep(1)"
    )
    async with await harness.start() as sv:
        for i in range(3):
            await sv.deploy(sleeper(f"keep{i}"))
        await sv.deploy(
            ProcessConfig(
                id="slow-stop", command=sys.executable, args=("-c", code), stop_timeout_s=1.5
            )
        )
        before = {p.config.id: p.state.pid for p in await sv.list()}
        script = (
            "import asyncio,sys; from pathlib import Path;"
            "from pydstack.actors.supervisor import SupervisorClient as C\n"
            "async def m():\n"
            "    async with C(Path(sys.argv[1])) as c: await c.stop('slow-stop')\n"
            "asyncio.run(m())"
        )
        client = subprocess.Popen([sys.executable, "-c", script, str(harness.socket)])
        # SIGTERM reached the process: the stop request is in flight inside its 1.5 s grace.
        slow_log = (await sv.info("slow-stop")).stdout_path
        await until(lambda: _log_has(slow_log, "got TERM"))
        client.kill()
        client.wait()
        await until(lambda: _status_is(sv, "slow-stop", "stopped"), timeout_s=10)
        after = {p.config.id: p for p in await sv.list()}
        for i in range(3):
            p = after[f"keep{i}"]
            assert p.running and p.state.pid == before[f"keep{i}"] and is_alive(p.state.pid)
        assert after["slow-stop"].state.exit_code == -9


async def test_restart_after_kill9_adopts_without_duplicates(harness: SupervisorHarness) -> None:
    """kill -9 the supervisor: its processes live on, a new one adopts them, starts none."""
    async with await harness.start() as sv:
        infos = [await sv.deploy(sleeper(f"vm{i}", cid=10 + i)) for i in range(3)]
    harness.kill9()
    pids = {i.config.id: i.state.pid for i in infos}
    assert all(p and is_alive(p) for p in pids.values())
    async with await harness.start() as sv:
        listed = {p.config.id: p for p in await sv.list()}
        assert {k: v.state.pid for k, v in listed.items()} == pids
        assert all(p.running and p.state.adopted for p in listed.values())
        for i in range(3):
            assert count_processes_with(f"vm{i}") == 1
        with pytest.raises(Conflict):
            await sv.deploy(sleeper("vm0"))  # no second copy of an adopted process
        with pytest.raises(Conflict, match="cid 11"):
            await sv.deploy(sleeper("other", cid=11))
        # Adopted processes are still controlled: stop reaches the right pid.
        st = (await sv.stop("vm1")).state
        assert st.status == "stopped" and not is_alive(pids["vm1"] or 0)
        assert st.exit_code is None  # not our child any more: status unknown, said so


async def test_process_that_died_while_supervisor_was_down_is_exited(
    harness: SupervisorHarness,
) -> None:
    async with await harness.start() as sv:
        a, b = await sv.deploy(sleeper("a")), await sv.deploy(sleeper("b"))
    harness.kill9()
    assert a.state.pid
    os.kill(a.state.pid, 9)
    await until(lambda: _dead(a.state.pid or 0))
    async with await harness.start() as sv:
        sa, sb = (await sv.info("a")).state, (await sv.info("b")).state
        assert sa.status == "exited" and "supervisor was down" in sa.reason
        assert sb.status == "running" and sb.pid == b.state.pid


def _dead(pid: int) -> bool:
    return not is_alive(pid)


async def test_reused_pid_is_not_adopted(harness: SupervisorHarness) -> None:
    """A state file whose pid now belongs to another process: not adopted, never signalled."""
    async with await harness.start() as sv:
        info = await sv.deploy(sleeper("gone"))
        await sv.kill("gone")
    await harness.stop()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # What a reboot or pid wrap-around leaves: "running" with a pid someone else has now.
        state_file = harness.state_dir / "procs" / "gone" / "state.json"
        st = json.loads(state_file.read_text())
        st.update(status="running", pid=stranger.pid)
        state_file.write_text(json.dumps(st))
        assert info.state.start_ticks is not None
        async with await harness.start() as sv:
            got = (await sv.info("gone")).state
            assert got.status == "exited" and not got.adopted
            await sv.stop("gone")
            assert stranger.poll() is None  # untouched
    finally:
        stranger.kill()
        stranger.wait()


async def test_second_supervisor_on_the_same_state_dir_refuses(harness: SupervisorHarness) -> None:
    async with await harness.start():
        other = launch_supervisor(harness.socket.with_name("b.sock"), harness.state_dir)
        assert await asyncio.to_thread(other.wait, 15) == 2
        log = (harness.state_dir / "supervisor.log").read_text()
        assert "another supervisor already owns" in log


async def test_a_second_supervisor_on_a_socket_in_use_leaves_it_to_its_owner(
    harness: SupervisorHarness, tmp_path: Path
) -> None:
    """A supervisor started on a socket another one serves (e.g. the VMM's watchdog relaunch
    after a ping timed out under load) exits naming it, and the socket stays the running
    one's: it once removed the path on its way out, and nobody could reach the CVMs' owner."""
    async with await harness.start() as client:
        other = launch_supervisor(harness.socket, tmp_path / "other-state")
        assert await asyncio.to_thread(other.wait, 15) != 0
        assert "is in use by a running server" in (tmp_path / "other-state" /
                                                    "supervisor.log").read_text()  # fmt: skip
        assert harness.socket.exists() and await client.ping()


async def test_logs_rotate_by_size_keeping_backups(harness: SupervisorHarness) -> None:
    """A chatty process's log is cut at the size limit into at most ``log_backups`` copies."""
    code = "import time\nwhile True:\n    print('x' * 99, flush=True)\n    time.sleep(0.002)"
    cfg = ProcessConfig(id="chatty", command=sys.executable, args=("-c", code),
                        log_max_bytes=8192, log_backups=2)  # fmt: skip
    async with await harness.start() as sv:
        info: ProcessInfo = await sv.deploy(cfg)
        out = Path(info.stdout_path)
        await until(out.with_name(out.name + ".2").exists, timeout_s=20)
        await asyncio.sleep(1.0)  # a few more rotations
        await sv.kill("chatty")
    _check_rotated(out)


def _check_rotated(out: Path) -> None:
    assert not out.with_name(out.name + ".3").exists()
    for backup in (out.with_name(out.name + ".1"), out.with_name(out.name + ".2")):
        lines = backup.read_text().splitlines()
        assert lines and all(line == "x" * 99 for line in lines[:-1])
    assert out.stat().st_size < 64 * 1024  # writes resumed at the start after truncation


async def test_shutdown_is_refused_while_a_process_runs_and_exits_when_idle(
    harness: SupervisorHarness,
) -> None:
    """A VMM that stops asks its supervisor to exit: only when nothing runs under it."""
    async with await harness.start() as sv:
        await sv.deploy(sleeper("busy"))
        assert await sv.shutdown_if_idle() is False
        assert await sv.ping()  # still serving, and still supervising
        assert (await sv.info("busy")).running
        await sv.stop("busy", timeout_s=0)
        assert await sv.shutdown_if_idle() is True
        assert harness.proc is not None
        assert await asyncio.to_thread(harness.proc.wait, 10) == 0
        assert not harness.socket.exists()  # the socket went with it
        assert not await sv.ping()


async def test_a_process_runs_as_its_user_with_only_its_groups(
    harness: SupervisorHarness,
) -> None:
    """``user`` gives the child exactly that uid, gid and supplementary groups (none of the
    supervisor's root groups), while its log stays the one the supervisor opened."""
    if os.geteuid() != 0:
        pytest.skip("only root can start a process as another user; this host runs as root")
    script = "grep -E '^(Uid|Gid|Groups):' /proc/self/status"
    cfg = ProcessConfig(id="as-nobody", command="/bin/sh", args=("-c", script), cwd="/",
                        user=RunAs(uid=65534, gid=65534, groups=(65533,)))  # fmt: skip
    async with await harness.start() as sv:
        info = await sv.deploy(cfg)
        await until(lambda: _status_is(sv, "as-nobody", "exited"))
        lines = _status_lines(info.stdout_path)
        assert lines["Uid"].split() == ["65534"] * 4 and lines["Gid"].split() == ["65534"] * 4
        assert lines["Groups"].split() == ["65533"]
        assert os.stat(info.stdout_path).st_uid == 0


def _status_lines(path: str) -> dict[str, str]:
    return dict(x.split(":", 1) for x in Path(path).read_text().splitlines())


def test_a_config_without_user_encodes_as_before_the_field() -> None:
    """Defaults are left out, so a supervisor still running older code (which refuses unknown
    fields) accepts every config but one with a ``user``: that one fails instead of running
    as root."""
    assert msgspec.json.encode(ProcessConfig(id="p", command="/bin/true")) == (
        b'{"id":"p","command":"/bin/true"}'
    )
    with_user = ProcessConfig(id="p", command="/bin/true", user=RunAs(uid=1, gid=1))
    assert b'"user":{"uid":1,"gid":1,"groups":[]}' in msgspec.json.encode(with_user)
