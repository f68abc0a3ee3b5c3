"""Host services a sandbox CVM may call (KMS, gateway), reachable from inside its namespace.

The CVM's namespace has only a loopback, so ``https://127.0.0.1:P`` of the host's KMS or
gateway registration is served inside by a TCP listener on the same address that relays each
connection over a Unix socket (file paths cross namespaces) to a thread left in the host's
namespace, which connects to the real port. TLS runs end to end through it. A service on
another machine (``https://10.0.0.2:9100``, multi-host) gets the same treatment: its address
is added to the namespace's loopback device, so the URL and its certificate stay unchanged.

A gateway's WireGuard endpoint (UDP) gets a relay of its own: a host-side UDP socket (made by
that thread, so it belongs to the host's namespace) paired with a loopback socket inside; the
CVM's wireguard-go sends to the inside one. One host socket per CVM, so the gateway sees one
endpoint (address and port) per peer, as it would with real VMs.

    relay = HostRelay.start(["https://127.0.0.1:9100"], prefix)  # before entering the netns
    servers = await relay.serve_inside()                            # after
    inside = await relay.udp("127.0.0.1:51820")                     # "127.0.0.1:<port>"
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from pydstack.adapters.streams import pipe

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def relay_targets(urls: list[str]) -> list[tuple[str, int]]:
    """(address, port) of each URL the relay can serve inside: loopback names and IP literals
    (a DNS name would need a resolver inside the namespace; those URLs are left out)."""
    out = []
    for u in urls:
        p = urlsplit(u)
        host = p.hostname or ""
        if host not in LOOPBACK:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                continue
        out.append((host, p.port or (443 if p.scheme == "https" else 80)))
    return sorted(set(out))


def _local_address(host: str) -> None:
    """Make ``host`` an address of this namespace (on ``lo``) so a listener can bind it."""
    if host in LOOPBACK or ipaddress.ip_address(host).is_loopback:
        return
    prefix = 128 if ":" in host else 32
    r = subprocess.run(["ip", "addr", "add", f"{host}/{prefix}", "dev", "lo"],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode and not ("File exists" in r.stderr or "already assigned" in r.stderr):
        raise OSError(f"cannot add {host} inside the CVM's namespace: {r.stderr.strip()}")


async def _relay(r: asyncio.StreamReader, w: asyncio.StreamWriter, connect: object) -> None:
    try:
        r2, w2 = await connect()  # type: ignore[operator]
    except OSError:
        w.close()
        return
    await asyncio.gather(pipe(r, w2), pipe(r2, w))
    for x in (w, w2):
        x.close()


class _Datagrams(asyncio.DatagramProtocol):
    """One side of a UDP relay: what arrives goes to ``forward``."""

    def __init__(self, forward: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.forward = forward

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.forward(data, addr)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ValueError names the bad endpoint."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


class HostRelay:
    def __init__(self, targets: list[tuple[str, int]], prefix: str) -> None:
        self.targets = targets
        self.paths = {t: Path(f"{prefix}.out{i}.sock") for i, t in enumerate(targets)}
        self._host_loop: asyncio.AbstractEventLoop | None = None
        self._udp: list[asyncio.BaseTransport] = []

    @classmethod
    def start(cls, urls: list[str], prefix: str) -> HostRelay:
        """Start the host-side thread and its Unix sockets (call in the host namespace)."""
        relay = cls(relay_targets(urls), prefix)
        ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(relay._host(ready),), daemon=True).start()
        if not ready.wait(10):
            raise OSError("host relay did not start")
        return relay

    async def udp(self, endpoint: str) -> str:
        """Relay datagrams to ``endpoint`` (dialled from the host's namespace); returns the
        loopback address inside to send them to instead."""
        host, port = split_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self._host_loop is None:
            raise OSError("host relay is not running")

        async def outside_socket() -> socket.socket:  # runs in the host's namespace
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((host, port))
            return s

        fut = asyncio.run_coroutine_threadsafe(outside_socket(), self._host_loop)
        out_sock = await asyncio.wrap_future(fut)
        loop = asyncio.get_running_loop()
        peer: list[tuple[str, int]] = []
        inside: list[asyncio.DatagramTransport] = []

        def to_host(data: bytes, addr: tuple[str, int]) -> None:
            peer[:] = [addr]  # the CVM's wireguard-go socket: replies go back there
            out_t.sendto(data)

        def to_cvm(data: bytes, _addr: tuple[str, int]) -> None:
            if peer and inside:
                inside[0].sendto(data, peer[0])

        out_t, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(to_cvm), sock=out_sock)
        in_t, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(to_host), local_addr=("::1" if family == socket.AF_INET6
                                                      else "127.0.0.1", 0))  # fmt: skip
        inside.append(in_t)
        self._udp += [out_t, in_t]
        local = in_t.get_extra_info("sockname")
        return f"[{local[0]}]:{local[1]}" if family == socket.AF_INET6 else f"{local[0]}:{local[1]}"

    def close_udp(self) -> None:
        for t in self._udp:
            t.close()
        self._udp.clear()

    async def _host(self, ready: threading.Event) -> None:
        self._host_loop = asyncio.get_running_loop()
        for (host, port), path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)

            def handler(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, h: str = host, p: int = port
            ) -> asyncio.Future[None]:
                return asyncio.ensure_future(_relay(r, w, lambda: asyncio.open_connection(h, p)))

            await asyncio.start_unix_server(handler, path=str(path))
        ready.set()
        await asyncio.Event().wait()  # serve for the life of the process

    async def serve_inside(self) -> list[asyncio.Server]:
        """TCP listeners on the targets' addresses inside the CVM's namespace."""
        out = []
        for (host, port), path in self.paths.items():

            def handler(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, u: str = str(path)
            ) -> asyncio.Future[None]:
                return asyncio.ensure_future(_relay(r, w, lambda: asyncio.open_unix_connection(u)))

            _local_address(host)  # in the calling thread: the one that entered the namespace
            out.append(await asyncio.start_server(handler, host, port))
        return out
