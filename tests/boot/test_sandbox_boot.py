"""`pydstack up --vmm sandbox` boots apps whose keys come from up's KMS (pydstack_guest.boot).

One control plane, its KMS asking a webhook in the test: the allowed app gets KeyIssued, its
container sees exactly its allowed env var; the denied app gets KeyDenied, one VmBootError
naming the keys step, and no restart."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import vmmapi
from tests.cli.harness import Up, cli, free_host_port, kill_processes_under, wait_for

# The container serves "$SECRET|$OTHER" (compose `$$` = a literal `$` for the shell).
COMPOSE_FILE = """services:
  web:
    image: busybox:latest
    environment:
      - SECRET
      - OTHER
    command:
      - sh
      - -c
      - 'echo "$$SECRET|$$OTHER|${SECRET}" > /tmp/index.html; exec httpd -f -p 8080 -h /tmp'
    ports:
      - "8080:8080"
"""


def app_compose(name: str) -> bytes:
    return json.dumps({"manifest_version": 2, "name": name, "runner": "docker-compose",
                       "docker_compose_file": COMPOSE_FILE, "kms_enabled": True,
                       "allowed_envs": ["SECRET"]}).encode()  # fmt: skip


ALLOWED = app_compose("allowed")
DENIED = app_compose("denied")


def app_id(compose: bytes) -> str:
    return hashlib.sha256(compose).hexdigest()[:40]


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """auth-simple: the KMS itself and the ALLOWED app pass; everything else is refused."""
    seen: list[dict[str, Any]] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            ok = self.path.endswith("/kms") or body.get("appId") == app_id(ALLOWED)
            out = json.dumps({"isAllowed": ok, "reason": "" if ok else "test policy: not allowed"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()


def _get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _vm_events(home: Path, vm_id: str) -> list[dict[str, Any]]:
    r = cli(home, "events", "--subject", f"dstack.vm.{vm_id}", "--json")
    assert r.code == 0, r.err
    return r.lines()


def test_kms_keys_env_and_denial(tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]) -> None:
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("sandbox CVMs need root and dockerd (docker.io)")
    hook, seen = webhook
    home = tmp_path / "home"
    plane = Up(home, extra=("--vmm", "sandbox", "--no-gateway", "--kms-auth", "webhook",
                            "--kms-auth-url", hook)).start()  # fmt: skip
    try:
        ready = plane.ready()
        assert ready is not None
        kms = ready["kms"]
        vmm = json.loads((home / "state.json").read_text())["vmm_url"]
        env_file = tmp_path / ".env"
        env_file.write_text("SECRET=s3cret-value\nOTHER=must-not-leak\n")
        enc = cli(home, "env", "encrypt", "--app-id", app_id(ALLOWED), "--kms", kms, str(env_file))
        assert enc.code == 0, enc.err
        port, port2 = free_host_port(), free_host_port()
        for vm_id, compose, p in (("ok1", ALLOWED, port), ("no1", DENIED, port2)):
            vmmapi.call(vmm, "CreateVm", {
                "id": vm_id, "name": vm_id, "image": "sandbox-busybox", "vcpu": 1, "memory": 256,
                "compose_file": compose.decode(), "encrypted_env": enc.out.strip(),
                "ports": [{"host_port": p, "vm_port": 8080}]})  # fmt: skip

        body = wait_for(lambda: _get(port), timeout=60, what="the allowed app to serve")
        assert body.strip() == "s3cret-value||s3cret-value"  # OTHER is not in allowed_envs

        stages = [e["body"]["stage"] for e in _vm_events(home, "ok1")
                  if e["type"] == "VmBootProgress"]  # fmt: skip
        assert stages[:1] == ["booted"] and stages[-1] == "ready"
        assert stages.index("keys") < stages.index("env") < stages.index("app")
        kms_events = cli(home, "events", "--subject", "dstack.kms.*", "--json").lines()
        issued = [e["body"] for e in kms_events if e["type"] == "KeyIssued"]
        assert [i["boot_info"]["app_id"] for i in issued] == [app_id(ALLOWED)]
        assert issued[0]["boot_info"]["compose_hash"] == hashlib.sha256(ALLOWED).hexdigest()

        def boot_error() -> list[dict[str, Any]]:
            return [e for e in _vm_events(home, "no1") if e["type"] == "VmBootError"]

        errors = wait_for(boot_error, timeout=30, what="VmBootError of the denied app")
        assert "boot error at keys" in errors[0]["body"]["error"], errors
        assert "test policy: not allowed" in errors[0]["body"]["error"], errors
        denied = [e["body"] for e in kms_events + cli(home, "events", "--subject",
                  "dstack.kms.*", "--json").lines() if e["type"] == "KeyDenied"]  # fmt: skip
        assert any(d["boot_info"]["app_id"] == app_id(DENIED) for d in denied)
        assert any(s.get("appId") == app_id(DENIED) for s in seen)
        time.sleep(3)  # dstack #334: a boot error must not turn into a restart loop
        types = [e["type"] for e in _vm_events(home, "no1")]
        assert types.count("VmStarted") == 1 and types.count("VmBootError") == 1, types
        assert "VmRestartScheduled" not in types and "VmExited" not in types, types
        assert not _get(port2)
    finally:
        # CVMs outlive the VMM by design: remove them, or their dockerds keep running (and
        # loading the machine) after the test.
        with contextlib.suppress(Exception):
            vmm_url = json.loads((home / "state.json").read_text())["vmm_url"]
            for vm_id in ("ok1", "no1"):
                with contextlib.suppress(Exception):
                    vmmapi.call(vmm_url, "RemoveVm", {"id": vm_id})
            for vm_id in ("ok1", "no1"):
                wait_for(lambda v=vm_id: any(e["type"] == "VmRemoved"  # type: ignore[misc]
                                             for e in _vm_events(home, v)),
                         timeout=30, what=f"{vm_id} removed")  # fmt: skip
        stopped = plane.stop()
        kill_processes_under(home)  # the CVMs' supervisor outlives up by design
        assert stopped == 0
