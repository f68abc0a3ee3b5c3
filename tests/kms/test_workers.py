"""A KMS served by several worker processes (`--workers`): one port, every worker issues,
each decision once, revocations seen by each worker, a killed worker replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pydstack.actors.image_registry import revoke_image
from pydstack.actors.kms import KmsCallError, KmsClient
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KeyDenied, KeyIssued, KeyRequested, decode_body, open_envelope
from pydstack.core.kms import ABANDONED
from pydstack_guest import create_dev_app_keys
from tests import images

from .conftest import CLUSTER, VM_CONFIG, bound_identity, make_cvm

WORKERS = 2
LABELS = {f"#w{i}" for i in range(WORKERS)}  # no --instance-id: the workers' own labels


async def _start(
    nats_url: str,
    tmp: Path,
    pki: DevPki,
    auth: tuple[str, ...] = ("--auth", "dev", "--allow-dev-auth"),
    stderr: int = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[bytes], str]:
    pki.save(tmp / "pki")
    (tmp / "appkeys.json").write_text(create_dev_app_keys(b"\x42" * 20, now=0)[1])
    seed = tmp / "kms-identity.seed"
    write_secret(seed, os.urandom(32).hex())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_url, "--cluster", CLUSTER,
         "--port", "0", "--key-file", str(tmp / "root.sealed"), "--seal-appkeys",
         str(tmp / "appkeys.json"), *auth, "--dev-pki",
         str(tmp / "pki"), "--signer-seed-file", str(seed), "--workers", str(WORKERS)],
        stdout=subprocess.PIPE, stderr=stderr,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    assert line.startswith(b"KMS_URL="), line
    every = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    assert every == f"KMS_WORKERS={WORKERS}\n".encode(), every  # all of them serve
    return proc, line.decode().strip().split("=", 1)[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def _events(store: EventStore) -> list[Any]:
    records, _ = await store.read_aggregate(f"dstack.kms.{CLUSTER}")
    return [decode_body(open_envelope(r.data)) for r in records]


class Boots:
    """Simulated CVMs, each with its own quote-bearing client certificate."""

    def __init__(self, url: str, pki: DevPki) -> None:
        self.url, self.pki, self.n = url, pki, 0
        self.temp: dict[str, Any] = {}

    async def open(self) -> None:
        async with KmsClient(self.url, dev_pki=self.pki) as c:
            self.temp = await c.call("GetTempCaCert")

    async def one(self) -> dict[str, Any] | KmsCallError:
        self.n += 1
        ident = await bound_identity(
            make_cvm(self.pki, instance_id=self.n.to_bytes(20, "big")), self.temp
        )
        async with KmsClient(self.url, ca_pem=self.temp["ca_cert"], identity=ident) as c:
            try:
                return await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})
            except KmsCallError as e:
                return e

    async def many(self, n: int) -> list[dict[str, Any] | KmsCallError]:
        return await asyncio.gather(*(self.one() for _ in range(n)))


def _by_label(evs: list[Any], kind: type[KeyIssued | KeyDenied]) -> Counter[str]:
    """Decisions of `kind` per worker label (of their KeyRequested)."""
    label = {e.request_id: e.kms_instance for e in evs if isinstance(e, KeyRequested)}
    return Counter(label[e.request_id] for e in evs if isinstance(e, kind))


@pytest.mark.timeout(180)
async def test_workers_issue_each_once_and_all_see_a_revocation(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """24 concurrent boots against 2 workers: 24 answers, 24 requests each with exactly one
    KeyIssued, issued by both workers. The image revoked while they run: every worker's next
    request is denied (a KeyDenied from each), none issued."""
    await images.register_test_image(store)
    proc, url = await _start(nats_server.url, tmp_path, pki)
    try:
        boots = Boots(url, pki)
        await boots.open()
        answers = await boots.many(24)
        assert all(isinstance(a, dict) and len(a["disk_crypt_key"]) == 64 for a in answers)
        evs = await _events(store)
        reqs = [e for e in evs if isinstance(e, KeyRequested)]
        issued = Counter(e.request_id for e in evs if isinstance(e, KeyIssued))
        assert len(reqs) == 24 and len({r.request_id for r in reqs}) == 24
        assert issued == Counter({r.request_id: 1 for r in reqs})
        assert set(_by_label(evs, KeyIssued)) == LABELS

        await revoke_image(store, images.TEST_IMAGE.os_image_hash, "test: revoked")
        denied: Counter[str] = Counter()
        for _ in range(20):  # until each worker has answered (connections spread by hash)
            after = await boots.many(8)
            assert all(isinstance(a, KmsCallError) and a.status == 403 for a in after), after
            evs2 = await _events(store)
            denied = _by_label(evs2, KeyDenied)
            if set(denied) == LABELS:
                break
        assert set(denied) == LABELS
        assert _by_label(evs2, KeyIssued) == _by_label(evs, KeyIssued)  # nothing issued since
    finally:
        _stop(proc)


@pytest.mark.timeout(180)
async def test_a_killed_worker_is_replaced(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """SIGKILL one worker: the supervisor starts another in its place on the same port, and
    the KMS keeps answering; both processes issue again."""
    await images.register_test_image(store)
    proc, url = await _start(nats_server.url, tmp_path, pki)
    try:
        before = _children(proc.pid)
        assert len(before) == WORKERS
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        for _ in range(600):
            now = _children(proc.pid)
            if len(now) == WORKERS and victim not in now:
                break
            await asyncio.sleep(0.1)
        assert len(now) == WORKERS and victim not in now and proc.poll() is None
        boots = Boots(url, pki)
        await boots.open()
        for _ in range(60):  # the new worker serves once started: until both have issued
            answers = await boots.many(8)
            assert all(isinstance(a, dict) for a in answers), answers
            if set(_by_label(await _events(store), KeyIssued)) == LABELS:
                break
            await asyncio.sleep(0.5)
        assert set(_by_label(await _events(store), KeyIssued)) == LABELS
    finally:
        _stop(proc)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _alive(pids: set[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


def _worker_pid(supervisor: int, index: int) -> int:
    """The pid of the supervisor's worker `index` (from its command line)."""
    for pid in _children(supervisor):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[argv.index(b"--worker-index") + 1] == str(index).encode():
            return pid
    raise AssertionError(f"no worker {index}")


