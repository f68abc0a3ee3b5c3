"""TLS ClientHello parsing (SNI, ALPN) and dstack's SNI routing rules (pure).

`parse_client_hello` reads the first TLS records a client sends, reassembling a
ClientHello split over several records, and raises only `ClientHelloError`:
`IncompleteClientHello` when more bytes may complete it, `MalformedClientHello` otherwise.

`parse_route` applies dstack's rule to a server name under one of the base domains:
``<id>[-[<port>][s|g]].<base>``: no suffix terminates TLS and relays plain TCP (default
port 80), ``s`` passes TLS through untouched (default port 443), ``g`` terminates TLS
offering ALPN ``h2`` (default port 80). ``-sg``/``-gs`` and extra dashes are errors.

Usage::

    hello = parse_client_hello(first_bytes)
    route = parse_route(hello.server_name, ("app.example.com",))
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SNI = 0
_EXT_ALPN = 16
_MAX_RECORD = 16384 + 2048  # TLSCiphertext limit; a plaintext ClientHello record is smaller
MAX_HELLO = 65536  # refuse larger ClientHellos (real ones are < 4 KiB, ~2 KiB with PQ keys)
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
)


class ClientHelloError(ValueError):
    """The bytes are not (yet) a usable TLS ClientHello."""


class IncompleteClientHello(ClientHelloError):
    """Everything so far is consistent but the ClientHello is not complete: read more."""


class MalformedClientHello(ClientHelloError):
    """The bytes can never become a valid ClientHello; the message says where it broke."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower-case host name, None when the client sent no SNI
    alpn: tuple[str, ...]  # offered protocols in client order
    length: int  # bytes of TLS records the ClientHello occupied


class _Reader:
    """Bounds-checked big-endian reads over one complete handshake message."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedClientHello(
                f"{self.what}: {field} needs {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def vec(self, len_bytes: int, field: str) -> _Reader:
        n = int.from_bytes(self.take(len_bytes, f"{field} length"), "big")
        return _Reader(self.take(n, field), field)

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def _handshake_message(data: bytes) -> tuple[bytes, int]:
    """Reassemble the first handshake message from records; returns (body, bytes used)."""
    payload = b""
    pos = 0
    need: int | None = None
    while need is None or len(payload) < need:
        if len(data) < pos + 5:
            raise IncompleteClientHello(f"record header at offset {pos} not complete")
        ctype, major, rec_len = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if ctype != _HANDSHAKE:
            raise MalformedClientHello(f"record type {ctype} at offset {pos}, want handshake (22)")
        if major != 3:
            raise MalformedClientHello(f"record version {major}.{data[pos + 2]} is not TLS")
        if rec_len == 0 or rec_len > _MAX_RECORD:
            raise MalformedClientHello(f"record length {rec_len} at offset {pos}")
        if len(data) < pos + 5 + rec_len:
            raise IncompleteClientHello(f"record at offset {pos} needs {rec_len} bytes")
        payload += data[pos + 5 : pos + 5 + rec_len]
        pos += 5 + rec_len
        if need is None and len(payload) >= 4:
            if payload[0] != _CLIENT_HELLO:
                raise MalformedClientHello(f"handshake type {payload[0]}, want ClientHello (1)")
            need = 4 + int.from_bytes(payload[1:4], "big")
            if need > MAX_HELLO:
                raise MalformedClientHello(f"ClientHello of {need} bytes exceeds {MAX_HELLO}")
    return payload[4:need], pos


def _server_name(ext: _Reader) -> str | None:
    names = ext.vec(2, "server_name_list")
    if not ext.done or names.done:
        raise MalformedClientHello("server_name extension: bad list")
    host: str | None = None
    while not names.done:
        name_type = names.u8("name_type")
        name = names.vec(2, "host_name").data
        if name_type == 0 and host is None:
            try:
                text = name.decode("ascii").lower()
            except UnicodeDecodeError as exc:
                raise MalformedClientHello("server name is not ASCII") from exc
            if not _HOST_RE.match(text):
                raise MalformedClientHello(f"server name {text[:80]!r} is not a host name")
            host = text
    return host


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protos = ext.vec(2, "protocol_name_list")
    if not ext.done or protos.done:
        raise MalformedClientHello("ALPN extension: bad list")
    out = []
    while not protos.done:
        raw = protos.vec(1, "protocol_name").data
        if not raw:
            raise MalformedClientHello("ALPN extension: empty protocol name")
        out.append(raw.decode("latin-1"))
    return tuple(out)


def _parse_one_record(data: bytes) -> ClientHello | None:
    """The common case, a ClientHello in one record, read with plain index arithmetic.

    A per-connection cost of the proxy, so no `_Reader` objects or field names here: this
    accepts only what `_parse_checked` accepts (with the same result) and returns None for
    anything else, which `_parse_checked` then reads again to say what is wrong."""
    n = len(data)
    if n < 9 or data[0] != _HANDSHAKE or data[1] != 3 or data[5] != _CLIENT_HELLO:
        return None
    rec_len = data[3] << 8 | data[4]
    end = 9 + (data[6] << 16 | data[7] << 8 | data[8])
    if rec_len == 0 or rec_len > _MAX_RECORD or n < 5 + rec_len or end > 5 + rec_len:
        return None
    p = 9 + 2 + 32  # legacy_version, random
    if p >= end or data[p] > 32:  # session_id
        return None
    p += 1 + data[p]
    if p + 2 > end:
        return None
    suites = data[p] << 8 | data[p + 1]
    p += 2 + suites
    if not suites or suites % 2 or p + 1 > end or not data[p]:  # compression_methods
        return None
    p += 1 + data[p]
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if p < end:
        if p + 2 > end or p + 2 + (data[p] << 8 | data[p + 1]) != end:
            return None
        p += 2
        seen: set[int] = set()
        while p < end:
            if p + 4 > end:
                return None
            ext_type, ext_len = data[p] << 8 | data[p + 1], data[p + 2] << 8 | data[p + 3]
            p += 4
            if p + ext_len > end or ext_type in seen:
                return None
            seen.add(ext_type)
            if ext_type == _EXT_SNI or ext_type == _EXT_ALPN:
                ext = _Reader(data[p : p + ext_len], f"extension {ext_type}")
                try:
                    if ext_type == _EXT_SNI:
                        server_name = _server_name(ext)
                    else:
                        alpn = _alpn(ext)
                except ClientHelloError:
                    return None
            p += ext_len
    elif p > end:
        return None
    return ClientHello(server_name=server_name, alpn=alpn, length=5 + rec_len)


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse the ClientHello at the start of ``data`` (the first bytes a TLS client sends)."""
    data = bytes(data)
    return _parse_one_record(data) or _parse_checked(data)


