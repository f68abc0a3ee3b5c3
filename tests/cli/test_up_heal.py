"""`up` rides out a crashed embedded nats-server (issue 17): restarted on the same store,
every actor resumes; only repeated crashes within the window stop `up`, with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from pydstack.upkeep import RestartBudget, orphaned_nats_server

from .harness import Up, cli, wait_for
from .test_up import request_vm, scheduled

HEAL_BOUND_S = 20.0  # goal: 5 s (bench.recover); generous for a loaded 2-core machine


def _nats_pid(up: Up) -> int | None:
    try:
        pid = json.loads((up.data_dir / "state.json").read_text()).get("nats_pid")
    except (OSError, ValueError):
        return None
    return int(pid) if pid else None


def _register(up: Up, tmp: Path, name: str) -> bool:
    compose = tmp / f"{name}.json"
    app = {"manifest_version": 2, "name": name, "runner": "docker-compose"}
    compose.write_text(json.dumps(app))
    return cli(up.data_dir, "app", "register", str(compose), "--json", timeout=30).code == 0


def test_killed_nats_server_is_restarted_and_the_plane_keeps_serving(tmp_path: Path) -> None:
    up = Up(tmp_path / "home").start()  # scheduler, KMS, dashboard, this host
    try:
        assert _register(up, tmp_path, "before")
        first = _nats_pid(up)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: _nats_pid(up) not in (None, first), HEAL_BOUND_S, "a new nats-server")
        wait_for(lambda: _register(up, tmp_path, "after"), HEAL_BOUND_S, "appends to succeed")
        assert time.monotonic() - killed < HEAL_BOUND_S
        # the scheduler resumes from its durable consumer: a new request is decided
        vm_id, _ = request_vm(up.data_dir)
        assert [e["type"] for e in scheduled(up.data_dir, vm_id)] == ["VmRequested",
                                                                      "VmScheduled"]  # fmt: skip
        assert up.proc is not None and up.proc.poll() is None
        restarted = [e for e in up.events() if e.get("event") == "nats-server restarted"]
        assert len(restarted) == 1 and restarted[0]["reason"] == "exited with code -9"
        # the restart is on the log, under up's admin key, once appends work again
        recorded = wait_for(
            lambda: cli(up.data_dir, "events", "--json", "--subject",
                        "dstack.actor.nats-server").lines(),
            HEAL_BOUND_S, "the restart on the log",
        )  # fmt: skip
        [(kind, actor, body)] = [(e["type"], e["actor"], e["body"]) for e in recorded]
        assert (kind, actor) == ("ComponentRestarted", "admin")
        assert body["reason"] == "exited with code -9" and body["crashes"] == 1
        audit = cli(up.data_dir, "audit")
        assert audit.code == 0 and "0 errors" in audit.out, audit.out + audit.err
    finally:
        assert up.stop() == 0, up.text()
    assert "Traceback" not in up.text()


def test_repeated_crashes_within_the_window_stop_up_with_one_line(tmp_path: Path) -> None:
    up = Up(tmp_path / "home", extra=("--no-kms",)).start()
    assert up.proc is not None
    killed: list[int] = []

    def next_server() -> int | None:  # -1: `up` has ended
        if up.proc is None or up.proc.poll() is not None:
            return -1
        pid = _nats_pid(up)
        return pid if pid not in (None, *killed) else None

    # `up` allows 4 crashes within 60 s: kill each server it starts until it gives up
    while len(killed) < 10:
        pid = wait_for(next_server, HEAL_BOUND_S, "the next nats-server")
        if pid == -1:
            break
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    assert up.proc.wait(timeout=60) == 1
    assert len(killed) == 4
    text = up.text()
    assert "Traceback" not in text
    [line] = [x for x in text.splitlines() if not x.startswith("{")]  # the rest: JSON log
    log = up.data_dir / "nats" / "nats-server.log"
    assert line == (f"Error: nats-server crashed 4 times within 60s (last: exited with code -9); "
                    f"see {log}; stopping the control plane")  # fmt: skip


def test_restart_delays_double_and_only_crashes_within_the_window_count() -> None:
    budget = RestartBudget(limit=3, window_s=10, first_delay_s=0.25, max_delay_s=5)
    assert [budget.crashed(0), budget.crashed(1)] == [0.25, 0.5]
    assert budget.crashed(20) == 0.25  # the earlier two left the window
    assert budget.crashed(21) == 0.5 and budget.crashed(22) is None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_up_killed_9_starts_again_on_its_data_dir(tmp_path: Path) -> None:
    """What systemd's Restart=on-failure does after `up` is killed without its cleanup: the
    nats-server it left serving the data dir is stopped, a new one starts on the same store,
    and nothing on the log is lost."""
    first = Up(tmp_path / "home").start()
    assert first.proc is not None
    try:
        assert _register(first, tmp_path, "before")
        orphan = _nats_pid(first)
        assert orphan is not None
        first.proc.kill()
        first.proc.wait(timeout=10)
        assert _alive(orphan)  # in a session of its own: `up`'s death leaves it serving
        (first.data_dir / "state.json").unlink()  # as a failed start in between leaves it
        again = Up(first.data_dir, port=first.port).start()
    finally:
        with_orphan = _nats_pid(first)
    try:
        assert not _alive(orphan)
        assert with_orphan not in (None, orphan)
        assert any(e.get("event") == "stopping what a killed `up` left running"
                   and e.get("pid") == orphan for e in again.events())  # fmt: skip
        assert _register(again, tmp_path, "after")
        apps = {a["name"] for a in cli(again.data_dir, "app", "ls", "--json").lines()}
        assert {"before", "after"} <= apps
        audit = cli(again.data_dir, "audit")
        assert audit.code == 0 and "0 errors" in audit.out, audit.out + audit.err
    finally:
        assert again.stop() == 0, again.text()
    assert "Traceback" not in again.text()


def test_only_a_nats_server_on_this_data_dir_counts_as_an_orphan(tmp_path: Path) -> None:
    """A ports file naming a pid the kernel gave to something else (here `sleep`) or a
    nats-server of another data dir: neither is touched."""
    nats_dir = tmp_path / "nats"
    (nats_dir / "ports").mkdir(parents=True)
    conf = nats_dir / "nats-server.conf"
    other = subprocess.Popen(["sleep", "60"])
    try:
        (nats_dir / "ports" / f"nats-server_{other.pid}.ports").write_text("{}")
        (nats_dir / "ports" / "nats-server_1.ports").write_text("{}")  # init, never
        (nats_dir / "ports" / "garbage.ports").write_text("{}")
        assert orphaned_nats_server(nats_dir, conf) is None
        assert orphaned_nats_server(tmp_path / "absent", conf) is None
    finally:
        other.kill()
        other.wait()
