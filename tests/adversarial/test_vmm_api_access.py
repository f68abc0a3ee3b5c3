"""Attack: the VMM API creates, changes and removes CVMs; on TCP loopback it had no
authentication, so any local user, any QEMU guest (user networking reaches the host) and, by DNS
rebinding, any web page could call it. Now: a 0600 unix socket (our uid or root) by default;
TCP only with the API token (Bearer, or Basic with the token as password as dstack's vmm-cli
sends it) and a Host allowlist."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pydstack.actors.vmm import ApiEndpoints, running_vmm
from pydstack.adapters.nats import EventStore
from pydstack.core.events import subject
from tests import vmmapi
from tests.vmm.conftest import VmmHost, compose

NOBODY = 65534


@pytest.fixture
async def api(vmm_host: VmmHost) -> AsyncIterator[ApiEndpoints]:
    launch = dataclasses.replace(vmm_host.launch(), api_port=0)
    async with running_vmm(vmm_host.store, launch) as (_, ends):
        yield ends


def _create(vm_id: str) -> dict[str, Any]:
    return {"id": vm_id, "name": vm_id, "image": "sandbox-busybox", "compose_file": compose(),
            "stopped": True}  # fmt: skip


async def _req(
    url: str, rpc: str, body: dict[str, Any] | None = None, **kw: Any
) -> tuple[int, Any]:
    return await asyncio.to_thread(vmmapi.request, url, "POST", f"/prpc/{rpc}", body or {}, **kw)


async def test_tcp_without_the_token_is_401_and_appends_nothing(
    api: ApiEndpoints, store: EventStore
) -> None:
    for kw in ({}, {"bearer": "x" * 43}, {"basic": ("admin", "wrong")}, {"bearer": ""}):
        status, body = await _req(api.tcp_url, "CreateVm", _create("nope"), **kw)
        assert status == 401 and "token" in body["error"], (kw, status, body)
    assert await store.last_by_subject(subject("vm", "nope")) is None


async def test_tcp_with_the_token_as_bearer_or_basic_password_works(api: ApiEndpoints) -> None:
    assert api.token_file is not None
    token = api.token_file.read_text().strip()
    status, _ = await _req(api.tcp_url, "Status", bearer=token)
    assert status == 200
    # dstack's vmm-cli.py --auth-user U --auth-password TOKEN
    status, body = await _req(api.tcp_url, "CreateVm", _create("ok1"), basic=("anyone", token))
    assert status == 200 and body == {"id": "ok1"}, body


async def test_tcp_with_a_foreign_host_header_is_403_even_with_the_token(
    api: ApiEndpoints,
) -> None:
    """DNS rebinding: the browser sends the attacker's name as Host."""
    assert api.token_file is not None
    token = api.token_file.read_text().strip()
    port = api.tcp_url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}"):
        status, body = await _req(api.tcp_url, "Status", bearer=token, headers={"Host": host})
        assert status == 403 and "Host" in body["error"], (host, status, body)


async def test_socket_and_token_are_private(api: ApiEndpoints) -> None:
    assert api.socket is not None and api.token_file is not None
    assert stat.S_IMODE(api.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(api.socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(api.token_file.stat().st_mode) == 0o600
    status, _ = await _req(api.url, "Status")  # our own uid on the socket: no token needed
    assert status == 200


# Runs as another user under the system's Python (the venv's lives under /root): one raw
# CreateVm over the socket; prints the HTTP status, or the error connecting.
_RAW_CREATE = """
import socket, sys
body = b'{"id": "x", "name": "x", "image": "sandbox-busybox"}'
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit(print(type(e).__name__))
s.sendall(b"POST /prpc/CreateVm HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json"
          b"\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s" % (len(body), body))
print(s.recv(64).split()[1].decode())
"""


def _as_nobody(socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", "-c", _RAW_CREATE, str(socket_path)],
                          user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
async def test_another_user_cannot_use_the_socket(api: ApiEndpoints, store: EventStore) -> None:
    assert api.socket is not None
    r = await asyncio.to_thread(_as_nobody, api.socket)
    assert r.stdout.strip() == "PermissionError", (r.stdout, r.stderr)
    # Even if someone loosens the permissions (here: a world-reachable link to the socket,
    # made world-writable), the peer's uid is checked.
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        link = Path(d) / "vmm.sock"
        os.link(api.socket, link)
        os.chmod(link, 0o666)
        try:
            r = await asyncio.to_thread(_as_nobody, link)
        finally:
            os.chmod(api.socket, 0o600)
    assert r.stdout.strip() == "403", (r.stdout, r.stderr)
    assert await store.last_by_subject(subject("vm", "x")) is None


async def test_no_tcp_listener_unless_asked_for(vmm_host: VmmHost) -> None:
    async with running_vmm(vmm_host.store, vmm_host.launch()) as (_, ends):
        assert ends.tcp_url == "" and ends.token_file is None
        assert ends.url == f"unix:{ends.socket}"
