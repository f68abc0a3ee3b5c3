"""Issue 12.3, "guests reach every host service": under QEMU user networking a guest opens
connections from the QEMU process, so without rules it reaches every port on every address of
its host (10.0.2.2 is the host's loopback): the VMM API, the dashboard, NATS, the supervisor.
QEMU runs as its own user, and the ``pydstack_guest_egress`` table lets that user open only
the listed services (here KMS = TCP 7101, gateway registration = TCP 7102, WireGuard = UDP
7103) on any address of the host, while other machines stay reachable (app egress) and
replies through port maps still flow.

Everything happens in network namespaces the tests make: "host" (loopback plus 10.99.0.1 on
a veth, another address of the host) and "outside" (10.99.0.2, another machine). The same
rules are checked twice: with a plain process of QEMU's user, and with a QEMU guest started
through the real supervisor and QEMU backend; each first without the rules (all reachable).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pydstack.actors.vmm._egress import guarded_guests
from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.firewall import GuestEgress, HostServices
from pydstack.adapters.nats import StoreError
from pydstack.adapters.qemu import QemuBackend, QemuBackendConfig
from pydstack.adapters.qemu.user import ensure_user
from pydstack.adapters.supervisor import RunAs, SupervisorClient, launch_supervisor
from pydstack.core.events import PortMap

from ..netns import Netns, entered
from ..qemu.busybox_guest import build_image, unavailable

KMS, REGISTRATION, WIREGUARD = 7101, 7102, 7103  # the listed services
OTHER_TCP, OTHER_UDP = 7109, 7110  # a service not listed (the VMM API, NATS, ...)
FORWARDED = 7200  # a port map: host 127.0.0.1:7200 -> guest :8080
SERVICES = HostServices(kms=(KMS,), gateway_registration=(REGISTRATION,), wireguard=(WIREGUARD,))
HOST_OTHER, REMOTE = "10.99.0.1", "10.99.0.2"

# Host side of the probes: a banner on each TCP port, an answer to each datagram (a TFTP
# DATA packet to a read request, "pong" to "ping"); one HIT line per connection or datagram.
LISTENER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    kind, port = spec.split(":")
    fam = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind.startswith("tcp") else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(port)))
    if kind.startswith("tcp"):
        s.listen()
    sel.register(s, selectors.EVENT_READ, (kind, int(port)))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        (kind, port), s = key.data, key.fileobj
        if kind.startswith("tcp"):
            c, peer = s.accept()
            c.sendall(b"open-%d\n" % port)
            c.close()
        else:
            data, peer = s.recvfrom(2048)
            if data[:2] == b"\x00\x01":
                s.sendto(b"\x00\x03\x00\x01open-%d\n" % port, peer)
            elif data.startswith(b"ping"):
                s.sendto(b"pong-%d" % port, peer)
        print("HIT", kind, port, peer[0], flush=True)
"""

# A process of QEMU's user trying each target; prints {target: "open" | "closed"}.
PROBE = r"""
import json, socket, sys
out = {}
for t in sys.argv[1:]:
    proto, rest = t.split(" ")
    host, port = rest.rsplit(":", 1)
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if proto == "tcp":
            with socket.create_connection((host, int(port)), timeout=2) as s:
                ok = s.recv(64).startswith(b"open-")
        else:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(1.5)
                s.connect((host, int(port)))
                s.send(b"ping")
                ok = s.recv(64).startswith(b"pong-")
    except OSError:
        ok = False
    out[t] = "open" if ok else "closed"
print(json.dumps(out))
"""

# What QEMU's user may reach with the rules; without them every target is open.
EXPECTED = {
    f"tcp 127.0.0.1:{KMS}": "open",
    f"tcp 127.0.0.1:{REGISTRATION}": "open",
    f"udp 127.0.0.1:{WIREGUARD}": "open",
    f"tcp 127.0.0.1:{OTHER_TCP}": "closed",
    f"udp 127.0.0.1:{OTHER_UDP}": "closed",
    f"tcp [::1]:{KMS}": "open",
    f"tcp [::1]:{OTHER_TCP}": "closed",
    f"tcp {HOST_OTHER}:{KMS}": "open",  # a listed port: on every address of the host
    f"tcp {HOST_OTHER}:{OTHER_TCP}": "closed",
    f"udp {HOST_OTHER}:{OTHER_UDP}": "closed",
    f"tcp {REMOTE}:{OTHER_TCP}": "open",  # another machine: the app's egress stays
}

