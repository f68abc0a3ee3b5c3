"""Typed WireGuard configuration and status, shared by the UAPI and netlink backends (pure).

Keys are base64 strings (the `wg` format) everywhere in this model; only the UAPI
renderer converts them to hex. Allowed IPs and endpoints are normalised on construction,
so two configs that mean the same thing compare equal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .errors import KeyFormatError
from .keys import PrivateKey, PublicKey


def normalize_cidr(cidr: str) -> str:
    """'10.0.0.7' -> '10.0.0.7/32'; '10.0.0.9/24' -> '10.0.0.0/24'; raises KeyFormatError."""
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError as exc:
        raise KeyFormatError(f"allowed IP {cidr!r} is not an address or CIDR: {exc}") from exc


def normalize_endpoint(endpoint: str) -> str:
    """'host:port' / '[v6]:port' with the address in canonical form; raises KeyFormatError."""
    text = endpoint.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise KeyFormatError(f"endpoint {endpoint!r} is not ip:port")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError as exc:
        raise KeyFormatError(f"endpoint {endpoint!r}: {exc}") from exc
    if addr.version == 6:
        return f"[{addr.compressed}]:{int(port_text)}"
    return f"{addr}:{int(port_text)}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """A normalised endpoint as (address, port) without brackets."""
    host, _, port = normalize_endpoint(endpoint).rpartition(":")
    return host.strip("[]"), int(port)


def _check_public_key(text: str) -> str:
    return PublicKey.from_b64(text).b64


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """What a peer should look like; ``endpoint=None`` means "learn it from the peer"."""

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", _check_public_key(self.public_key))
        ips = tuple(sorted({normalize_cidr(c) for c in self.allowed_ips}))
        object.__setattr__(self, "allowed_ips", ips)
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", normalize_endpoint(self.endpoint))
        if not 0 <= self.persistent_keepalive < 65536:
            raise KeyFormatError(f"persistent keepalive {self.persistent_keepalive} out of range")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Interface-level settings: the private key and the UDP port to listen on."""

    private_key: PrivateKey
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer as the device reports it, with its traffic counters.

    ``last_handshake`` is unix seconds (float), ``None`` when no handshake ever completed.
    """

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int = 0
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    protocol_version: int = 1

    @property
    def config(self) -> PeerConfig:
        return PeerConfig(
            public_key=self.public_key,
            allowed_ips=self.allowed_ips,
            endpoint=self.endpoint,
            persistent_keepalive=self.persistent_keepalive,
        )


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The whole device: its public key (None when no private key is set) and its peers."""

    public_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[PeerStatus, ...] = field(default_factory=tuple)

    def peer(self, public_key: str) -> PeerStatus | None:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None


@dataclass(frozen=True, slots=True)
class PeerOp:
    """One peer entry of a `set` operation, field for field what UAPI and netlink accept.

    An add is ``replace_allowed_ips=True`` with the full list; a change of an existing
    peer is ``update_only=True`` with only the changed fields; a removal is ``remove=True``.
    """

    public_key: str
    remove: bool = False
    update_only: bool = False
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[str, ...] = ()