@pytest.mark.timeout(180)
async def test_a_killed_workers_open_request_is_closed_by_its_replacement_once(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """SIGKILL the worker whose request waits for the backend: its replacement closes that
    request (KeyDenied, abandoned) before serving, the other worker's work is untouched, and
    the request has exactly one decision even after the backend answers."""
    hold, arrived = asyncio.Event(), asyncio.Event()

    async def boot_auth(request: web.Request) -> web.Response:
        arrived.set()
        await hold.wait()
        return web.json_response({"isAllowed": True, "reason": "", "gatewayAppId": ""})

    async def kms_auth(request: web.Request) -> web.Response:
        return web.json_response({"isAllowed": True, "reason": "", "gatewayAppId": ""})

    app = web.Application()
    app.router.add_post("/bootAuth/app", boot_auth)
    app.router.add_post("/bootAuth/kms", kms_auth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await images.register_test_image(store)
    proc, url = await _start(
        nats_server.url, tmp_path, pki, ("--auth", "webhook", "--auth-url", hook)
    )
    try:
        boots = Boots(url, pki)
        await boots.open()
        pending = asyncio.create_task(boots.one())
        await asyncio.wait_for(arrived.wait(), 30)
        for _ in range(200):  # stored while the backend decides
            reqs = [e for e in await _events(store) if isinstance(e, KeyRequested)]
            if reqs:
                break
            await asyncio.sleep(0.05)
        (req,) = reqs
        index = int(req.kms_instance.removeprefix("#w"))
        victim = _worker_pid(proc.pid, index)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017 - any transport error: its worker died
            await pending
        closed: list[KeyDenied] = []
        for _ in range(600):  # the replacement closes it before it serves
            closed = [e for e in await _events(store) if isinstance(e, KeyDenied)]
            if closed:
                break
            await asyncio.sleep(0.1)
        assert [(d.request_id, d.reason) for d in closed] == [(req.request_id, ABANDONED)]
        assert _worker_pid(proc.pid, index) != victim and proc.poll() is None
        hold.set()
        answers = await boots.many(8)  # served again, by both workers in time
        assert all(isinstance(a, dict) for a in answers), answers
        evs = await _events(store)
        decided = [e for e in evs if isinstance(e, KeyIssued | KeyDenied)]
        assert [e.request_id for e in decided].count(req.request_id) == 1
        assert len(decided) == len([e for e in evs if isinstance(e, KeyRequested)])
    finally:
        hold.set()
        _stop(proc)
        await runner.cleanup()


@pytest.mark.timeout(120)
async def test_running_kms_workers_serves_from_a_launch_and_stops_its_processes(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """`running_kms_workers` (what an in-process launcher such as `up` uses) starts the
    workers from a KmsLaunch with only file paths on their command lines, serves GetAppKey,
    and leaves no process behind at exit."""
    from pydstack.actors.kms.launch import KmsLaunch
    from pydstack.actors.kms.workers import running_kms_workers

    await images.register_test_image(store)
    pki.save(tmp_path / "pki")
    (tmp_path / "appkeys.json").write_text(create_dev_app_keys(b"\x42" * 20, now=0)[1])
    seed_hex = os.urandom(32).hex()
    seed = write_secret(tmp_path / "kms.seed", seed_hex)
    launch = KmsLaunch(
        key_file=str(tmp_path / "root.sealed"), cluster=CLUSTER, seal_appkeys=str(tmp_path /
        "appkeys.json"), auth="dev", allow_dev_auth=True, dev_pki=str(tmp_path / "pki"),
    )  # fmt: skip
    async with running_kms_workers(
        launch, WORKERS, nats_url=nats_server.url, seed_file=str(seed)
    ) as url:
        (sup,) = [p for p in _children(os.getpid()) if b"pydstack.actors.kms" in _cmdline(p)]
        workers = _children(sup)
        assert len(workers) == WORKERS
        for pid in {sup, *workers}:
            assert seed_hex.encode() not in _cmdline(pid)
        boots = Boots(url, pki)
        await boots.open()
        assert all(isinstance(a, dict) for a in await boots.many(4))
    for _ in range(100):  # the supervisor was reaped; its workers, by it, just before
        if not _alive({sup, *workers}):
            break
        await asyncio.sleep(0.1)
    assert not _alive({sup, *workers})


@pytest.mark.timeout(180)
async def test_a_worker_that_keeps_dying_stops_the_kms_with_one_line(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """Past the restart budget (RESTARTS exits within RESTART_WINDOW) the supervisor stops
    every worker and exits 1 with one line naming what happened, rather than looping."""
    from pydstack.actors.kms.workers import RESTARTS

    await images.register_test_image(store)
    proc, _ = await _start(nats_server.url, tmp_path, pki, stderr=subprocess.PIPE)
    try:
        for _kill in range(RESTARTS + 1):
            victim = _worker_pid(proc.pid, 1)
            os.kill(victim, signal.SIGKILL)
            for _ in range(300):  # replaced (or, past the budget, the supervisor is gone)
                if proc.poll() is not None or _replaced(proc.pid, victim):
                    break
                await asyncio.sleep(0.05)
        code = await asyncio.to_thread(proc.wait, 60)
        assert proc.stderr is not None
        errors = [ln for ln in proc.stderr.read().decode().splitlines() if ln.startswith("Error:")]
        assert code == 1
        assert len(errors) == 1 and f"exited {RESTARTS + 1} times" in errors[0], errors
    finally:
        if proc.poll() is None:
            _stop(proc)


def _replaced(supervisor: int, victim: int) -> bool:
    try:
        return victim not in _children(supervisor) and len(_children(supervisor)) == WORKERS
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


async def test_the_gateway_app_id_option_reaches_every_workers_get_meta(
    nats_server: NatsServer, pki: DevPki, tmp_path: Path
) -> None:
    """`--gateway-app-id HEX` (log/dev backends) is what GetMeta names, from whichever
    worker answers; a value that is not one app id stops the start in one line."""
    gw = "ab" * 20
    auth = ("--auth", "dev", "--allow-dev-auth", "--gateway-app-id", gw)
    proc, url = await _start(nats_server.url, tmp_path, pki, auth=auth)
    try:
        for _ in range(6):  # new connections: SO_REUSEPORT spreads them over the workers
            async with KmsClient(url, dev_pki=pki) as c:
                assert (await c.call("GetMeta"))["gateway_app_id"] == gw
    finally:
        _stop(proc)
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url, "--cluster",
         "other", "--port", "0", "--key-file", str(bad / "root.sealed"), "--auth", "dev",
         "--allow-dev-auth", "--gateway-app-id", "any", "--dev-pki", str(tmp_path / "pki"),
         "--seal-appkeys", str(tmp_path / "appkeys.json"), "--workers", "1",
         "--signer-seed-file", str(tmp_path / "kms-identity.seed")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    errors = [ln for ln in err.decode().splitlines() if ln.startswith("Error")]
    assert proc.returncode != 0 and b"KMS_URL=" not in out
    assert len(errors) == 1 and "gateway" in errors[0], err.decode()[-1500:]
    assert not (bad / "root.sealed").exists()
