"""End to end: `pydstack up`, then the CLI against it, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nkeys
import pytest
from click.testing import CliRunner

from pydstack.adapters.nats.identity import IdentityStore, inbox_prefix
from pydstack.cli import up as up_module
from pydstack.cli.main import main
from pydstack.controlplane import ControlPlane, DataDir, UpOptions
from pydstack.core.events import VmRejected, seal

from .harness import PYDSTACK, Up, cli, free_port, wait_for


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Up]:
    # --allow-delete: the tamper test deletes a message, which a normal stream refuses.
    # --no-kms: these tests count events; the KMS of `up` has its own tests (test_up_kms.py).
    up = Up(tmp_path / "home", extra=("--allow-delete", "--no-kms")).start()
    yield up
    assert up.stop() == 0, up.text()


def vm_events(data_dir: Path, vm_id: str) -> list[dict[str, object]]:
    r = cli(data_dir, "events", "--json", "--subject", f"dstack.vm.{vm_id}")
    assert r.code == 0, r.err
    return r.lines()  # type: ignore[return-value]


def request_vm(data_dir: Path) -> tuple[str, int]:
    r = cli(data_dir, "vm", "request", "--app-id", "app1", "--vcpu", "2", "--memory", "1G",
            "--port", "20080:80", "--json")  # fmt: skip
    assert r.code == 0, r.err
    [out] = r.lines()
    return str(out["vm_id"]), int(out["seq"])


def scheduled(data_dir: Path, vm_id: str) -> list[dict[str, object]]:
    return wait_for(
        lambda: (ev := vm_events(data_dir, vm_id)) and len(ev) >= 2 and ev,
        what=f"the scheduler to decide {vm_id}",
    )  # type: ignore[no-any-return]


def test_requested_vm_is_scheduled_and_the_log_audits_clean(plane: Up) -> None:
    d = plane.data_dir
    ready = plane.ready()
    assert ready and ready["nats_url"] == f"nats://127.0.0.1:{plane.port}"
    assert ready["data_dir"] == str(d)
    vm_id, req_seq = request_vm(d)
    events = scheduled(d, vm_id)
    assert [e["type"] for e in events] == ["VmRequested", "VmScheduled"]
    assert [e["actor"] for e in events] == ["operator", "scheduler"]
    audit = cli(d, "audit")
    assert audit.code == 0, audit.out + audit.err
    # admin 7: up binds its 7 identities on the log's keyring first (pydstack.core.policy)
    assert "0 errors" in audit.out
    assert "signers: admin 7, operator 1, scheduler 2, vmm 1" in audit.out
    assert "keyring on the log from seq 1" in audit.out and "0 events refused" in audit.out
    now = cli(d, "replay", "--json").lines()[0]
    assert now["vms"][vm_id]["state"] == "scheduled"
    assert now["hosts"][ready_host(plane)]["vcpu_used"] == 2
    then = cli(d, "replay", "--json", "--until", str(req_seq)).lines()[0]
    assert then["vms"][vm_id]["state"] == "requested"


def ready_host(plane: Up) -> str:
    joined = next(e for e in plane.events() if e.get("event") == "host joined")
    return str(joined["host_id"])


def test_events_follow_shows_request_then_schedule(plane: Up) -> None:
    d = plane.data_dir
    argv = [PYDSTACK, "--data-dir", str(d), "events", "--follow"]
    follow = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        vm_id, _ = request_vm(d)
        assert follow.stdout is not None
        lines: list[str] = []
        while not any("VmScheduled" in x for x in lines):
            lines.append(follow.stdout.readline())
        mine = [x for x in lines if vm_id in x]
        assert "VmRequested" in mine[0] and "operator" in mine[0]
        assert "VmScheduled" in mine[-1] and "scheduler" in mine[-1]
    finally:
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=10)
    assert "Traceback" not in err


async def publish_raw(d: Path, port: int, subject: str, data: bytes, seed: str) -> int:
    prefix = inbox_prefix(nkeys.from_seed(seed.encode()).public_key.decode())
    nc = await nats.connect(f"nats://127.0.0.1:{port}", nkeys_seed_str=seed, inbox_prefix=prefix)
    try:
        ack = await nc.jetstream().publish(subject, data)
        return int(ack.seq)
    finally:
        await nc.close()


def test_audit_names_forged_events_and_deleted_messages(plane: Up) -> None:
    d = plane.data_dir
    vm_id, req_seq = request_vm(d)
    scheduled(d, vm_id)
    assert cli(d, "audit").code == 0
    ids = IdentityStore(d / "identities")
    oper = ids.load("operator")
    assert oper is not None
    subj = f"dstack.vm.{vm_id}"

    # 1. valid msgpack envelope, signature zeroed: a raw client can publish, not forge
    forged = seal(oper.signer, VmRejected(vm_id=vm_id, reason="forged"), subject=subj,
                  event_id="forged-1", time_ns=1, correlation="x")  # fmt: skip
    bad_sig = asyncio.run(publish_raw(d, plane.port, subj, forged[:-64] + bytes(64), oper.seed))
    r = cli(d, "audit")
    assert r.code == 1
    assert f"seq {bad_sig}: bad signature" in r.out
    assert f"audit failed at seq {bad_sig}: bad signature" in r.err
    assert "Traceback" not in r.err

    # 2. correctly signed, but not linked to the previous event on its subject
    unlinked = seal(
        oper.signer,
        VmRejected(vm_id="other", reason="x"),
        subject="dstack.vm.other",
        event_id="forged-2",
        time_ns=2,
        correlation="x",
        prev=b"\x07" * 32,
    )
    bad_prev = asyncio.run(publish_raw(d, plane.port, "dstack.vm.other", unlinked, oper.seed))
    r = cli(d, "audit", "--json")
    assert r.code == 1
    findings = {(f["seq"], f["code"]) for f in r.lines() if "seq" in f}
    assert {(bad_sig, "bad-signature"), (bad_prev, "prev-mismatch")} <= findings

    # 3. one message deleted from the stream (by the admin identity)
    admin = ids.load("admin")
    assert admin is not None

    async def delete(seq: int) -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{plane.port}", nkeys_seed_str=admin.seed)
        try:
            assert await nc.jetstream().delete_msg("DSTACK", seq)
        finally:
            await nc.close()

    asyncio.run(delete(req_seq))
    r = cli(d, "audit")
    assert r.code == 1
    assert f"seq {req_seq}: missing from the stream (deleted?)" in r.out


def test_a_second_up_reuses_the_data_dir_and_port(tmp_path: Path) -> None:
    first = Up(tmp_path / "home").start()
    vm_id, _ = request_vm(first.data_dir)
    scheduled(first.data_dir, vm_id)
    keyring = (first.data_dir / "identities" / "keyring.json").read_text()
    assert first.stop() == 0
    again = Up(first.data_dir, port=first.port).start(port=False)  # no --port: the saved one
    try:
        assert again.ready()["nats_url"] == f"nats://127.0.0.1:{first.port}"  # type: ignore[index]
        assert [e["type"] for e in vm_events(again.data_dir, vm_id)] == [
            "VmRequested",
            "VmScheduled",
        ]
        assert (again.data_dir / "identities" / "keyring.json").read_text() == keyring
        assert cli(again.data_dir, "audit").code == 0
    finally:
        assert again.stop() == 0


def test_sigint_stops_actors_then_nats_server(plane: Up) -> None:
    nats_pid = plane.nats_pid()
    assert plane.stop(signal.SIGINT) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(nats_pid, 0)
    order = [e["event"] for e in plane.events()]
    assert order.index("actor stopped") < order.index("nats-server stopped")
    assert not (plane.data_dir / "state.json").exists()
    assert "Traceback" not in plane.text()


def test_sigterm_stops_cleanly_too(plane: Up) -> None:
    nats_pid = plane.nats_pid()
    assert plane.stop(signal.SIGTERM) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(nats_pid, 0)


def test_port_in_use_and_busy_data_dir_are_one_line_errors(plane: Up, tmp_path: Path) -> None:
    other = subprocess.run(
        [PYDSTACK, "up", "--data-dir", str(tmp_path / "other"), "--port", str(plane.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.returncode == 1
    assert f"port {plane.port} on 127.0.0.1 is in use" in other.stderr
    assert "--port" in other.stderr and "Traceback" not in other.stderr
    same = subprocess.run([PYDSTACK, "up", "--data-dir", str(plane.data_dir)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert same.returncode == 1
    assert "another `pydstack up`" in same.stderr and "Traceback" not in same.stderr


def test_app_register_derives_dstack_ids_and_is_idempotent(plane: Up, tmp_path: Path) -> None:
    import hashlib

    compose = tmp_path / "app-compose.json"
    compose.write_bytes(b'{"manifest_version": 2, "name": "hello", "runner": "docker-compose"}')
    digest = hashlib.sha256(compose.read_bytes()).hexdigest()
    first = cli(plane.data_dir, "app", "register", str(compose), "--json").lines()[0]
    assert first == {"app_id": digest[:40], "compose_hash": digest, "outcome": "registered",
                     "seq": first["seq"]}  # fmt: skip
    again = cli(plane.data_dir, "app", "register", str(compose), "--json").lines()[0]
    assert again["outcome"] == "unchanged"
    apps = cli(plane.data_dir, "replay", "--json").lines()[0]["apps"]
    assert apps[digest[:40]]["name"] == "hello"


def test_permission_denied_is_a_one_line_error(plane: Up) -> None:
    r = cli(plane.data_dir, "--as", "kms", "vm", "request", "--app-id", "a")
    assert r.code == 1
    # the CLI asks the write policy first (the server would refuse it too: kms may not publish
    # on dstack.vm.*)
    assert "refused by the write policy (not-allowed): 'kms' (kms) may not write" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


def test_status_reports_stream_and_scheduler_lag(plane: Up) -> None:
    vm_id, _ = request_vm(plane.data_dir)
    scheduled(plane.data_dir, vm_id)

    def caught_up() -> dict[str, object] | None:
        info = json.loads(cli(plane.data_dir, "status", "--json").out)
        [sched] = [c for c in info["consumers"] if c["name"] == "scheduler"]
        return info if sched["lag"] == 0 and sched["last_delivered"] == 11 else None

    info = wait_for(caught_up, what="the scheduler's consumer to catch up")
    # 7 keyring entries, HostJoined, VmRequested, then HostVmPlaced + VmScheduled in one
    # atomic commit
    assert info["stream"]["last_seq"] == 11 and info["stream"]["deny_delete"] is False
    assert info["local"]["up_running"] is True
    assert info["aggregates"] == {"host": {"aggregates": 1, "events": 2},
                                  "keyring": {"aggregates": 1, "events": 7},
                                  "vm": {"aggregates": 1, "events": 2}}  # fmt: skip


def test_up_joins_an_existing_server_with_nats_url(tmp_path: Path) -> None:
    server_home = tmp_path / "server"
    server = Up(server_home, extra=("--no-host",)).start()  # stands in for a shared cluster
    try:
        url = f"nats://127.0.0.1:{server.port}"
        # A second machine: its own data dir, but the identities of the cluster (copied over).
        joiner_home = tmp_path / "joiner"
        (joiner_home / "identities").mkdir(parents=True)
        for f in (server_home / "identities").iterdir():
            (joiner_home / "identities" / f.name).write_bytes(f.read_bytes())
        joiner = Up(
            joiner_home, port=free_port(), extra=("--nats", url, "--host-id", "second")
        ).start(port=False)
        try:
            assert joiner.ready()["nats_url"] == url  # type: ignore[index]
            assert not (joiner_home / "nats").exists()  # no server of its own
            # A user elsewhere, with only a seed file: signs as that identity.
            seed = server_home / "identities" / "operator.nk"
            r = cli(tmp_path / "nowhere", "--nats", url, "--creds", str(seed), "vm", "request",
                    "--app-id", "a", "--json")  # fmt: skip
            assert r.code == 0, r.err
            vm_id = r.lines()[0]["vm_id"]
            events = scheduled(server_home, str(vm_id))
            assert [e["actor"] for e in events] == ["operator", "scheduler"]
            assert cli(server_home, "audit").code == 0
        finally:
            assert joiner.stop() == 0
    finally:
        assert server.stop() == 0


def _up_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> UpOptions:
    """The UpOptions `pydstack up ARGS` runs its control plane with (nothing started)."""
    got: list[UpOptions] = []

    class Plane:
        def __init__(self, _data: DataDir, opts: UpOptions) -> None:
            got.append(opts)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(up_module, "ControlPlane", Plane)
    r = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "home"), "up", *args])
    assert r.exit_code == 0, r.output
    return got[0]


def test_kms_url_names_further_kms_replicas_for_the_hosts_cvms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, a = "https://10.0.0.3:9100", "https://10.0.0.1:9100"
    opts = _up_options(tmp_path, monkeypatch, "--no-kms", "--kms-url", k, "--kms-url", a)
    assert opts.kms_urls == (k, a)
    assert ControlPlane(DataDir(tmp_path), opts).cvm_kms_urls() == (k, a)  # no KMS of its own
    # With one of its own: that one first, then the given ones, each once.
    plane = ControlPlane(DataDir(tmp_path), UpOptions(kms_urls=(k, a, k)))
    plane.kms_url = a
    assert plane.cvm_kms_urls() == (a, k)
    assert _up_options(tmp_path, monkeypatch).kms_urls == ()


def test_kms_url_must_be_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up_module, "ControlPlane", None)  # never reached
    r = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "up", "--kms-url", "10.0.0.3:9100"])
    assert r.exit_code == 2
    assert "Invalid value for --kms-url: '10.0.0.3:9100' is not an https:// URL" in r.output


def test_a_kms_replica_alone_is_named_by_an_explicit_host_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = _up_options(tmp_path, monkeypatch, "--no-host", "--host-id", "hk", "--kms")
    assert (alone.host_id, alone.kms_instance) == (None, "hk")
    assert ControlPlane(DataDir(tmp_path), alone)._kms_launch().instance_id == "hk"
    # --no-host alone names no instance (the default host id is this machine's name);
    # a host's KMS instance is its host id.
    assert _up_options(tmp_path, monkeypatch, "--no-host").kms_instance == ""
    host = _up_options(tmp_path, monkeypatch, "--host-id", "ha")
    assert (host.host_id, host.kms_instance) == ("ha", "")
    assert ControlPlane(DataDir(tmp_path), host)._kms_launch().instance_id == "ha"
