"""`pydstack deploy` against a real `pydstack up`: the compose, the sealed env, the events, the
progress it follows on the log, and how it ends (ready with a URL, an error naming the stage)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from pydstack.core.events import (
    AppRegistered,
    CvmRegistered,
    GatewayNodeJoined,
    TunnelIpAllocated,
    VmBootError,
    VmBootProgress,
    VmRequested,
    VmStarted,
)
from pydstack_guest.kms_provider import decrypt_env
from tests.cli.harness import PYDSTACK, Up, cli, wait_for

from .support import (
    UP_ARGS,
    append_as,
    deploy,
    events_of,
    guest_env_key,
    merged,
    write_app,
)


def test_env_is_sealed_to_the_key_the_kms_derives_for_the_app(plane: Up, tmp_path: Path) -> None:
    """The VmRequested's env opens with the env key a guest of that app gets from the KMS,
    and the app-compose allows exactly the env file's names."""
    compose = write_app(tmp_path, "shop")
    (tmp_path / ".env").write_text("TOKEN=abc\nexport DB_PASS='x y'\n")
    code, lines, err = deploy(plane, str(compose), "--env-file", str(tmp_path / ".env"),
                              "--port", "20480:80", "--no-wait")  # fmt: skip
    assert code == 0, err
    out = merged(lines)
    app_id, compose_hash = out["app_id"], out["compose_hash"]
    assert out["kms_root"] == "main" and out["env_vars"] == ["TOKEN", "DB_PASS"]
    [(_, actor, registered)] = events_of(plane, f"dstack.app.{app_id}")
    assert actor == "operator" and isinstance(registered, AppRegistered)
    assert hashlib.sha256(registered.compose).hexdigest() == compose_hash
    assert app_id == compose_hash[:40] and registered.name == "shop"
    doc = json.loads(registered.compose)
    assert doc["allowed_envs"] == ["TOKEN", "DB_PASS"]
    assert doc["docker_compose_file"] == compose.read_text()
    [(_, _, vm)] = events_of(plane, f"dstack.vm.{out['vm_id']}")[:1]
    assert isinstance(vm, VmRequested) and vm.compose_hash == compose_hash
    assert b"abc" not in vm.encrypted_env
    key = asyncio.run(guest_env_key(plane, registered.compose.decode()))
    assert decrypt_env(key, vm.encrypted_env) == [("TOKEN", "abc"), ("DB_PASS", "x y")]


