"""Simulated CVMs on the test LAN: each in its own namespace with its own wireguard-go, an
RA-TLS identity from the TDX simulator, and servers that say who they are:

- ports 80 and 8080: HTTP/1.1, body ``<name>|<port>``
- port 443: TLS with the CVM's own certificate, body ``tls|<name>`` (passthrough target)
- port 8443: plaintext after the gateway's h2 termination: answers the HTTP/2 preface with
  ``h2|<name>`` (anything else gets HTTP/1.1)

Clients connect from a client namespace to a gateway's underlay address, never from the host
to a tunnel address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

from pydstack.adapters.wireguard import PrivateKey, UserspaceBackend, WireGuardDevice
from pydstack.adapters.wireguard import netns as ns
from pydstack_guest.gateway_client import Registration, bring_up_tunnel, register_cvm
from tests.gateway.simcvm import DevCa, SimCvm

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PORTS = (80, 8080, 443, 8443)


async def _serve(netns: str, port: int, name: str, tls: ssl.SSLContext | None) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            data = await reader.read(4096)
            if data.startswith(H2_PREFACE):
                writer.write(b"h2|" + name.encode())
            else:
                body = (f"tls|{name}" if tls else f"{name}|{port}").encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
        writer.close()

    sock = ns.socket_in_netns(netns)
    sock.setsockopt(1, 2, 1)  # SO_REUSEADDR
    sock.bind(("0.0.0.0", port))
    sock.listen()
    sock.setblocking(False)
    return await asyncio.start_server(handle, sock=sock, ssl=tls)


@dataclass
class Cvm:
    name: str
    netns: str
    sim: SimCvm
    key: PrivateKey = field(default_factory=PrivateKey.generate)
    reg: Registration | None = None
    device: WireGuardDevice | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    cert_der: bytes = b""

    @property
    def instance_id(self) -> str:
        return self.sim.instance_id.hex()

    @property
    def app_id(self) -> str:
        return self.sim.app_id.hex()

    async def start_servers(self, tls: ssl.SSLContext, cert_der: bytes) -> None:
        self.cert_der = cert_der
        for port in PORTS:
            ctx = tls if port == 443 else None
            self.servers.append(await _serve(self.netns, port, self.name, ctx))

    async def register(
        self,
        url: str,
        ca: DevCa,
        backend: UserspaceBackend,
        *,
        prefix: int,
        ports: list[dict[str, object]] | None = None,
        restrict: bool = False,
    ) -> None:
        self.reg = await register_cvm(
            url,
            identity=await self.sim.identity(ca),
            ca_pem=ca.pem,
            wg_public_key=self.key.public_key().b64,
            ports=ports,
            restrict=restrict,
        )
        self.device = await bring_up_tunnel(
            backend, "wg0", self.key, self.reg, netns=self.netns, prefix=prefix, keepalive=5
        )

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        if self.device is not None:
            await self.device.close()


async def fetch(
    client_ns: str, gw_ip: str, host: str, ca_pem: str, *, mode: str = "", port: int = 443
) -> tuple[bytes, bytes | None]:
    """Connect from ``client_ns`` to a gateway with SNI ``host``; returns (body, the server
    certificate DER). ``mode``: "" HTTP/1.1 over TLS, "h2" (ALPN h2, HTTP/2 preface)."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    if mode == "h2":
        ctx.set_alpn_protocols(["h2"])
    sock = ns.socket_in_netns(client_ns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        try:
            await loop.sock_connect(sock, (gw_ip, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=host)
        try:
            tls = writer.get_extra_info("ssl_object")
            cert = tls.getpeercert(binary_form=True) if tls else None
            if mode == "h2":
                assert tls.selected_alpn_protocol() == "h2"
                writer.write(H2_PREFACE)
            else:
                writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(65536)
            while chunk := await reader.read(65536):
                data += chunk
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    body = data.split(b"\r\n\r\n", 1)[1] if data.startswith(b"HTTP/") else data
    return body, cert
