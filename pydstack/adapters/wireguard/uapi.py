"""The WireGuard cross-platform UAPI text protocol (pure: bytes in, bytes out).

See https://www.wireguard.com/xplatform/ . A `set` request is ``set=1`` followed by
``key=value`` lines and a blank line; the device answers ``errno=N`` and a blank line.
A `get` request is ``get=1`` and a blank line; the answer lists the device, then each
peer starting at its ``public_key=`` line, then ``errno=N``. Keys are hex on the socket.

Usage::

    request = render_set(ops, private_key=key, listen_port=51820)
    check_set_response(answer_bytes)
    status = parse_get(get_answer_bytes)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import KeyFormatError, UapiError, UapiProtocolError
from .keys import PrivateKey, b64_to_hex, hex_to_b64
from .model import DeviceStatus, PeerOp, PeerStatus, normalize_cidr, normalize_endpoint

GET_REQUEST = b"get=1\n\n"


def render_set(
    ops: Sequence[PeerOp] = (),
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    replace_peers: bool = False,
) -> bytes:
    """One complete ``set=1`` request (terminated by the blank line)."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex}")
    if listen_port is not None:
        if not 0 <= listen_port < 65536:
            raise KeyFormatError(f"listen port {listen_port} out of range")
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    if replace_peers:
        lines.append("replace_peers=true")
    for op in ops:
        lines.extend(_render_peer(op))
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _render_peer(op: PeerOp) -> list[str]:
    out = [f"public_key={b64_to_hex(op.public_key)}"]
    if op.remove:
        out.append("remove=true")
        return out
    if op.update_only:
        out.append("update_only=true")
    if op.endpoint is not None:
        out.append(f"endpoint={normalize_endpoint(op.endpoint)}")
    if op.persistent_keepalive is not None:
        out.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
    if op.replace_allowed_ips:
        out.append("replace_allowed_ips=true")
    out.extend(f"allowed_ip={normalize_cidr(c)}" for c in op.allowed_ips)
    return out


def _pairs(answer: bytes) -> Iterable[tuple[str, str]]:
    try:
        text = answer.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UapiProtocolError(f"UAPI answer is not ASCII: {exc}") from exc
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"UAPI answer line {line!r} has no '='")
        yield key, value


def _errno(value: str, operation: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise UapiProtocolError(f"{operation}: errno {value!r} is not a number") from exc


def check_set_response(answer: bytes) -> None:
    """Raise `UapiError` unless the device answered ``errno=0``."""
    for key, value in _pairs(answer):
        if key == "errno":
            code = _errno(value, "set")
            if code != 0:
                raise UapiError(code, "set")
            return
    raise UapiProtocolError(f"set: answer {answer[:80]!r} carries no errno line")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise UapiProtocolError(f"get: {key}={value!r} is not a number") from exc


class _PeerBuilder:
    """Collects one peer's lines (mutable only while parsing)."""

    def __init__(self, public_key_hex: str) -> None:
        try:
            self.public_key = hex_to_b64(public_key_hex)
        except KeyFormatError as exc:
            raise UapiProtocolError(f"get: bad peer key: {exc}") from exc
        self.allowed: list[str] = []
        self.endpoint: str | None = None
        self.keepalive = 0
        self.hs_sec = 0
        self.hs_nsec = 0
        self.rx = 0
        self.tx = 0
        self.version = 1

    def feed(self, key: str, value: str) -> None:
        match key:
            case "endpoint":
                self.endpoint = normalize_endpoint(value) if value else None
            case "allowed_ip":
                self.allowed.append(normalize_cidr(value))
            case "persistent_keepalive_interval":
                self.keepalive = _int(key, value)
            case "last_handshake_time_sec":
                self.hs_sec = _int(key, value)
            case "last_handshake_time_nsec":
                self.hs_nsec = _int(key, value)
            case "rx_bytes":
                self.rx = _int(key, value)
            case "tx_bytes":
                self.tx = _int(key, value)
            case "protocol_version":
                self.version = _int(key, value)
            case _:
                pass  # preshared_key and future keys: not part of our model

    def build(self) -> PeerStatus:
        handshake = None
        if self.hs_sec or self.hs_nsec:
            handshake = self.hs_sec + self.hs_nsec / 1e9
        return PeerStatus(
            public_key=self.public_key,
            allowed_ips=tuple(sorted(set(self.allowed))),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            last_handshake=handshake,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            protocol_version=self.version,
        )


def parse_get(answer: bytes) -> DeviceStatus:
    """Parse a complete ``get=1`` answer; raise `UapiError` on a non-zero errno."""
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: list[PeerStatus] = []
    current: _PeerBuilder | None = None
    code: int | None = None
    try:
        for key, value in _pairs(answer):
            if key == "errno":
                code = _errno(value, "get")
                break
            if key == "public_key":
                if current is not None:
                    peers.append(current.build())
                current = _PeerBuilder(value)
            elif current is not None:
                current.feed(key, value)
            elif key == "private_key":
                public_key = PrivateKey.from_hex(value).public_key().b64
            elif key == "listen_port":
                listen_port = _int(key, value)
            elif key == "fwmark":
                fwmark = _int(key, value)
    except KeyFormatError as exc:
        raise UapiProtocolError(f"get: {exc}") from exc
    if code is None:
        raise UapiProtocolError("get: answer carries no errno line (truncated?)")
    if code != 0:
        raise UapiError(code, "get")
    if current is not None:
        peers.append(current.build())
    return DeviceStatus(
        public_key=public_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
    )