def test_no_wait_appends_app_and_vm_in_one_commit(plane: Up, tmp_path: Path) -> None:
    """An app-compose.json is used byte for byte; --no-wait returns once both events are in."""
    f = tmp_path / "app-compose.json"
    f.write_text('{"manifest_version": 2, "name": "raw", "runner": "docker-compose", '
                 '"docker_compose_file": "services: {}", "gateway_enabled": true}')  # fmt: skip
    t0 = time.monotonic()
    code, lines, err = deploy(plane, str(f), "--no-wait", "--vcpu", "2", "--memory", "1G")
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    out = merged(lines)
    assert out["compose_hash"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert out["app"] == "registered" and out["urls"] == []  # no gateway node on the log
    assert out["tee"] == "simulated"  # no TDX here: deploy says so, never silent
    human = cli(plane.data_dir, "deploy", str(f), "--no-wait")
    assert "simulated TDX: no confidentiality" in human.out + human.err
    r = cli(plane.data_dir, "events", "--json", "--subject", "dstack.*.*")
    mine = [e for e in r.lines() if e["subject"] in (f"dstack.app.{out['app_id']}",
                                                      f"dstack.vm.{out['vm_id']}")]  # fmt: skip
    assert [e["type"] for e in mine[:2]] == ["AppRegistered", "VmRequested"]
    assert mine[0]["correlation"] == mine[1]["correlation"]  # one atomic commit
    assert mine[1]["body"]["resources"]["vcpu"] == 2
    assert mine[1]["body"]["resources"]["memory_mb"] == 1024
    # Deploying the same compose again registers nothing new: only another VM.
    code, lines, err = deploy(plane, str(f), "--no-wait")
    assert code == 0 and merged(lines)["app"] == "unchanged", err


def test_without_a_vmm_the_wait_times_out_at_stage_scheduled(plane: Up, tmp_path: Path) -> None:
    """The scheduler places the VM, nothing starts it: exit 1 naming the stage and what is
    missing, after showing the stages that were reached."""
    compose = write_app(tmp_path, "stuck")
    t0 = time.monotonic()
    r = cli(plane.data_dir, "deploy", str(compose), "--timeout", "3")
    assert r.code == 1
    assert 3 <= time.monotonic() - t0 < 20
    assert "timed out after 3s at stage scheduled" in r.err
    assert "VMM" in r.err and len(r.err.strip().splitlines()) == 1
    stages = [line.split()[1] for line in r.out.splitlines() if line.strip()[:1].isdigit()]
    assert stages == ["requested", "scheduled"]


def _follow(plane: Up, *args: str) -> subprocess.Popen[str]:
    argv = [PYDSTACK, "--data-dir", str(plane.data_dir), "deploy", *args, "--json"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _vm_id_of(proc: subprocess.Popen[str]) -> str:
    """The VM the running deploy requested (read from its first JSON lines)."""
    assert proc.stdout is not None
    while True:
        line = json.loads(proc.stdout.readline())
        if "vm_id" in line:
            return str(line["vm_id"])


def _finish(proc: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]], str]:
    """The rest of its output (read through the same buffered pipe as _vm_id_of) and its code."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    return proc.wait(timeout=30), [json.loads(x) for x in out.splitlines()], err


def test_follows_vmm_and_gateway_events_to_ready_and_prints_the_url(tmp_path: Path) -> None:
    """With a gateway node on the log, deploy waits for boot *and* registration, shows each
    stage, and prints https://<app_id>-<port>.<base_domain>; events are written as the VMM and
    gateway identities would."""
    plane = Up(tmp_path / "home", extra=UP_ARGS).start()
    try:
        append_as(plane, "gateway", "dstack.gateway.default", GatewayNodeJoined(
            node_id="gw1", wg_public_key="k" * 43 + "=", tunnel_ip="10.0.3.1",
            endpoint="127.0.0.1:51820", base_domain="apps.test", cluster="default"))  # fmt: skip
        compose = write_app(tmp_path, "web")
        proc = _follow(plane, str(compose), "--port", "20481:80", "--timeout", "30")
        vm_id = _vm_id_of(proc)
        wait_for(lambda: len(events_of(plane, f"dstack.vm.{vm_id}")) >= 2, what="scheduling")
        [(_, _, req)] = events_of(plane, f"dstack.vm.{vm_id}")[:1]
        vm = f"dstack.vm.{vm_id}"
        append_as(plane, "vmm", vm, VmStarted(vm_id=vm_id, host="vm", pid=42),
                  VmBootProgress(vm_id=vm_id, stage="docker"),
                  VmBootProgress(vm_id=vm_id, stage="ready", detail="20481->80"))  # fmt: skip
        time.sleep(0.5)
        assert proc.poll() is None  # booted, but not registered at the gateway yet
        iid = "ab" * 20
        append_as(plane, "gateway", "dstack.gateway.default", TunnelIpAllocated(
            cluster="default", instance_id=iid, app_id=req.app_id, wg_public_key="c" * 43 + "=",
            tunnel_ip="10.0.3.2"))  # fmt: skip
        append_as(plane, "gateway", f"dstack.cvm.{iid}", CvmRegistered(
            app_id=req.app_id, instance_id=iid, compose_hash=req.compose_hash,
            wg_public_key="c" * 43 + "=", tunnel_ip="10.0.3.2", cluster="default"))  # fmt: skip
        code, lines, err = _finish(proc)
        assert code == 0, err
        stages = [x["stage"] for x in lines if "stage" in x]
        assert stages == ["requested", "scheduled", "started", "boot:docker", "boot:ready",
                          "registered", "ready"]  # fmt: skip
        assert lines[-1]["urls"] == [f"https://{req.app_id}-80.apps.test"]
    finally:
        assert plane.stop() == 0


def test_a_boot_error_ends_the_wait_naming_the_stage(plane: Up, tmp_path: Path) -> None:
    compose = write_app(tmp_path, "broken")
    proc = _follow(plane, str(compose), "--timeout", "30")
    vm_id = _vm_id_of(proc)
    wait_for(lambda: len(events_of(plane, f"dstack.vm.{vm_id}")) >= 2, what="scheduling")
    seq = append_as(
        plane,
        "vmm",
        f"dstack.vm.{vm_id}",
        VmStarted(vm_id=vm_id, host="vm"),
        VmBootProgress(vm_id=vm_id, stage="agent"),
        VmBootError(vm_id=vm_id, stage="error", error="dockerd exited with 1"),
    )
    code, _, err = _finish(proc)
    assert code == 1
    assert "boot error (error): dockerd exited with 1 (at stage boot:agent, seq " \
        f"{seq})" in err  # fmt: skip
