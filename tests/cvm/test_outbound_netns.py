"""The sandbox's TCP relay from inside a CVM's namespace (only a loopback there) to services
outside: one on the host's loopback and one on a non-loopback address (another machine, in
multi-host), each reached inside at its own URL."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydstack.adapters.sandbox import _netns

CHILD = r"""
import asyncio, sys, urllib.request
from pydstack.adapters.sandbox import _netns
from pydstack.adapters.sandbox._outbound import HostRelay
urls, ns, prefix = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
relay = HostRelay.start(urls, prefix)          # its thread stays in the host's namespace
_netns.enter(ns)

async def main():
    servers = await relay.serve_inside()
    for u in urls:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(u, timeout=5).read())
        print(u, body.decode(), flush=True)
    for s in servers:
        s.close()

asyncio.run(main())
"""


def _serve(addr: str, text: bytes) -> tuple[socket.socket, int]:
    srv = socket.create_server((addr, 0))

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))

    threading.Thread(target=loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def _outside_address() -> str:
    """A non-loopback IPv4 address of this machine (the route to a public address)."""
    out = subprocess.run(["ip", "-4", "route", "get", "192.0.2.123"], capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return out[out.index("src") + 1] if "src" in out else ""


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    name = f"pdt{secrets.token_hex(3)}"
    _netns.ensure(name)
    yield name
    _netns.kill_all(name)
    _netns.delete(name)


def test_loopback_and_remote_services_reached_at_their_urls(netns: str, tmp_path: Path) -> None:
    remote = _outside_address()
    if not remote:
        pytest.skip("no non-loopback IPv4 address on this machine")
    local_srv, local_port = _serve("127.0.0.1", b"local")
    remote_srv, remote_port = _serve(remote, b"remote")
    other_srv, other_port = _serve(remote, b"other")  # a second service at the same address
    urls = [f"http://127.0.0.1:{local_port}/", f"http://{remote}:{remote_port}/",
            f"http://{remote}:{other_port}/"]  # fmt: skip
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, ",".join(urls), netns, str(tmp_path / "r")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        for srv in (local_srv, remote_srv, other_srv):
            srv.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{urls[0]} local", f"{urls[1]} remote", f"{urls[2]} other"]
    # Without the relay nothing is reachable there: the namespace has no route out.
    probe = subprocess.run(["ip", "netns", "exec", netns, "ip", "-4", "route"],
                           capture_output=True, text=True)  # fmt: skip
    assert probe.stdout.strip() == ""
