#!/usr/bin/python3
"""Guest boot reporter: tells the host how far the guest got, without vsock.

Stages go out as JSON lines on the virtio-serial port ``org.pydstack.events`` (the host reads
them from a file chardev) and as ``PYDSTACK_STAGE <json>`` lines on the serial console. An HTTP
server on :8080 answers ``GET /`` with the latest stage, so a port-forwarded request proves the
network path. "ready" = HTTP bound and an IPv4 address on eth0; "docker" follows once
/var/run/docker.sock answers. Standard library only: it must run before anything else works.

When the app-compose in the host share has a compose file, there is no HTTP server (the app's
services own the ports), the network stage is "network", and ``pydstack_guest.image_boot``
runs the boot flow (keys, env, gateway, agent, docker, app, then "ready"), its stages reported
from here. Then systemd hears READY (which docker and containerd wait for) only once the flow
reports "storage": their state lives on the encrypted data disk the flow mounts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EVENTS_PORT = "/dev/virtio-ports/org.pydstack.events"
HTTP_PORT = 8080
SHARE_TAG, SHARE_DIR = "host-shared", "/dstack/.host-shared"
GUEST_LIB, BOOT_FLOW = "/opt/pydstack/lib", "pydstack_guest.image_boot"
STATE: dict[str, object] = {"stage": "starting", "stages": []}


def report(stage: str, detail: str = "") -> None:
    line = json.dumps({"stage": stage, "detail": detail, "uptime_s": uptime()})
    STATE["stage"] = stage
    STATE["stages"].append(stage)  # type: ignore[attr-defined]
    for path in (EVENTS_PORT, "/dev/ttyS0"):
        try:
            with open(path, "w") as f:
                f.write(line + "\n" if path == EVENTS_PORT else f"PYDSTACK_STAGE {line}\n")
        except OSError:
            pass
    print(line, flush=True)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def sd_notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(msg.encode())


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({**STATE, "hostname": socket.gethostname(), "uptime_s": uptime()})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def has_ipv4(ifname: str) -> bool:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", ifname], capture_output=True, text=True
    ).stdout
    return " inet " in out


def mount_host_share() -> str:
    os.makedirs(SHARE_DIR, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,ro", SHARE_TAG, SHARE_DIR],
        capture_output=True,
        text=True,
    )
    return "mounted" if r.returncode == 0 else "none"


def wait_docker(timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect("/var/run/docker.sock")
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if b"OK" in s.recv(1024):
                    report("docker")
                    return
        except OSError:
            pass
        time.sleep(1)


def has_app() -> bool:
    """The app-compose in the host share has a compose file: run the boot flow for it."""
    try:
        with open(os.path.join(SHARE_DIR, "app-compose.json")) as f:
            return bool(json.load(f).get("docker_compose_file"))
    except (OSError, ValueError, AttributeError):
        return False


def run_boot_flow() -> None:
    """pydstack_guest's boot flow (keys, env, gateway, agent, docker, app); its stage lines are
    reported from here. It halts on a failed step; an exit without one is reported too."""
    env = {**os.environ, "PYTHONPATH": GUEST_LIB}
    proc = subprocess.Popen([sys.executable, "-m", BOOT_FLOW], stdout=subprocess.PIPE, env=env,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    ready = False
    for line in proc.stdout:
        try:
            doc = json.loads(line)
            report(str(doc["stage"]), str(doc.get("detail", "")))
        except (ValueError, KeyError, TypeError):
            print(line.rstrip(), flush=True)
            continue
        if not ready and doc["stage"] in ("storage", "error"):
            ready = True
            sd_notify("READY=1")  # the data disk is mounted (or never will be): start docker
    code = proc.wait()
    report("error", f"boot error: {BOOT_FLOW} exited with {code}")
    sd_notify("READY=1")


def main() -> int:
    for _ in range(50):  # udev may not have named the virtio port yet
        if os.path.exists(EVENTS_PORT):
            break
        time.sleep(0.1)
    report("booted", os.uname().release)
    share = mount_host_share()
    # With an app, its own services own the ports (the hello example listens on :8080) and
    # "ready" is the flow's last stage, once the app runs; "network" stands in for it here.
    app = share == "mounted" and has_app()
    if not app:
        server = ThreadingHTTPServer(("0.0.0.0", HTTP_PORT), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = time.monotonic() + 120
    while not has_ipv4("eth0") and time.monotonic() < deadline:
        time.sleep(0.2)
    report("network" if app else "ready", f"http={'app' if app else HTTP_PORT} share={share}")
    if not app:  # with an app, once its data disk is mounted (run_boot_flow)
        sd_notify("READY=1")  # docker.service waits for this (After=pydstack-boot.service)
    if app:
        run_boot_flow()
    else:
        wait_docker()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