# The guest: the same targets, its host's loopback being slirp's 10.0.2.2 (no IPv6 probe).
GUEST_EXPECTED = {
    k.replace("127.0.0.1", "10.0.2.2"): v for k, v in EXPECTED.items() if "[" not in k
}
_TCP = """if nc -w 3 {host} {port} </dev/null | grep -q open-{port}; then r=open; else r=closed; fi
echo "PROBE tcp {host}:{port} $r"
"""
_UDP = """rm -f /tmp/u; timeout 4 tftp -g -r probe -l /tmp/u {host} {port} 2>/dev/null
if grep -q open-{port} /tmp/u 2>/dev/null; then r=open; else r=closed; fi
echo "PROBE udp {host}:{port} $r"
"""
GUEST_SCRIPT = (
    "(echo fwd-ok | timeout 120 nc -l -p 8080) & FWD=$!\n"
    + "".join(
        (_TCP if t.startswith("tcp") else _UDP).format(
            host=t.split()[1].rsplit(":", 1)[0], port=t.rsplit(":", 1)[1]
        )
        for t in GUEST_EXPECTED
    )
    + "echo PROBES-END\nwait $FWD\npoweroff -f\n"
)

pytestmark = pytest.mark.timeout(300)


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nft, a second uid); this host runs as root")
    for tool in ("nft", "nsenter", "setpriv", "setfacl", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found on this host (make sysdeps)")


class Lab:
    """The two namespaces and their listeners."""

    def __init__(self, host: Netns, outside: Netns) -> None:
        self.host, self.outside = host, outside
        self.listeners: list[subprocess.Popen[str]] = []

    def listen(self, ns: Netns, *specs: str) -> None:
        p = subprocess.Popen(ns.argv(sys.executable, "-c", LISTENER, *specs),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        self.listeners.append(p)

    def probe(self, who: RunAs | None) -> dict[str, str]:
        """Try every target as ``who`` (None: root) from the host namespace."""
        drop = [] if who is None else ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}",
                                       "--clear-groups"]  # fmt: skip
        # /usr/bin/python3: the venv's interpreter may sit where QEMU's user cannot go
        argv = self.host.argv(*drop, "/usr/bin/python3", "-c", PROBE, *EXPECTED)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, r.stderr
        result: dict[str, str] = json.loads(r.stdout)
        return result


@pytest.fixture
def lab() -> Iterator[Lab]:
    _need_root_tools()
    with Netns.create("egress") as host, Netns.create("egress-out") as outside:
        host.ip("link", "add", "h0", "type", "veth", "peer", "name", "o0", "netns", outside.name)
        host.ip("addr", "add", f"{HOST_OTHER}/24", "dev", "h0")
        host.ip("link", "set", "h0", "up")
        outside.ip("addr", "add", f"{REMOTE}/24", "dev", "o0")
        outside.ip("link", "set", "o0", "up")
        lab = Lab(host, outside)
        try:
            lab.listen(host, *(f"{k}:{p}" for p in (KMS, REGISTRATION, OTHER_TCP)
                               for k in ("tcp4", "tcp6")),
                       f"udp4:{WIREGUARD}", f"udp4:{OTHER_UDP}")  # fmt: skip
            lab.listen(outside, f"tcp4:{OTHER_TCP}")
            yield lab
        finally:
            for p in lab.listeners:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def qemu_user() -> RunAs:
    _need_root_tools()
    return ensure_user()


async def test_qemu_user_reaches_only_the_listed_host_services(lab: Lab, qemu_user: RunAs) -> None:
    """Without the rules QEMU's user reaches everything; with them only the listed services
    on any host address (IPv4, IPv6) and other machines; root is not limited; removing the
    table opens everything again."""
    everything = dict.fromkeys(EXPECTED, "open")
    assert lab.probe(qemu_user) == everything
    fw = GuestEgress(qemu_user.uid, netns=lab.host.path)
    await fw.apply(SERVICES)
    assert lab.probe(qemu_user) == EXPECTED
    assert lab.probe(None) == everything
    await fw.apply(SERVICES)  # replaced atomically, not added twice
    assert (await fw.listed()).count("jump guest") == 1
    await fw.remove()
    assert await fw.listed() == ""
    assert lab.probe(qemu_user) == everything