def _parse_checked(data: bytes) -> ClientHello:
    """Every case (records split, anything malformed), with errors naming what broke."""
    body, used = _handshake_message(data)
    r = _Reader(body, "ClientHello")
    r.take(2, "legacy_version")
    r.take(32, "random")
    if len(r.vec(1, "session_id").data) > 32:
        raise MalformedClientHello("session_id longer than 32 bytes")
    suites = r.vec(2, "cipher_suites").data
    if not suites or len(suites) % 2:
        raise MalformedClientHello(f"cipher_suites of {len(suites)} bytes")
    if not r.vec(1, "compression_methods").data:
        raise MalformedClientHello("no compression methods")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if not r.done:
        exts = r.vec(2, "extensions")
        if not r.done:
            raise MalformedClientHello("bytes after the extensions")
        seen: set[int] = set()
        while not exts.done:
            ext_type = exts.u16("extension type")
            ext = exts.vec(2, f"extension {ext_type}")
            if ext_type in seen:
                raise MalformedClientHello(f"extension {ext_type} appears twice")
            seen.add(ext_type)
            if ext_type == _EXT_SNI:
                server_name = _server_name(ext)
            elif ext_type == _EXT_ALPN:
                alpn = _alpn(ext)
    return ClientHello(server_name=server_name, alpn=alpn, length=used)


class Mode(enum.Enum):
    """What the proxy does with the TLS connection."""

    TERMINATE = ""  # terminate TLS, relay plain TCP to the app
    PASSTHROUGH = "s"  # relay the TLS bytes untouched; the app terminates
    H2 = "g"  # terminate TLS offering ALPN h2, relay plaintext (gRPC)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a server name points: an instance or app id, a port and a mode."""

    id: str
    port: int
    mode: Mode
    base_domain: str = ""


class RouteError(ValueError):
    """The server name is under a base domain but does not follow ``<id>[-<port>][s|g]``."""


_ID_RE = re.compile(r"^[a-z0-9_]+$")


def parse_route(host: str, base_domains: tuple[str, ...] | list[str]) -> Route | None:
    """The route for ``host``; None when it is under no base domain (a custom domain)."""
    host = host.lower().rstrip(".")
    label, dot, rest = host.partition(".")
    if not dot or rest not in {d.lower().rstrip(".") for d in base_domains}:
        return None
    ident, dash, suffix = label.partition("-")
    if not _ID_RE.match(ident):
        raise RouteError(f"{host!r}: id {ident!r} must be non-empty [a-z0-9_]")
    mode = Mode.TERMINATE
    port: int | None = None
    if dash:
        if "-" in suffix:
            raise RouteError(f"{host!r}: more than one '-' in {label!r}")
        digits = suffix
        if digits.endswith("g"):
            digits, mode = digits[:-1], Mode.H2
        if digits.endswith("s"):
            if mode is Mode.H2:
                raise RouteError(f"{host!r}: 's' and 'g' cannot be combined")
            digits, mode = digits[:-1], Mode.PASSTHROUGH
        if digits:
            if not digits.isdigit() or not 0 < int(digits) < 65536:
                raise RouteError(f"{host!r}: port {digits!r} is not 1-65535")
            port = int(digits)
    if port is None:
        port = 443 if mode is Mode.PASSTHROUGH else 80
    return Route(id=ident, port=port, mode=mode, base_domain=rest)


def parse_app_address(txt: str) -> tuple[str, int]:
    """A ``_dstack-app-address`` TXT value ``<app_id>:<port>`` as (app_id, port)."""
    app_id, sep, port = txt.strip().partition(":")
    if not sep or not _ID_RE.match(app_id.lower()) or not port.isdigit():
        raise RouteError(f"app address {txt!r} is not <app_id>:<port>")
    if not 0 < int(port) < 65536:
        raise RouteError(f"app address {txt!r}: port out of range")
    return app_id.lower(), int(port)
