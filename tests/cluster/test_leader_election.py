"""`deploy`, `vm`, `app` and the dashboard ride out a leader election: each write lands once.

A 3-node cluster holds the log (R3). The stream leader and one more node are killed with
SIGKILL, so the stream has no leader (no quorum) for as long as the test wants: the commands
start in that window, say on stderr that they wait, and finish once a node comes back and a
leader is elected. A command whose wait (PYDSTACK_LEADER_WAIT_S) runs out first fails with one
line. The log is then counted: every logical write exactly once, nothing from the one that
gave up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pydstack.actors.dashboard import Dashboard, DashboardConfig
from pydstack.adapters.nats import (
    NEW,
    ConflictError,
    EventStore,
    NatsCluster,
    StreamSettings,
    riding_out,
)
from pydstack.core.apps import compose_ids
from pydstack.core.events import AppRegistered, Signer, VmBootProgress, open_envelope, subject
from pydstack.core.retry import Backoff
from tests.dashboard.plane import page_headers

pytestmark = pytest.mark.slow

PYDSTACK = str(Path(sys.executable).parent / "pydstack")
WAITING = "stream has no leader, retrying for up to"


def _compose(name: str) -> str:
    return json.dumps({"manifest_version": 2, "name": name, "runner": "docker-compose",
                       "docker_compose_file": "services: {}\n"}, indent=4)  # fmt: skip


def _spawn(
    home: Path, url: str, err: Path, *args: str, wait_s: str = "30"
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    env["PYDSTACK_LEADER_WAIT_S"] = wait_s
    return subprocess.Popen(
        [PYDSTACK, "--data-dir", str(home), "--nats", url, *args],
        stdout=subprocess.PIPE, stderr=err.open("w"), text=True, env=env,
    )  # fmt: skip


async def _until(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _finish(p: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    await _until(lambda: p.poll() is not None, timeout, f"{p.args!r} to exit")
    assert p.stdout is not None
    return p.returncode, p.stdout.read()


async def _log(store: EventStore) -> list[tuple[str, str, str]]:
    """(subject, event type, event id) of every message on the log, in order."""
    out = []
    async for rec in store.read():
        env = open_envelope(rec.data)
        out.append((rec.subject, env.type, env.id))
    return out


async def _deploy_on_dashboard(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], name: str
) -> dict[str, Any]:
    async with http.post(f"{url}api/deploy", json={"app_compose": _compose(name)},
                         headers=headers) as r:  # fmt: skip
        body: dict[str, Any] = await r.json()
        assert r.status == 201, body
        return body


async def test_writes_wait_out_a_leaderless_stream_and_land_once(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """CLI deploy / vm stop / app rm and a dashboard deploy, started while the stream has no
    leader, succeed once it has one again, each stored exactly once; a command whose wait
    runs out first exits 1 with one line and appends nothing."""
    signer = Signer.from_private_bytes("seeder", os.urandom(32))
    settings = StreamSettings(replicas=3)
    seed = await EventStore.connect(nats_cluster.url, signer, settings=settings)
    operator = await EventStore.connect(
        nats_cluster.url, Signer.from_private_bytes("operator", os.urandom(32)), settings=settings
    )
    home = tmp_path / "home"
    compose_file = tmp_path / "app-compose.json"
    compose_file.write_text(_compose("cli-app"))
    async with seed, operator, aiohttp.ClientSession() as http:
        await seed.ensure_stream()
        other_id, other_hash, _ = compose_ids(_compose("other"))
        await seed.append(subject("app", other_id), [AppRegistered(
            app_id=other_id, compose_hash=other_hash, name="other",
            compose=_compose("other").encode())], NEW)  # fmt: skip
        cfg = DashboardConfig(port=0, dev_env_key=tmp_path / "dev-env.key")
        async with await Dashboard.create(operator, cfg) as dash:
            await dash.follower.ready.wait()
            headers = await page_headers(http, dash.url)
            v0 = (await _deploy_on_dashboard(http, dash.url, headers, "first"))["vm_id"]

            info = await seed.js.stream_info(settings.name)
            assert info.cluster is not None and info.cluster.leader
            leader = nats_cluster.index_of(info.cluster.leader)
            second = (leader + 1) % 3
            nats_cluster.kill(leader)
            nats_cluster.kill(second)  # no quorum: no leader until one of them is back

            url = nats_cluster.url
            errs = {k: tmp_path / f"{k}.err" for k in ("deploy", "stop", "rm", "gives_up")}
            procs = {
                "deploy": _spawn(home, url, errs["deploy"], "deploy", str(compose_file),
                                 "--no-wait", "--vm-id", "d1", "--json"),
                "stop": _spawn(home, url, errs["stop"], "vm", "stop", v0),
                "rm": _spawn(home, url, errs["rm"], "app", "rm", other_id, "--json"),
                "gives_up": _spawn(home, url, errs["gives_up"], "vm", "start", v0, wait_s="1"),
            }  # fmt: skip
            on_dash = asyncio.create_task(_deploy_on_dashboard(http, dash.url, headers, "dash"))
            try:
                code, _ = await _finish(procs["gives_up"], 30)
                err = errs["gives_up"].read_text()
                assert code == 1, err
                last = err.strip().splitlines()[-1]
                assert last.startswith("Error: ") and "still has no leader after 1 s" in last
                for k in ("deploy", "stop", "rm"):  # each is waiting, and says so
                    await _until(lambda k=k: WAITING in errs[k].read_text(), 30, f"{k} waiting")
                assert not on_dash.done()
                t0 = time.monotonic()
                await nats_cluster.restart(leader)
                results = {k: await _finish(procs[k], 40) for k in ("deploy", "stop", "rm")}
                dash_vm = (await asyncio.wait_for(on_dash, 40))["vm_id"]
                healed = time.monotonic() - t0
            finally:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                on_dash.cancel()
            for k, (code, out) in results.items():
                assert code == 0, (k, out, errs[k].read_text())
            print(f"writes landed {healed:.1f} s after a node came back")

        log = await _log(seed)
    ids = [i for _, _, i in log]
    assert len(ids) == len(set(ids)), "an event id is stored twice"
    by_subject = Counter((s, t) for s, t, _ in log)
    cli_app = compose_ids(_compose("cli-app"))[0]
    dash_app = compose_ids(_compose("dash"))[0]
    assert by_subject[(subject("app", cli_app), "AppRegistered")] == 1
    assert by_subject[(subject("vm", "d1"), "VmRequested")] == 1
    assert by_subject[(subject("vm", v0), "VmStopRequested")] == 1
    assert by_subject[(subject("vm", v0), "VmStartRequested")] == 0  # the one that gave up
    assert by_subject[(subject("app", other_id), "AppRemoved")] == 1
    assert by_subject[(subject("app", dash_app), "AppRegistered")] == 1
    assert by_subject[(subject("vm", dash_vm), "VmRequested")] == 1
    # Nothing else: seed + first deploy (2) + the four writes (2 + 1 + 1 + 2).
    assert len(log) == 1 + 2 + 6, log


async def test_killing_the_leader_under_writers_costs_no_error_and_no_duplicate(
    nats_cluster: NatsCluster,
) -> None:
    """Writers deciding on fresh reads while the stream leader is killed (a real election, a
    few seconds): inside `riding_out` none of them sees an error (a conflict from a stale
    replica read is decided again), each acknowledged event is on the log exactly once at the
    sequence its writer was told, and no event reported as a conflict is on it."""
    signer = Signer.from_private_bytes("writer", os.urandom(32))
    store = await EventStore.connect(nats_cluster.url, signer, settings=StreamSettings(replicas=3))
    store.timeout = 2.0
    acked: dict[str, int] = {}
    waits: list[str] = []  # the progress lines: the kill did leave the stream leaderless
    conflicts: list[str] = []  # event ids refused as stale decisions (never stored)
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        subj = subject("vm", f"w{w}")
        n = 0
        with riding_out(Backoff(deadline_s=30), notify=waits.append):
            while not stop.is_set():
                n += 1
                eid = f"w{w}-{n}-{os.urandom(4).hex()}"
                _, version = await store.read_aggregate(subj)
                try:
                    v = await store.append(
                        subj, [VmBootProgress(vm_id=f"w{w}", stage=str(n))], version,
                        event_ids=[eid],
                    )  # fmt: skip
                except ConflictError:
                    # Read from a replica that had not caught up after the election: decide
                    # again on a fresh read, as the commands' decide loops do.
                    conflicts.append(eid)
                    continue
                acked[eid] = v.seq

    async with store:
        await store.ensure_stream()
        info = await store.js.stream_info("DSTACK")
        assert info.cluster is not None and info.cluster.leader
        tasks = [asyncio.create_task(writer(w)) for w in range(4)]
        try:
            await _until(lambda: len(acked) >= 40, 15, "writes before the kill")
            nats_cluster.kill(nats_cluster.index_of(info.cluster.leader))
            before = len(acked)
            await _until(lambda: len(acked) >= before + 40, 30, "writes after the kill")
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if r is not None] == [], "a writer saw an error"
        assert any("no leader" in line for line in waits), "no write met the election"
        print(f"acked {len(acked)}, {len(conflicts)} stale conflicts, {len(waits)} wait lines")
        log = {}
        async for rec in store.read():
            eid = open_envelope(rec.data).id
            assert eid not in log, f"event {eid} stored twice"
            log[eid] = rec.seq
    assert {e: log.get(e) for e in acked} == acked  # each ack names where the event is
    assert not set(conflicts) & set(log), "an append reported as a conflict was stored"