T = TypeVar("T")


def _in_netns(ns: Netns, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread inside ``ns`` (what it starts runs there too)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with entered(ns):
                box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name=f"in-{ns.name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


async def _boot_guest(
    root: Path, images: Path, ns: Netns, rules: bool
) -> tuple[dict[str, str], str]:
    """Boot the probe guest through the supervisor; its PROBE lines and the port map's answer."""
    sv_proc = launch_supervisor(root / "sv.sock", root / "supervisor")
    sv = SupervisorClient(root / "sv.sock")
    try:
        await sv.wait_ready()
        backend = QemuBackend(QemuBackendConfig(vms_dir=root / "vms", images=images,
                                                vsock=False), sv)  # fmt: skip
        who = ensure_user()
        if rules:
            await GuestEgress(who.uid, netns=ns.path).apply(SERVICES)
        ports = (PortMap(host_port=FORWARDED, vm_port=8080),)
        await backend.create(CvmSpec(vm_id="probe", image="probe", vcpu=1, memory_mb=256,
                                     ports=ports))  # fmt: skip
        info = await backend.start("probe")
        assert info.pid is not None
        assert _uid_of(info.pid) == who.uid  # QEMU runs as its own user
        serial = root / "vms" / "probe" / "serial.log"
        deadline = time.monotonic() + 120
        while "PROBES-END" not in (text := serial.read_text(errors="replace")):
            assert time.monotonic() < deadline, f"no probe results:\n{text[-2000:]}"
            assert (await backend.status("probe")).state == "running", text[-2000:]
            await asyncio.sleep(0.5)
        with socket.create_connection(("127.0.0.1", FORWARDED), timeout=10) as s:
            forwarded = s.recv(64).decode().strip()
        for _ in range(100):  # the guest powers off once the forwarded connection is done
            if (await backend.status("probe")).state != "running":
                break
            await asyncio.sleep(0.2)
        probes = {}
        for line in text.splitlines():
            if line.startswith("PROBE "):
                _, proto, target, result = line.split()
                probes[f"{proto} {target}"] = result
        return probes, forwarded
    finally:
        for p in await sv.list():
            if p.running:
                await sv.kill(p.config.id)
        await sv.close()
        sv_proc.terminate()
        sv_proc.wait()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
def probe_images(tmp_path: Path) -> Path:
    _need_root_tools()
    if (why := unavailable()) is not None:
        pytest.skip(f"this host cannot boot a busybox guest: {why}")
    return build_image(tmp_path / "images", "probe", GUEST_SCRIPT)


def test_guest_reaches_only_the_listed_host_services(
    lab: Lab, probe_images: Path, tmp_path: Path
) -> None:
    """A QEMU guest (user networking, restrict=off) under the real supervisor reaches every
    target without the rules; with them only the KMS, registration and WireGuard ports on
    10.0.2.2 and the host's other address, and another machine; its port map still answers."""
    t0 = time.monotonic()
    without, fwd = _in_netns(lab.host, lambda: asyncio.run(
        _boot_guest(tmp_path / "a", probe_images, lab.host, rules=False)))  # fmt: skip
    assert without == dict.fromkeys(GUEST_EXPECTED, "open")
    assert fwd == "fwd-ok"
    with_rules, fwd = _in_netns(lab.host, lambda: asyncio.run(
        _boot_guest(tmp_path / "b", probe_images, lab.host, rules=True)))  # fmt: skip
    assert with_rules == GUEST_EXPECTED
    assert fwd == "fwd-ok"  # replies to a port map's clients are not the guest's egress
    print(f"two guest boots with probes: {time.monotonic() - t0:.0f} s")


async def test_the_qemu_backend_refuses_without_nft_or_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No nft, or not root: the VMM's QEMU backend does not start (one line naming the fix)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: no nft
    with pytest.raises(StoreError, match=r"^qemu backend: nft not found: install nftables"):
        async with guarded_guests(SERVICES):
            pass
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(StoreError, match=r"^qemu backend: the QEMU backend needs root"):
        async with guarded_guests(SERVICES):
            pass
