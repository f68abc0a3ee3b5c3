"""Real TLS material and real backends on loopback for the proxy tests.

Every backend answers ``<name>|<what it received>`` so a test sees which instance it
reached and exactly which bytes arrived (a PROXY header, plaintext or TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import socket
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    """A throw-away CA and how to get certificates from it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) for a leaf valid for ``names`` (wildcards allowed)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return leaf.public_bytes(serialization.Encoding.PEM) + self.pem, key_pem

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.pem.decode())
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def random_loopback() -> str:
    """A random 127/8 address, so parallel runs do not fight over ports."""
    return f"127.{secrets.randbelow(254) + 1}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


@dataclass
class Backend:
    """A TCP (or TLS) server that answers ``name|received`` and records what it saw."""

    name: str
    ip: str
    port: int
    server: asyncio.Server
    received: list[bytes] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    open_conns: int = 0

    def close(self) -> None:
        self.server.close()


async def start_backend(
    name: str,
    ip: str,
    port: int = 0,
    *,
    tls: ssl.SSLContext | None = None,
    hold: bool = False,
    read_until_eof: bool = False,
) -> Backend:
    """Reply once per read with ``name|data``; ``hold`` keeps connections open silently."""
    backend: Backend
    names: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.open_conns += 1
        try:
            if hold:
                await reader.read()
                return
            if read_until_eof:
                data = await reader.read()
                backend.received.append(data)
                writer.write(f"{name}|".encode() + data)
                await writer.drain()
                return
            while data := await reader.read(1 << 20):
                backend.received.append(data)
                writer.write(f"{name}|".encode() + data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            backend.open_conns -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    if tls is not None:

        def record_sni(_obj: object, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            names.append(server_name)

        tls.sni_callback = record_sni
    server = await asyncio.start_server(handle, ip, port, ssl=tls, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    backend = Backend(name, ip, bound, server, server_names=names)
    return backend


def backend_tls(chain_key: tuple[bytes, bytes]) -> ssl.SSLContext:
    from pydstack.adapters.proxy import server_context_from_pem

    return server_context_from_pem(*chain_key, h2=False)


async def tls_request(
    port: int,
    server_name: str,
    payload: bytes,
    ctx: ssl.SSLContext,
    *,
    timeout: float = 5,
) -> tuple[bytes, str | None]:
    """TLS to the proxy with ``server_name``; send, read one answer; (answer, ALPN)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_name
        )
        try:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            writer.write(payload)
            await writer.drain()
            return await reader.read(1 << 20), alpn
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def refused(port: int, first_bytes: bytes, *, timeout: float = 5) -> bool:
    """Send raw bytes; True when the proxy closes without answering a single byte."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(first_bytes)
            await writer.drain()
            try:
                return await reader.read(1024) == b""
            except ConnectionResetError:
                return True
        finally:
            writer.close()


def client_hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def port_is_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True
